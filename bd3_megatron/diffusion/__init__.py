"""Pure-torch diffusion core: the BD3 mask, schedules and clip windows, keyed noise, SUBS NELBO.

No distributed code and no megatron imports: everything here runs the same in one process, on any rank, on CPU or
GPU.
"""

from bd3_megatron.diffusion.loss import NELBO, nelbo, nelbo_weights, never_predicted, subs_log_probs
from bd3_megatron.diffusion.masks import (
    bd3_mask,
    block_causal_mask,
    effective_dense,
    flex_available,
    flex_block_mask,
    make_mask_mod,
    mask_density,
)
from bd3_megatron.diffusion.noise import (
    Corruption,
    corrupt,
    keyed_hash,
    keyed_uniform,
    resample_blocks,
    sample_mask,
    sample_t,
    window_feasible,
)
from bd3_megatron.diffusion.schedule import ClipWindow, LogLinearSchedule, get_schedule

__all__ = [
    "ClipWindow",
    "Corruption",
    "LogLinearSchedule",
    "bd3_mask",
    "block_causal_mask",
    "corrupt",
    "effective_dense",
    "flex_available",
    "flex_block_mask",
    "get_schedule",
    "keyed_hash",
    "keyed_uniform",
    "make_mask_mod",
    "mask_density",
    "NELBO",
    "nelbo",
    "nelbo_weights",
    "never_predicted",
    "resample_blocks",
    "sample_mask",
    "sample_t",
    "subs_log_probs",
    "window_feasible",
]
