"""The BD3 attention mask, from one ``mask_mod``.

Layout: x_t ⊕ x0, length 2L (noisy half [0, L), clean half [L, 2L)), blocks of L' tokens. For query q and key k:
  M_BD : same block, same half               (bidirectional inside a block)
  M_OBC: noisy q, clean k, blk(k) < blk(q)   (a noisy block reads the clean blocks before it)
  M_BC : clean q, clean k, blk(k) <= blk(q)  (the clean stream is block-causal)
The dense mask, the FlexAttention BlockMask, the sampler's clean-stream mask and the density are all evaluated from
:func:`make_mask_mod`, so they cannot drift apart.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

MaskMod = Callable[..., torch.Tensor]


def _check(seq_len: int, block_size: int) -> None:
    if seq_len < 1 or block_size < 1:
        raise ValueError(f"seq_len and block_size must be >= 1, got seq_len={seq_len}, block_size={block_size}")
    if seq_len % block_size:
        raise ValueError(
            f"seq_len ({seq_len}) must be divisible by block_size ({block_size}); "
            "pick a block size that divides the sequence length"
        )


def _device_key(device: torch.device | str | None) -> str:
    """A cache key naming one concrete device ('cuda' resolves to the current CUDA device)."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def make_mask_mod(seq_len: int, block_size: int) -> MaskMod:
    """``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` over [0, 2L).

    Written with tensor ops only (no Python branching on values), so FlexAttention can trace it and plain
    broadcasting can evaluate it on index grids.
    """
    _check(seq_len, block_size)

    def mask_mod(b, h, q_idx, kv_idx):
        q_clean = q_idx >= seq_len
        k_clean = kv_idx >= seq_len
        q_blk = (q_idx - q_clean * seq_len) // block_size  # (i mod L) // L' without a modulo
        k_blk = (kv_idx - k_clean * seq_len) // block_size
        diagonal = (q_blk == k_blk) & (q_clean == k_clean)  # M_BD
        offset_causal = ~q_clean & k_clean & (k_blk < q_blk)  # M_OBC
        causal = q_clean & k_clean & (k_blk <= q_blk)  # M_BC
        return diagonal | offset_causal | causal

    return mask_mod


