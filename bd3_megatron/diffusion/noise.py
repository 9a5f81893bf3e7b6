"""Forward corruption keyed by (seed, global sample index, block/position, step) — never by rank.

All randomness here comes from a counter-based hash evaluated with torch integer ops, so there is no generator
state to carry, a sample's noise does not depend on which other samples share its batch or which rank holds it,
and CPU and GPU produce bit-identical draws.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from bd3_megatron.diffusion.schedule import ClipWindow

_M32 = 0xFFFFFFFF
# Distinct streams so t, the strata permutation, the mask and the resampling tries never share draws.
STREAM_T, STREAM_PERM, STREAM_MASK, STREAM_RESAMPLE = 0x51A7, 0x9E11, 0x3C6E, 0x7B0D


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 32-bit x held in int64, computed in 16-bit halves so no product overflows int64."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 avalanche mix (xorshift-multiply) on non-negative 32-bit values in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _as_key(k, device) -> torch.Tensor:
    return k.to(device=device, dtype=torch.int64) if torch.is_tensor(k) else torch.tensor(int(k), device=device)


def keyed_hash(seed: int, *keys, device=None) -> torch.Tensor:
    """32-bit hash of (seed, *keys), broadcast over tensor keys. Keys must be non-negative integers < 2^62."""
    if device is None:
        device = next((k.device for k in keys if torch.is_tensor(k)), torch.device("cpu"))
    h = _hash32(torch.tensor(seed & _M32, device=device, dtype=torch.int64) ^ 0x2545F491)
    h = _hash32(h ^ ((seed >> 32) & _M32))
    for k in keys:
        k = _as_key(k, device)
        # chain both 32-bit halves of the key; adding the golden-ratio constant breaks the 0 -> 0 fixed point
        h = _hash32((h ^ (k & _M32)) + 0x9E3779B9 & _M32)
        h = _hash32((h ^ ((k >> 32) & _M32)) + 0x9E3779B9 & _M32)
    return h


def keyed_uniform(seed: int, *keys, device=None) -> torch.Tensor:
    """float32 uniforms in [0, 1) with 24 random bits, a pure function of (seed, *keys)."""
    return (keyed_hash(seed, *keys, device=device) >> 8).to(torch.float32) * (2.0**-24)


@functools.lru_cache(maxsize=8)
def _strata_permutation(seed: int, step: int, cells: int, device: str) -> torch.Tensor:
    u = keyed_uniform(seed, STREAM_PERM, step, torch.arange(cells, device=device))
    return torch.argsort(u, stable=True)


def sample_t(seed: int, sample_index: torch.Tensor, step: int, num_blocks: int, window: ClipWindow,
             global_batch_size: int, antithetic: bool = True) -> torch.Tensor:
    """One t per (sequence, block): [b, num_blocks] float32 in [eps_min, eps_max].

    Antithetic: the global batch × blocks grid of N = G * nb cells is cut into N strata and each (sample, block)
    cell gets its own stratum through a permutation keyed by (seed, step), so t is stratified over the whole global
    batch (a smaller-variance NELBO estimate) without being monotone in the block index.
    """
    blocks = torch.arange(num_blocks, device=sample_index.device)
    u = keyed_uniform(seed, STREAM_T, step, sample_index[:, None], blocks[None, :])
    if antithetic:
        n = global_batch_size * num_blocks
        perm = _strata_permutation(seed, step, n, str(sample_index.device))
        cells = (sample_index % global_batch_size)[:, None] * num_blocks + blocks[None, :]
        u = (perm[cells].to(torch.float32) + u) / n
    return window.eps_min + u * (window.eps_max - window.eps_min)


def _bounds(window: ClipWindow, block_size: int) -> tuple[int, int]:
    """Admissible masked-token counts per block. As in the reference, the lower bound is enforced only when
    eps_min > 1e-3 and the upper bound only when eps_max < 1."""
    lo = math.ceil(window.eps_min * block_size - 1e-9) if window.eps_min > 1e-3 else 0
    hi = math.floor(window.eps_max * block_size + 1e-9) if window.eps_max < 1.0 else block_size
    return lo, hi


def window_feasible(window: ClipWindow, block_size: int) -> bool:
    lo, hi = _bounds(window, block_size)
    return lo <= hi


def sample_mask(seed: int, sample_index: torch.Tensor, step: int, t_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token Bernoulli(t) mask [b, L]: masked iff u < t (t = 1 masks everything)."""
    pos = torch.arange(t_tokens.shape[1], device=t_tokens.device)
    return keyed_uniform(seed, STREAM_MASK, step, sample_index[:, None], pos[None, :]) < t_tokens


