"""Variance of the NELBO estimator and the data-driven clip-window search (BD3-LM §"clipped schedules").

The training loss is an estimate of the NELBO whose variance depends on where t is drawn. The reference evaluates,
on a fixed set of validation batches, the per-block NELBO estimates under each candidate window [β, ω] and trains
with the window whose estimates vary least. Everything here is pure torch; the trainer gathers the per-block losses
over data-parallel ranks before scoring, so every rank picks the same window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from bd3_megatron.diffusion.schedule import DEFAULT_EPS_MIN, ClipWindow


def clip_window_grid(widths: Sequence[float], delta: float, block_size: int | None = None) -> list[ClipWindow]:
    """The reference's candidate windows: the unclipped (1e-3, 1) plus, for each width w, windows [s, s + w] for
    s = 0, δ, 2δ, … ≤ 1 - w (lower ends floored at 1e-3). Widths 0.5..0.9 with δ = 0.05 give 36 windows. With
    block size 1 the reference compares only (1e-3, 1) and (1, 1), the window in which the NELBO is the AR NLL."""
    if delta <= 0:
        raise ValueError(f"clip search delta must be > 0, got {delta}")
    if block_size == 1:
        return [ClipWindow(), ClipWindow(1.0, 1.0)]
    windows = [ClipWindow()]
    for w in widths:
        if not 0.0 < w <= 1.0:
            raise ValueError(f"clip search widths must lie in (0, 1], got {w}")
        for k in range(int(math.floor((1.0 - w) / delta + 1e-9)) + 1):
            lo = k * delta
            window = ClipWindow(max(lo, DEFAULT_EPS_MIN), min(max(lo + w, DEFAULT_EPS_MIN), 1.0))
            if window not in windows:
                windows.append(window)
    return windows


def block_means(token_terms: torch.Tensor, block_size: int, real: torch.Tensor | None = None) -> torch.Tensor:
    """Per-block NELBO estimates [b, num_blocks] from per-token terms [b, L] (mean over each block's tokens).

    real: optional bool [b, L], False at padding: then the mean is over each block's real tokens, and a block of
    padding only (no estimate at all) gets 0; callers drop those blocks (see block_has_tokens)."""
    b, seq = token_terms.shape
    if seq % block_size:
        raise ValueError(f"sequence length {seq} is not a multiple of block_size {block_size}")
    if real is None:
        return token_terms.reshape(b, seq // block_size, block_size).mean(-1)
    blocks = (b, seq // block_size, block_size)
    sums = torch.where(real, token_terms, torch.zeros_like(token_terms)).reshape(blocks).sum(-1)
    return sums / real.reshape(blocks).sum(-1).clamp_min(1)


def block_has_tokens(real: torch.Tensor, block_size: int) -> torch.Tensor:
    """bool [b, num_blocks]: which blocks hold at least one real token (real: bool [b, L], False at padding)."""
    b, seq = real.shape
    return real.reshape(b, seq // block_size, block_size).any(-1)


def variance_score(per_batch_block_losses: Iterable[torch.Tensor]) -> float:
    """Unbiased variance of all per-block NELBO estimates (sequences × blocks of every batch, gathered over ranks).

    The reference sums per-batch variances, which depends on how sequences are grouped into batches and hence on the
    data-parallel size; pooling scores the same estimates identically under any layout."""
    flat = [losses.detach().double().flatten() for losses in per_batch_block_losses]
    pooled = torch.cat(flat) if flat else torch.empty(0, dtype=torch.float64)
    if pooled.numel() < 2:
        raise ValueError("the clip search needs at least two per-block estimates to have a variance")
    return float(pooled.var(unbiased=True))


def search_clip_window(
    windows: Sequence[ClipWindow], estimates: Callable[[ClipWindow], list[torch.Tensor]]
) -> tuple[ClipWindow, dict]:
    """Score every window with ``estimates(window)`` (per-batch per-block losses) and return the minimiser and all
    scores keyed by ``"lo-hi"`` labels. Ties go to the earlier window in the grid."""
    scores = {}
    best, best_score = None, math.inf
    for window in windows:
        score = variance_score(estimates(window))
        scores[window_label(window)] = score
        if score < best_score:
            best, best_score = window, score
    if best is None:
        raise ValueError("every candidate window scored NaN/inf; the validation losses are not finite")
    return best, scores


def window_label(window: ClipWindow) -> str:
    return f"{window.eps_min:.3g}-{window.eps_max:.3g}"
