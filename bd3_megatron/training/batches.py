"""From global sample indices to corrupted micro-batches.

Optimizer step s consumes global samples [s*G, (s+1)*G). Micro-batch m of data-parallel rank r holds the
contiguous slice starting at s*G + (m*dp + r)*mb. Rows come from ``ShuffledStream`` and noise from
``diffusion.corrupt``, both keyed by the global sample index, so every layout sees the same data and noise.

Validation row j is noised as sample j of a training-like step j // EVAL_NOISE_GROUP whose global batch is always
EVAL_NOISE_GROUP rows, so its noise depends only on (seed, j, noise draw): not on the batch size, the data-parallel
size or how many rows are scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bd3_megatron.config import Config
from bd3_megatron.diffusion import noise
from bd3_megatron.diffusion.loss import token_nelbo
from bd3_megatron.diffusion.schedule import ClipWindow, get_schedule
from data_pipeline.dataset import padding_mask

EVAL_SEED_OFFSET = 7919  # validation noise is a separate stream, identical at every evaluation
EVAL_DRAW_STRIDE = 104729  # seed offset between independent validation noise draws
EVAL_NOISE_GROUP = 512  # rows per antithetic stratification group of the validation noise (the paper's batch)


@dataclass
class MicroBatch:
    x0: torch.Tensor  # [b, L] clean tokens
    xt: torch.Tensor  # [b, L] noisy tokens
    masked: torch.Tensor  # [b, L] bool, positions replaced by the mask token
    weight: torch.Tensor  # [b, L] fp32 NELBO weight per token (loss_weight(t) on masked positions, else 0)
    t: torch.Tensor  # [b, num_blocks] the diffusion time of each block
    sample_index: torch.Tensor  # [b] global sample indices
    # [b, L] bool, True at padding of --pad rows (data_pipeline.dataset.padding_mask); None when the batch has none.
    # Padding is never masked or scored (weight 0), is left out of the token average, and the model hides it from
    # every real token's attention, as the reference does with LM1B's attention_mask.
    padding: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [b] bool: False for padding rows of a short evaluation batch (weight 0)

    @property
    def num_tokens(self) -> int | torch.Tensor:
        """Tokens the NELBO averages over: all b*L, or the real ones (not padding, not in a padding row of a short
        evaluation batch; reference: Σ loss·mask / Σ mask)."""
        if self.padding is None and self.valid is None:
            return self.x0.numel()
        real = torch.ones_like(self.x0, dtype=torch.bool) if self.padding is None else ~self.padding
        return (real if self.valid is None else real & self.valid[:, None]).sum()


def sample_indices(step: int, micro: int, dp_rank: int, dp: int, micro_batch: int, global_batch: int) -> np.ndarray:
    start = step * global_batch + (micro * dp + dp_rank) * micro_batch
    return np.arange(start, start + micro_batch, dtype=np.int64)


class BatchMaker:
    """Builds corrupted micro-batches for training (and fixed-noise ones for validation)."""

    def __init__(self, cfg: Config, mask_token_id: int, device: torch.device):
        self.cfg = cfg
        self.mask_token_id = mask_token_id
        self.device = device
        d = cfg.diffusion
        self.window = ClipWindow(d.eps_min, d.eps_max)
        self.schedule = get_schedule(d.schedule)

    def corrupt(
        self,
        x0: torch.Tensor,
        sample_index: torch.Tensor,
        step: int,
        *,
        window: ClipWindow | None = None,
        resample: bool | None = None,
        global_batch: int | None = None,
        seed_offset: int = 0,
        padding: torch.Tensor | None = None,
    ) -> MicroBatch:
        """Training batches use the current window (``self.window``, moved by the clip search) with the configured
        resampling; evaluation passes its own window, and resampling only if asked. ``padding`` [b, L] (True at
        padding, or None) comes with --pad rows: padding positions are never masked, so their weight is 0; the noise
        of every real token is the same as without it."""
        d = self.cfg.diffusion
        if padding is not None:
            padding = padding.to(self.device)
        if self.cfg.model.mode == "ar":
            return self._next_token_batch(x0.to(self.device), sample_index.to(self.device), padding)
        if resample is None:
            resample = d.resample and window is None
        x0 = x0.to(self.device)
        sample_index = sample_index.to(self.device)
        c = noise.corrupt(
            x0,
            sample_index,
            step,
            seed=self.cfg.train.seed + seed_offset,
            block_size=self.cfg.model.block_size,
            window=window or self.window,
            mask_token_id=self.mask_token_id,
            global_batch_size=global_batch or self.cfg.train.global_batch_size,
            antithetic=d.antithetic,
            resample=resample,
            ignore_bos=d.ignore_bos,
            max_tries=d.resample_tries,
        )
        masked, xt = c.masked, c.xt
        if padding is not None:  # drawn as usual (same keys), then padding is taken out of the mask
            masked = masked & ~padding
            xt = torch.where(padding, x0, xt)
        # per-token NELBO weight: the SUBS NELBO of a unit cross-entropy at every token
        weight = token_nelbo(torch.ones_like(c.t_tokens), masked, c.t_tokens, self.schedule)
        return MicroBatch(
            x0=x0, xt=xt, masked=masked, weight=weight.float(), t=c.t, sample_index=sample_index, padding=padding
        )

    def eval_batch(
        self, rows, slots: np.ndarray, n_rows: int, window: ClipWindow, resample: bool = False, noise_draw: int = 0
    ) -> MicroBatch:
        """A fixed-noise validation micro-batch over positions ``slots`` [b] of the first ``n_rows`` rows of
        ``rows`` (a ``rows(idx) -> [b, L]`` dataset). Slots >= n_rows are padding: they repeat the last row, get
        weight 0 and ``valid`` False, so every rank runs the same number of equally sized micro-batches.
        Row j's noise is that of sample j at step j // EVAL_NOISE_GROUP with global batch EVAL_NOISE_GROUP (seed
        offset by the draw), so it depends on (seed, j, noise_draw) only."""
        valid = torch.from_numpy(slots < n_rows)
        x0 = torch.from_numpy(rows.rows(np.minimum(slots, n_rows - 1)))
        padding = padding_mask(x0, rows.pad_token_id)
        index = torch.from_numpy(slots.astype(np.int64))
        group = torch.from_numpy(slots // EVAL_NOISE_GROUP)
        parts = [
            self.corrupt(
                x0[group == g],
                index[group == g],
                int(g),
                window=window,
                resample=resample,
                global_batch=EVAL_NOISE_GROUP,
                seed_offset=EVAL_SEED_OFFSET + EVAL_DRAW_STRIDE * noise_draw,
                padding=None if padding is None else padding[group == g],
            )
            for g in torch.unique(group)
        ]  # one part unless the batch straddles a group boundary
        batch = MicroBatch(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("x0", "xt", "masked", "weight", "t", "sample_index")),
            padding=None if padding is None else torch.cat([p.padding for p in parts]),
            valid=valid.to(self.device),
        )
        batch.weight[~batch.valid] = 0.0
        return batch

    def _next_token_batch(
        self, x0: torch.Tensor, sample_index: torch.Tensor, padding: torch.Tensor | None = None
    ) -> MicroBatch:
        """The AR baseline: predict every real token but the first from its prefix. The weight (tokens averaged over) /
        (tokens predicted), L/(L-1) without padding, makes the loss mean equal the mean NLL of the predicted ones."""
        b, seq = x0.shape
        predicted = torch.ones_like(x0, dtype=torch.bool)
        predicted[:, 0] = False
        if padding is None:
            weight = predicted.float() * (seq / max(seq - 1, 1))
        else:
            predicted &= ~padding
            weight = predicted.float() * ((~padding).sum() / predicted.sum().clamp_min(1))
        t = torch.ones(b, seq // self.cfg.model.block_size, device=x0.device)
        return MicroBatch(
            x0=x0, xt=x0, masked=predicted, weight=weight, t=t, sample_index=sample_index, padding=padding
        )
