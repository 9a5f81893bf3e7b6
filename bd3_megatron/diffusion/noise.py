"""Forward corruption keyed by (seed, global sample index, block/position, step) — never by rank.

All randomness here comes from a counter-based hash evaluated with torch integer ops: there is no generator state to
carry or checkpoint, a sample's noise does not depend on which other samples share its batch or which rank holds it,
and CPU and GPU produce bit-identical draws (integer ops are exact, and the float conversions are exact too).

Construction of :func:`keyed_uniform`: every value is a 32-bit unsigned integer held in int64, masked with
0xFFFFFFFF after each step, so int64 overflow and signed shifts never occur. The state starts as
``mix(mix(seed_lo ^ C0) ^ seed_hi)``; each key k (any int64) is folded in as ``h = mix(((h ^ k_lo) + φ) mod 2^32)``
and then the same with k_hi, where ``mix`` is the lowbias32 avalanche (xorshift-multiply, full avalanche on 32 bits)
and φ = 0x9E3779B9 breaks the 0 -> 0 fixed point. Chaining (not xor-ing) keys makes the hash order-sensitive, so
(sample 3, position 5) and (sample 5, position 3) differ. The output uses the top 24 bits: ``(h >> 8) * 2^-24``,
exactly representable in float32, in [0, 1).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from bd3_megatron.diffusion.schedule import ClipWindow

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_SEED_SALT = 0x2545F491
# Distinct streams so t, the strata permutation, the mask and the resampling tries never share draws.
STREAM_T, STREAM_PERM, STREAM_MASK, STREAM_RESAMPLE = 0x51A7, 0x9E11, 0x3C6E, 0x7B0D

Key = torch.Tensor | int


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 32-bit x held in int64, computed in 16-bit halves so no product exceeds 2^48."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 avalanche mix (xorshift-multiply) on 32-bit values in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _fold(h: torch.Tensor, word: torch.Tensor | int) -> torch.Tensor:
    return _mix32(((h ^ word) + _GOLDEN) & _M32)


def keyed_hash(seed: int, *keys: Key, device: torch.device | str | None = None) -> torch.Tensor:
    """32-bit hash (int64 tensor in [0, 2^32)) of (seed, *keys), broadcast over the tensor keys.

    Keys are int64 tensors or Python ints (any sign). Put scalar keys first: they are hashed on 0-d tensors before
    the broadcast grows the state.
    """
    if device is None:
        device = next((k.device for k in keys if torch.is_tensor(k)), torch.device("cpu"))
    h = _mix32(torch.tensor((seed & _M32) ^ _SEED_SALT, device=device, dtype=torch.int64))
    h = _mix32(h ^ ((seed >> 32) & _M32))
    for k in keys:
        if torch.is_tensor(k):
            if k.is_floating_point() or k.is_complex():
                raise ValueError(f"noise keys must be integer tensors, got dtype {k.dtype}")
            k = k.to(device=device, dtype=torch.int64)
        else:
            k = int(k)
        h = _fold(_fold(h, k & _M32), (k >> 32) & _M32)  # low word, then high word
    return h


def keyed_uniform(seed: int, *keys: Key, device: torch.device | str | None = None) -> torch.Tensor:
    """float32 uniforms in [0, 1) with 24 random bits, a pure function of (seed, *keys) (see the module doc)."""
    return (keyed_hash(seed, *keys, device=device) >> 8).to(torch.float32) * (2.0**-24)


@functools.lru_cache(maxsize=8)
def _strata_permutation(seed: int, step: int, cells: int, device: str) -> torch.Tensor:
    """A uniformly random permutation of the N strata, keyed by (seed, step) only (so shared by every rank).

    Sorting full 32-bit hashes (stable on ties) gives the same permutation on every device.
    """
    h = keyed_hash(seed, STREAM_PERM, step, torch.arange(cells, device=device))
    return torch.argsort(h, stable=True)


def _check_index(sample_index: torch.Tensor) -> None:
    if not torch.is_tensor(sample_index) or sample_index.dim() != 1:
        raise ValueError("sample_index must be a 1-D integer tensor of global sample indices")
    if sample_index.is_floating_point() or sample_index.dtype == torch.bool:
        raise ValueError(f"sample_index must hold integers, got dtype {sample_index.dtype}")


def sample_t(
    seed: int,
    sample_index: torch.Tensor,
    step: int,
    num_blocks: int,
    window: ClipWindow,
    global_batch_size: int,
    antithetic: bool = True,
) -> torch.Tensor:
    """One t per (sequence, block): [b, num_blocks] float32 in [eps_min, eps_max].

    Antithetic: the global batch x blocks grid of N = G * nb cells (cell of sample j = sample_index mod G, block k is
    j * nb + k) is cut into N strata [s/N, (s+1)/N) and cell c takes stratum perm[c], perm a permutation keyed by
    (seed, step). Over a full global batch every stratum is used once (a lower-variance NELBO estimate), and, unlike
    the reference's row-major strata, t is not monotone in the block index. Without antithetic, t = window(u).
    """
    _check_index(sample_index)
    if num_blocks < 1 or global_batch_size < 1:
        raise ValueError(f"num_blocks and global_batch_size must be >= 1, got {num_blocks}, {global_batch_size}")
    sample_index = sample_index.long()
    blocks = torch.arange(num_blocks, device=sample_index.device)
    u = keyed_uniform(seed, STREAM_T, step, sample_index[:, None], blocks[None, :]).double()
    if antithetic:
        n = global_batch_size * num_blocks
        perm = _strata_permutation(seed, step, n, str(sample_index.device))
        cells = (sample_index % global_batch_size)[:, None] * num_blocks + blocks[None, :]
        u = (perm[cells].double() + u) / n  # float64: exact strata, identical on every device
    t = (window.eps_min + u * (window.eps_max - window.eps_min)).float()
    return t.clamp_(window.eps_min, window.eps_max)  # float32 rounding must not step outside the window


def _bounds(window: ClipWindow, block_size: int) -> tuple[int, int]:
    """Admissible masked-token counts per block.

    As in the reference, the lower bound is enforced only when eps_min is above the default 1e-3 and the upper
    bound only when eps_max < 1; the 1e-9 slack makes e.g. 3 of 10 tokens count as a fraction of 0.3.
    """
    lo = math.ceil(window.eps_min * block_size - 1e-9) if window.eps_min > 1e-3 else 0
    hi = math.floor(window.eps_max * block_size + 1e-9) if window.eps_max < 1.0 else block_size
    return lo, hi


def window_feasible(window: ClipWindow, block_size: int) -> bool:
    """Whether some integer count of masked tokens in a block of ``block_size`` has its fraction in the window."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    lo, hi = _bounds(window, block_size)
    return lo <= hi


