"""Data-parallel collectives the training components share (megatron-core's data-parallel group)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state


def gather_data_parallel(t: torch.Tensor, dp: int) -> torch.Tensor:
    """``t`` [n, ...] of every data-parallel rank, concatenated in rank order [dp·n, ...] (``t`` itself at dp=1)."""
    if dp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dp)]
    torch.distributed.all_gather(parts, t.contiguous(), group=parallel_state.get_data_parallel_group())
    return torch.cat(parts)


def sum_data_parallel(t: torch.Tensor, dp: int) -> torch.Tensor:
    """``t`` summed over the data-parallel ranks, in place (nothing to do at dp=1); returns ``t``."""
    if dp > 1:
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t
