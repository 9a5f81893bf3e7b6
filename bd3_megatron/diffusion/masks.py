"""The BD3 attention mask, from one ``mask_mod``.

Layout: x_t ⊕ x0, length 2L (noisy half [0, L), clean half [L, 2L)), blocks of L' tokens. For query q and key k:
  M_BD : same block, same half        (bidirectional inside a block)
  M_OBC: noisy q, clean k, blk(k) < blk(q)   (a noisy block reads the clean blocks before it)
  M_BC : clean q, clean k, blk(k) <= blk(q)  (the clean stream is block-causal)
The dense mask, the FlexAttention BlockMask and the sampler's clean-stream mask are all evaluated from
:func:`make_mask_mod`, so they cannot drift apart.
"""
from __future__ import annotations

import functools

import torch


def _check(seq_len: int, block_size: int) -> None:
    if seq_len < 1 or block_size < 1:
        raise ValueError(f"seq_len and block_size must be >= 1, got {seq_len}, {block_size}")
    if seq_len % block_size:
        raise ValueError(f"seq_len ({seq_len}) must be divisible by block_size ({block_size})")


def make_mask_mod(seq_len: int, block_size: int):
    """``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` over [0, 2L) written with tensor ops only (flex-compatible)."""
    _check(seq_len, block_size)

    def mask_mod(b, h, q_idx, kv_idx):
        q_clean = q_idx >= seq_len
        k_clean = kv_idx >= seq_len
        q_blk = (q_idx - q_clean * seq_len) // block_size
        k_blk = (kv_idx - k_clean * seq_len) // block_size
        diagonal = (q_blk == k_blk) & (q_clean == k_clean)
        offset_causal = ~q_clean & k_clean & (k_blk < q_blk)
        causal = q_clean & k_clean & (k_blk <= q_blk)
        return diagonal | offset_causal | causal

    return mask_mod


@functools.lru_cache(maxsize=64)
def _dense(seq_len: int, block_size: int, device: str) -> torch.Tensor:
    idx = torch.arange(2 * seq_len, device=device)
    return make_mask_mod(seq_len, block_size)(None, None, idx[:, None], idx[None, :])


def bd3_mask(seq_len: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Dense [2L, 2L] bool mask, True where the query may attend the key. Cached: do not modify it."""
    _check(seq_len, block_size)
    return _dense(seq_len, block_size, str(torch.device(device or "cpu")))


def block_causal_mask(seq_len: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[L, L] mask of the clean stream alone (key block <= query block): the clean half's slice of the BD3 mask."""
    return bd3_mask(seq_len, block_size, device)[seq_len:, seq_len:]


def mask_density(seq_len: int, block_size: int) -> float:
    return bd3_mask(seq_len, block_size).float().mean().item()


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=16)
def _flex(seq_len: int, block_size: int, device: str, tile: int):
    from torch.nn.attention.flex_attention import create_block_mask

    n = 2 * seq_len
    return create_block_mask(make_mask_mod(seq_len, block_size), B=None, H=None, Q_LEN=n, KV_LEN=n, device=device,
                             BLOCK_SIZE=tile)


def flex_block_mask(seq_len: int, block_size: int, device: torch.device | str, block_tile: int = 128):
    """FlexAttention BlockMask of the BD3 mask (tiles fully inside the mask skip mask_mod; empty tiles are skipped)."""
    _check(seq_len, block_size)
    return _flex(seq_len, block_size, str(torch.device(device)), block_tile)


def effective_dense(block_mask, mask_mod, n: int) -> torch.Tensor:
    """What a BlockMask lets through, element by element: full tiles pass entirely, partial tiles apply
    ``mask_mod``, absent tiles block. (``BlockMask.to_dense()`` alone is tile-granular.)"""
    tiles = block_mask.to_dense()[0, 0].bool()  # [q_tiles, kv_tiles], partial or full
    q_tile, kv_tile = block_mask.BLOCK_SIZE
    full = torch.zeros_like(tiles)
    if block_mask.full_kv_num_blocks is not None:
        counts = block_mask.full_kv_num_blocks[0, 0]
        idx = block_mask.full_kv_indices[0, 0]
        for qt in range(tiles.shape[0]):
            full[qt, idx[qt, : counts[qt]]] = True
    idx = torch.arange(n)
    elem = mask_mod(None, None, idx[:, None], idx[None, :])
    tile_of_q = (idx // q_tile)[:, None]
    tile_of_k = (idx // kv_tile)[None, :]
    present = tiles[tile_of_q, tile_of_k]
    is_full = full[tile_of_q, tile_of_k]
    return is_full | (present & elem)