def sample_mask(seed: int, sample_index: torch.Tensor, step: int, t_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token Bernoulli(t) mask [b, L]: masked iff u < t, u keyed by (sample, position, step); t = 1 masks all."""
    _check_index(sample_index)
    pos = torch.arange(t_tokens.shape[1], device=t_tokens.device)
    u = keyed_uniform(seed, STREAM_MASK, step, sample_index.to(t_tokens.device)[:, None], pos[None, :])
    return u < t_tokens


def resample_blocks(
    seed: int,
    sample_index: torch.Tensor,
    step: int,
    t_tokens: torch.Tensor,
    block_size: int,
    window: ClipWindow,
    max_tries: int = 8,
) -> torch.Tensor:
    """A mask [b, L] whose masked fraction lies in the window for every block, in bounded work.

    Try 0 is the plain :func:`sample_mask` draw, tries 1.. are fresh keyed draws (the try index is one more key);
    each block keeps its first admissible try. A block with none masks exactly k = clamp(round(t L'), lo, hi) tokens,
    the k with the smallest try-0 uniforms. (The reference rejection-samples without bound instead.)
    """
    _check_index(sample_index)
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    lo, hi = _bounds(window, block_size)
    if lo > hi:
        raise ValueError(
            f"window [{window.eps_min}, {window.eps_max}] admits no masked-token count for block size "
            f"{block_size}; widen the window or turn resampling off"
        )
    b, seq = t_tokens.shape
    if seq % block_size:
        raise ValueError(f"sequence length {seq} is not a multiple of block_size {block_size}")
    nb = seq // block_size
    device = t_tokens.device
    idx = sample_index.to(device).long()
    pos = torch.arange(seq, device=device)
    u0 = keyed_uniform(seed, STREAM_MASK, step, idx[:, None], pos[None, :])
    u = u0[None]
    if max_tries > 1:
        tries = torch.arange(1, max_tries, device=device)
        more = keyed_uniform(seed, STREAM_RESAMPLE, step, tries[:, None, None], idx[None, :, None], pos[None, None, :])
        u = torch.cat([u, more])
    masks = (u < t_tokens[None]).view(max_tries, b, nb, block_size)
    counts = masks.sum(-1)  # [R, b, nb]
    ok = (counts >= lo) & (counts <= hi)
    first = ok.to(torch.int8).argmax(0)  # index of the first admissible try (0 where there is none)
    chosen = masks.gather(0, first[None, :, :, None].expand(1, b, nb, block_size))[0]
    # deterministic fallback: the k lowest try-0 uniforms of the block
    t_blk = t_tokens.view(b, nb, block_size)[..., 0]
    k = torch.clamp(torch.round(t_blk * block_size), lo, hi)
    ranks = torch.argsort(torch.argsort(u0.view(b, nb, block_size), dim=-1, stable=True), dim=-1, stable=True)
    fallback = ranks < k[..., None]
    return torch.where(ok.any(0)[..., None], chosen, fallback).view(b, seq)


@dataclass
class Corruption:
    """One forward-corrupted batch."""

    xt: torch.Tensor  # [b, L] noisy tokens (mask_token_id where masked)
    masked: torch.Tensor  # [b, L] bool
    t: torch.Tensor  # [b, num_blocks] float32
    t_tokens: torch.Tensor  # [b, L] t repeated over each block


def corrupt(
    x0: torch.Tensor,
    sample_index: torch.Tensor,
    step: int,
    *,
    seed: int,
    block_size: int,
    window: ClipWindow,
    mask_token_id: int,
    global_batch_size: int,
    antithetic: bool = True,
    resample: bool = False,
    ignore_bos: bool = False,
    max_tries: int = 8,
) -> Corruption:
    """x_t from x0: one t per block, tokens masked with probability t (optionally resampled into the window).

    Everything is computed on x0.device. ignore_bos keeps position 0 clean, applied after resampling as in the
    reference (so block 0 may then fall one token short of the window).
    """
    if x0.dim() != 2 or x0.is_floating_point() or x0.dtype == torch.bool:
        raise ValueError(f"x0 must be a [batch, seq_len] integer tensor, got {tuple(x0.shape)} {x0.dtype}")
    b, seq = x0.shape
    if block_size < 1 or seq % block_size:
        raise ValueError(f"sequence length {seq} is not a multiple of block_size {block_size}")
    _check_index(sample_index)
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
