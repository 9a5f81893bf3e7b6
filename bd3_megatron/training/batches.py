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
from bd3_megatron.diffusion.schedule import ClipWindow, get_schedule
from bd3_megatron.modes import get_mode
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
    sigma: torch.Tensor | None = None  # [b] fp32 total noise the backbone is conditioned on (time-conditioned modes)

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
    """Builds micro-batches from clean rows x0 through the model mode (its inputs, targets and NELBO weights), for
    training and (fixed noise) for validation."""

    def __init__(self, cfg: Config, mask_token_id: int, device: torch.device):
        self.cfg = cfg
        self.mode = get_mode(cfg.model.mode)
        self.mask_token_id = mask_token_id
        self.device = device
        d = cfg.diffusion
        self.window = ClipWindow(d.eps_min, d.eps_max)  # moved by the clip-window search
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
        """The micro-batch of clean rows x0 [b, L] (global sample indices ``sample_index`` [b], optimizer step
        ``step``). Training batches use the current window (``self.window``) with the configured resampling;
        evaluation passes its own window, and resampling only if asked. ``padding`` [b, L] (True at padding, or None)
        comes with --pad rows: padding is never predicted (weight 0); every real token's noise is the same as
        without it."""
        if resample is None:
            resample = self.cfg.diffusion.resample and window is None
        return self.mode.make_batch(
            self,
            x0.to(self.device),
            sample_index.to(self.device),
            step,
            window=window or self.window,
            resample=resample,
            global_batch=global_batch or self.cfg.train.global_batch_size,
            seed=self.cfg.train.seed + seed_offset,
            padding=None if padding is None else padding.to(self.device),
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
            sigma=None if parts[0].sigma is None else torch.cat([p.sigma for p in parts]),
        )
        batch.weight[~batch.valid] = 0.0
        return batch
