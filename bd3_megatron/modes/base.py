"""What a model mode is: the parts of BD3-LM and its baselines that differ on the one shared backbone.

Every mode runs the same megatron-core transformer, head and training loop. A mode decides

* the **input stream** the backbone reads (:meth:`ModelMode.input_ids`): x_t ⊕ x0 for BD3, x_t for MDLM, x0 for AR;
* its **attention mask** (:meth:`ModelMode.attention_mask`): slices of the one BD3 mask function;
* its **targets** (:meth:`ModelMode.make_batch`): which tokens are predicted and each one's NELBO weight;
* where the head reads its state (:meth:`ModelMode.head_inputs`): AR predicts token l from the state at l-1;
* which configuration it accepts (:meth:`ModelMode.validate`) and which tools apply (block sampler, scorer);
* whether the backbone is conditioned on the noise level and the head scores by score entropy (SEDD).

Modes are stateless singletons in the registry (``bd3_megatron.modes.MODES``); a new mode is one new module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from bd3_megatron.diffusion import masks, noise
from bd3_megatron.diffusion.loss import nelbo_weights

if TYPE_CHECKING:
    from bd3_megatron.config import Config
    from bd3_megatron.diffusion.schedule import ClipWindow
    from bd3_megatron.training.batches import BatchMaker, MicroBatch


class ModelMode:
    """One model family on the shared backbone. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    streams: ClassVar[int] = 1  # sequences of length L the backbone reads side by side (x_t ⊕ x0: 2)
    diffusion: ClassVar[bool] = True  # has a noise schedule and clip window (clip search, --window apply)
    block_sampler: ClassVar[bool] = False  # the KV-cache block sampler and the bd3lms HF layout hold it
    sampler_net: ClassVar[bool] = False  # the single-device network (tools/convert.py) can run it
    noisy_half_last_layer: ClassVar[bool] = False  # the last layer may compute the noisy half alone (head input)
    time_conditioned: ClassVar[bool] = False  # the backbone is conditioned on the batch's total noise sigma [b]
    score_entropy: ClassVar[bool] = False  # the head's per-token value is SEDD's score entropy, not the CE

    @property
    def samples(self) -> bool:
        """A sampler draws from it (``sampling.kv_sampler.generate``): the block sampler, or SEDD's analytic sampler
        for a score-entropy mode. AR scores samples; MDLM has no sampler here."""
        return self.block_sampler or self.score_entropy

    def validate(self, cfg: Config) -> str | None:
        """A message naming what in ``cfg`` this mode cannot run (and how to fix it), or None."""
        return None

    def input_ids(self, xt: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The backbone's input [b, streams·L] from x_t and x0 [b, L]."""
        raise NotImplementedError

    def attention_mask(self, seq_len: int, block_size: int, backend: str, device: torch.device):
        """The stream's attention mask: bool [S, S] (True = may attend; S = streams·L) or a flex BlockMask.
        ``backend`` is sdpa or flex (resolved, never auto)."""
        raise NotImplementedError

    def head_inputs(self, out: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The states the head reads [b, L, h] and the positions it predicts [b, L] (bool), from the last layer's
        first L states ``out`` [b, L, h] and the batch's predicted positions."""
        return out, loss_mask

    def make_batch(
        self,
        maker: BatchMaker,
        x0: torch.Tensor,
        sample_index: torch.Tensor,
        step: int,
        *,
        window: ClipWindow,
        resample: bool,
        global_batch: int,
        seed: int,
        padding: torch.Tensor | None,
    ) -> MicroBatch:
        """The micro-batch of x0 [b, L] (on the device): inputs, predicted positions and per-token NELBO weights.
        Noise is keyed by (seed, sample_index, step) and ``global_batch`` (the antithetic strata), never by rank."""
        raise NotImplementedError


class MaskedDiffusionMode(ModelMode):
    """Masked (absorbing-state) diffusion under SUBS with one t per block: BD3-LM, and MDLM as its L' = L case."""

    def make_batch(self, maker, x0, sample_index, step, *, window, resample, global_batch, seed, padding):
        from bd3_megatron.training.batches import MicroBatch

        d = maker.cfg.diffusion
        c = noise.corrupt(
            x0,
            sample_index,
            step,
            seed=seed,
            block_size=maker.cfg.model.block_size,
            window=window,
            mask_token_id=maker.mask_token_id,
            global_batch_size=global_batch,
            antithetic=d.antithetic,
            resample=resample,
            ignore_bos=d.ignore_bos,
            max_tries=d.resample_tries,
        )
        masked, xt = c.masked, c.xt
        if padding is not None:  # drawn as usual (same keys), then padding is taken out of the mask
            masked = masked & ~padding
            xt = torch.where(padding, x0, xt)
        weight = nelbo_weights(masked, c.t_tokens, maker.schedule)
        return MicroBatch(
            x0=x0, xt=xt, masked=masked, weight=weight.float(), t=c.t, sample_index=sample_index, padding=padding
        )


def dense_or_flex(seq_len: int, block_size: int, backend: str, device: torch.device):
    """The BD3 x_t ⊕ x mask over [2L, 2L]: a flex BlockMask for the flex backend, else dense bool (both cached)."""
    if backend == "flex":
        return masks.flex_block_mask(seq_len, block_size, device)
    return masks.bd3_mask(seq_len, block_size, device=device)