def resample_blocks(seed: int, sample_index: torch.Tensor, step: int, t_tokens: torch.Tensor, block_size: int,
                    window: ClipWindow, max_tries: int = 8) -> torch.Tensor:
    """A mask whose masked fraction lies in the window for every block, in bounded work.

    Try 0 is the plain :func:`sample_mask` draw; tries 1.. are fresh keyed draws; each block keeps its first
    admissible try. A block with none masks exactly clamp(round(t·L'), lo, hi) tokens: those with the smallest
    try-0 uniforms (the reference instead loops without bound)."""
    lo, hi = _bounds(window, block_size)
    if lo > hi:
        raise ValueError(f"window [{window.eps_min}, {window.eps_max}] admits no masked-token count for block size "
                         f"{block_size}")
    b, seq = t_tokens.shape
    nb = seq // block_size
    pos = torch.arange(seq, device=t_tokens.device)
    tries = torch.arange(max_tries, device=t_tokens.device)
    u = torch.where(tries[:, None, None] == 0,
                    keyed_uniform(seed, STREAM_MASK, step, sample_index[:, None], pos[None, :])[None],
                    keyed_uniform(seed, STREAM_RESAMPLE, step, sample_index[None, :, None], pos[None, None, :],
                                  tries[:, None, None]))
    masks = u < t_tokens[None]  # [R, b, L]
    counts = masks.view(max_tries, b, nb, block_size).sum(-1)  # [R, b, nb]
    ok = (counts >= lo) & (counts <= hi)
    first = ok.to(torch.int8).argmax(0)  # first admissible try (0 where none)
    chosen = masks.view(max_tries, b, nb, block_size).gather(0, first[None, :, :, None].expand(1, b, nb, block_size))[0]
    # deterministic fallback for blocks without an admissible try
    u0 = u[0].view(b, nb, block_size)
    t_blk = t_tokens.view(b, nb, block_size)[..., 0]
    k = torch.clamp(torch.round(t_blk * block_size), lo, hi)
    ranks = torch.argsort(torch.argsort(u0, dim=-1, stable=True), dim=-1)
    fallback = ranks < k[..., None]
    mask = torch.where(ok.any(0)[..., None], chosen, fallback)
    return mask.view(b, seq)


@dataclass
class Corruption:
    xt: torch.Tensor  # [b, L] noisy tokens
    masked: torch.Tensor  # [b, L] bool
    t: torch.Tensor  # [b, num_blocks]
    t_tokens: torch.Tensor  # [b, L]


def corrupt(x0: torch.Tensor, sample_index: torch.Tensor, step: int, *, seed: int, block_size: int,
            window: ClipWindow, mask_token_id: int, global_batch_size: int, antithetic: bool = True,
            resample: bool = False, ignore_bos: bool = False, max_tries: int = 8) -> Corruption:
    """x_t from x0: one t per block, tokens masked with probability t (optionally resampled into the window)."""
    b, seq = x0.shape
    if seq % block_size:
        raise ValueError(f"sequence length {seq} is not a multiple of block_size {block_size}")
    if sample_index.shape != (b,):
        raise ValueError(f"sample_index must have shape [{b}], got {tuple(sample_index.shape)}")
    sample_index = sample_index.to(x0.device)
    t = sample_t(seed, sample_index, step, seq // block_size, window, global_batch_size, antithetic)
    t_tokens = t.repeat_interleave(block_size, dim=1)
    if resample and not window.is_default:
        masked = resample_blocks(seed, sample_index, step, t_tokens, block_size, window, max_tries)
    else:
        masked = sample_mask(seed, sample_index, step, t_tokens)
    if ignore_bos:
        masked[:, 0] = False
    xt = torch.where(masked, torch.full_like(x0, mask_token_id), x0)
    return Corruption(xt=xt, masked=masked, t=t, t_tokens=t_tokens)