def _evaluate(mask_mod: MaskMod, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return mask_mod(None, None, rows[:, None], cols[None, :])


@functools.lru_cache(maxsize=64)
def _dense(seq_len: int, block_size: int, device: str) -> torch.Tensor:
    idx = torch.arange(2 * seq_len, device=device)
    return _evaluate(make_mask_mod(seq_len, block_size), idx, idx)


@functools.lru_cache(maxsize=64)
def _clean(seq_len: int, block_size: int, device: str) -> torch.Tensor:
    idx = torch.arange(seq_len, 2 * seq_len, device=device)
    return _evaluate(make_mask_mod(seq_len, block_size), idx, idx)


def bd3_mask(seq_len: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Dense [2L, 2L] bool mask, True where the query may attend the key.

    Cached per (seq_len, block_size, device) because the model asks for it every step: callers must not modify it.
    """
    _check(seq_len, block_size)
    return _dense(seq_len, block_size, _device_key(device))


def block_causal_mask(seq_len: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[L, L] mask of the clean stream alone (key block <= query block), for the sampler and naive references.

    It is mask_mod's clean-half slice [L:, L:], evaluated directly (contiguous, cached; do not modify it).
    """
    _check(seq_len, block_size)
    return _clean(seq_len, block_size, _device_key(device))


def mask_density(seq_len: int, block_size: int, chunk_rows: int = 1024) -> float:
    """Fraction of the 2L x 2L grid the mask allows (about 1/4 for small blocks: (B + 1) / 4B with B blocks).

    Counted row chunk by row chunk from mask_mod, so it neither allocates nor caches a huge dense mask.
    """
    _check(seq_len, block_size)
    n = 2 * seq_len
    mod = make_mask_mod(seq_len, block_size)
    cols = torch.arange(n)
    allowed = sum(
        int(_evaluate(mod, torch.arange(r, min(r + chunk_rows, n)), cols).sum()) for r in range(0, n, chunk_rows)
    )
    return allowed / (n * n)


def flex_available() -> bool:
    """Whether this torch ships FlexAttention (torch.nn.attention.flex_attention)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=16)
def _flex(seq_len: int, block_size: int, device: str, tile: int):
    from torch.nn.attention.flex_attention import create_block_mask

    n = 2 * seq_len
    return create_block_mask(
        make_mask_mod(seq_len, block_size), B=None, H=None, Q_LEN=n, KV_LEN=n, device=device, BLOCK_SIZE=tile
    )


def flex_block_mask(seq_len: int, block_size: int, device: torch.device | str, block_tile: int = 128):
    """FlexAttention BlockMask of the BD3 mask, cached per (seq_len, block_size, device, tile).

    Tiles of ``block_tile`` x ``block_tile`` entirely inside the mask are marked full (mask_mod skipped), tiles
    entirely outside are skipped, and the rest apply mask_mod element by element.
    """
    _check(seq_len, block_size)
    if block_tile < 1:
        raise ValueError(f"block_tile must be >= 1, got {block_tile}")
    if not flex_available():
        raise ValueError(
            "FlexAttention is not available in this torch build; use the dense mask (attention backend 'sdpa') instead"
        )
    return _flex(seq_len, block_size, _device_key(device), block_tile)


def _flex_rows(mask_mod: MaskMod, batch: int | None, rows: int, kv_len: int, device: str, tile: tuple):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=rows, KV_LEN=kv_len, device=device, BLOCK_SIZE=tile)


_flex_rows_cached = functools.lru_cache(maxsize=16)(_flex_rows)  # the shared BD3 masks: one per shape


def noisy_query_rows(mask, rows: int):
    """The first ``rows`` query rows of a mask over x_t ⊕ x (rows = L: the noisy half) against every key.

    Dense [..., 2L, 2L] bool -> a [..., L, 2L] view; flex BlockMask -> the BlockMask of the same ``mask_mod`` with
    Q_LEN = L (the shared mask: built once per shape and cached; a per-batch padded mask: built for this batch).
    Used by the model's last layer, which computes noisy queries only.
    """
    if isinstance(mask, torch.Tensor):
        return mask[..., :rows, :]
    batch = mask.kv_num_blocks.shape[0]
    args = (
        mask.mask_mod,
        None if batch == 1 else batch,
        rows,
        mask.seq_lengths[1],
        str(mask.kv_indices.device),
        tuple(mask.BLOCK_SIZE),
    )
    return _flex_rows_cached(*args) if batch == 1 else _flex_rows(*args)


def with_key_padding(mask_mod: MaskMod, key_padding: torch.Tensor) -> MaskMod:
    """``mask_mod`` with padding keys hidden: query q of row b may attend key k iff the base mask allows it and k is
    not padding, and every query attends itself, so a padding query's softmax row is never empty (SDPA and flex
    give NaN for a row with every key masked). key_padding: bool [b, S], True at padding positions of the stream."""

    def padded_mod(b, h, q_idx, kv_idx):
        return (mask_mod(b, h, q_idx, kv_idx) & ~key_padding[b, kv_idx]) | (q_idx == kv_idx)

    return padded_mod


def padded_dense(mask: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
    """A dense [S, S] mask with padding keys hidden per row (see :func:`with_key_padding`): bool [b, 1, S, S]."""
    eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
    return ((mask[None] & ~key_padding[:, None, :]) | eye)[:, None]


def padded_flex_block_mask(seq_len: int, block_size: int, key_padding: torch.Tensor, block_tile: int = 128):
    """FlexAttention BlockMask of the BD3 mask with padding keys hidden (see :func:`with_key_padding`), one per batch
    row. Built per batch (not cached): only batches that hold padding need it. key_padding: bool [b, 2L]."""
    from torch.nn.attention.flex_attention import create_block_mask

    _check(seq_len, block_size)
    n = 2 * seq_len
    mod = with_key_padding(make_mask_mod(seq_len, block_size), key_padding)
    return create_block_mask(
        mod, B=key_padding.shape[0], H=None, Q_LEN=n, KV_LEN=n, device=key_padding.device, BLOCK_SIZE=block_tile
    )


def effective_dense(block_mask, mask_mod: MaskMod | None = None, n: int | None = None) -> torch.Tensor:
    """What a BlockMask lets through, element by element, as a dense [n, n] bool tensor (batch 0, head 0).

    Full tiles pass entirely, partial tiles apply ``mask_mod``, absent tiles block. ``BlockMask.to_dense()`` alone is
    tile-granular, which is how a correct BlockMask can look "wrong" (bd3lms issue #23).
    """
    mask_mod = mask_mod if mask_mod is not None else block_mask.mask_mod
    n = n if n is not None else block_mask.seq_lengths[0]
    q_tile, kv_tile = block_mask.BLOCK_SIZE
    partial = block_mask.kv_indices[0, 0]  # [q_tiles, max_kv]
    tiles_q, width = partial.shape

    def tile_grid(num: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        valid = (torch.arange(indices.shape[-1], device=indices.device) < num[:, None]).long()
        grid = torch.zeros(tiles_q, width, dtype=torch.long, device=indices.device)
        return grid.scatter_add_(1, indices.long(), valid) > 0  # scatter_add: repeated padding indices are harmless

    present = tile_grid(block_mask.kv_num_blocks[0, 0], partial)
    full = torch.zeros_like(present)
    if block_mask.full_kv_num_blocks is not None:
        full = tile_grid(block_mask.full_kv_num_blocks[0, 0], block_mask.full_kv_indices[0, 0])
    idx = torch.arange(n, device=partial.device)
    tq, tk = (idx // q_tile)[:, None], (idx // kv_tile)[None, :]
    return full[tq, tk] | (present[tq, tk] & _evaluate(mask_mod, idx, idx))
