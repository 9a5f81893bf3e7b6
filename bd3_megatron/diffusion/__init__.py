"""Pure-torch diffusion core: masks, schedules, keyed noise, SUBS NELBO (no distributed code)."""
from bd3_megatron.diffusion.loss import nelbo_from_token_ce, nelbo_sum, subs_log_probs, token_nelbo
from bd3_megatron.diffusion.masks import (block_causal_mask, bd3_mask, flex_available, flex_block_mask,
                                          make_mask_mod, mask_density)
from bd3_megatron.diffusion.noise import Corruption, corrupt, keyed_uniform, sample_mask, sample_t, window_feasible
from bd3_megatron.diffusion.schedule import ClipWindow, LogLinearSchedule, get_schedule

__all__ = ["ClipWindow", "Corruption", "LogLinearSchedule", "block_causal_mask", "bd3_mask", "corrupt",
           "flex_available", "flex_block_mask", "get_schedule", "keyed_uniform", "make_mask_mod", "mask_density",
           "nelbo_from_token_ce", "nelbo_sum", "sample_mask", "sample_t", "subs_log_probs", "token_nelbo",
           "window_feasible"]
