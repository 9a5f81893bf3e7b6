"""The BD3 mask: dense mask, clean-stream mask, density and FlexAttention BlockMask against a brute-force reference
written from the definition (pure Python, independent of mask_mod)."""

from __future__ import annotations

import pytest
import torch

from bd3_megatron.diffusion import masks


def brute_force(seq_len: int, block_size: int) -> list[list[bool]]:
    """allowed(q, k) over [0, 2L), straight from the three-part definition."""
    n = 2 * seq_len
    out = [[False] * n for _ in range(n)]
    for q in range(n):
        for k in range(n):
            half_q, half_k = int(q >= seq_len), int(k >= seq_len)
            blk_q, blk_k = (q % seq_len) // block_size, (k % seq_len) // block_size
            m_bd = blk_q == blk_k and half_q == half_k
            m_obc = half_q == 0 and half_k == 1 and blk_k < blk_q
            m_bc = half_q == 1 and half_k == 1 and blk_k <= blk_q
            out[q][k] = m_bd or m_obc or m_bc
    return out


CASES = [(L, d) for L in (1, 2, 4, 6, 8, 12, 16) for d in range(1, L + 1) if L % d == 0]


@pytest.mark.parametrize("seq_len,block_size", CASES)
def test_dense_mask_equals_brute_force(seq_len, block_size):
    m = masks.bd3_mask(seq_len, block_size)
    assert m.dtype == torch.bool and m.shape == (2 * seq_len, 2 * seq_len)
    assert m.tolist() == brute_force(seq_len, block_size)
    clean = [row[seq_len:] for row in brute_force(seq_len, block_size)[seq_len:]]
    assert masks.block_causal_mask(seq_len, block_size).tolist() == clean


def test_semantics_on_a_concrete_layout():
    L, d = 12, 4
    m = masks.bd3_mask(L, d)
    noisy, clean = slice(0, L), slice(L, 2 * L)
    assert not m[clean, noisy].any()  # clean never attends noisy
    for b in range(L // d):
        rows = slice(b * d, (b + 1) * d)
        own = torch.zeros(L, dtype=torch.bool)
        own[b * d : (b + 1) * d] = True
        assert m[rows, noisy].equal(own.expand(d, L))  # noisy block b sees exactly noisy block b
        sees_clean = torch.zeros(L, dtype=torch.bool)
        sees_clean[: b * d] = True
        assert m[rows, clean].equal(sees_clean.expand(d, L))  # and exactly the clean blocks < b
        clean_rows = slice(L + b * d, L + (b + 1) * d)
        assert m[clean_rows, clean].equal(torch.arange(L).lt((b + 1) * d).expand(d, L))  # clean: blocks <= b


def test_block_size_limits():
    L = 8
    m = masks.bd3_mask(L, L)
    assert m[:L, :L].all() and not m[:L, L:].any()  # L' = L: noisy half is MDLM-like, sees no clean token
    m1 = masks.bd3_mask(L, 1)
    assert m1[:L, L:].equal(torch.ones(L, L, dtype=torch.bool).tril(-1))  # noisy l reads clean < l
    assert m1[:L, :L].equal(torch.eye(L, dtype=torch.bool))
    assert masks.block_causal_mask(L, 1).equal(torch.ones(L, L, dtype=torch.bool).tril())  # AR causal mask
    assert masks.block_causal_mask(L, L).all()


def test_mask_mod_broadcasts_and_is_cached():
    mod = masks.make_mask_mod(8, 2)
    q = torch.arange(16)[:, None]
    k = torch.arange(16)[None, :]
    assert mod(None, None, q, k).equal(masks.bd3_mask(8, 2))
    assert masks.bd3_mask(8, 2) is masks.bd3_mask(8, 2, device="cpu")  # cached per (L, L', device)
    assert masks.block_causal_mask(8, 2).is_contiguous()


@pytest.mark.parametrize("seq_len,block_size", [(256, 4), (64, 1), (96, 32), (16, 16), (1000, 8)])
def test_density_matches_closed_form(seq_len, block_size):
    nb = seq_len // block_size
    # noisy diagonal nb*L'^2, offset-causal L'^2*nb(nb-1)/2, clean block-causal L'^2*nb(nb+1)/2 over (2L)^2
    assert masks.mask_density(seq_len, block_size) == pytest.approx((nb + 1) / (4 * nb), abs=1e-12)
    assert masks.mask_density(seq_len, block_size, chunk_rows=7) == masks.mask_density(seq_len, block_size)


@pytest.mark.parametrize("seq_len,block_size", [(4, 3), (0, 1), (8, 0), (-4, 2), (6, 4)])
def test_bad_shapes_are_rejected(seq_len, block_size):
    for fn in (masks.bd3_mask, masks.block_causal_mask, masks.make_mask_mod, masks.mask_density):
        with pytest.raises(ValueError, match="seq_len"):
            fn(seq_len, block_size)


needs_flex = pytest.mark.skipif(not masks.flex_available(), reason="FlexAttention not available")


@needs_flex
@pytest.mark.parametrize(
    "seq_len,block_size,tile",
    [
        (128, 4, 128),
        (128, 16, 128),
        (128, 128, 128),
        (256, 4, 128),
        (256, 128, 128),
        (256, 256, 128),
        (64, 4, 128),
        (64, 16, 128),
        (64, 64, 128),
        (64, 4, 32),
        (64, 16, 16),
        (96, 8, 128),
        (192, 64, 64),
    ],
)
def test_flex_block_mask_lets_through_exactly_bd3_mask(seq_len, block_size, tile):
    bm = masks.flex_block_mask(seq_len, block_size, "cpu", block_tile=tile)
    assert (tile, tile) == bm.BLOCK_SIZE
    eff = masks.effective_dense(bm, masks.make_mask_mod(seq_len, block_size), 2 * seq_len)
    assert eff.equal(masks.bd3_mask(seq_len, block_size))
    assert masks.effective_dense(bm).equal(eff)  # defaults: the BlockMask's own mask_mod and length
    if block_size >= tile:  # whole tiles inside one block are full, so they skip mask_mod
        assert bm.full_kv_num_blocks.sum() > 0
    assert masks.flex_block_mask(seq_len, block_size, "cpu", block_tile=tile) is bm  # built once


@needs_flex
def test_effective_dense_detects_a_wrong_block_mask():
    bm = masks.flex_block_mask(128, 4, "cpu")
    wrong_elements = masks.effective_dense(bm, masks.make_mask_mod(128, 8), 256)
    assert not wrong_elements.equal(masks.bd3_mask(128, 4))
    other_tiles = masks.flex_block_mask(128, 128, "cpu", block_tile=32)  # full tiles where L'=4 has partial ones
    assert not masks.effective_dense(other_tiles, masks.make_mask_mod(128, 4), 256).equal(masks.bd3_mask(128, 4))


@needs_flex
@pytest.mark.parametrize("block_size", [4, 16, 128])
def test_flex_attention_forward_equals_sdpa(block_size):
    from torch.nn.attention.flex_attention import flex_attention

    L = 128
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 2 * L, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=masks.bd3_mask(L, block_size))
        out = flex_attention(q, k, v, block_mask=masks.flex_block_mask(L, block_size, "cpu"))
        unmasked = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - unmasked).abs().max() > 1e-2  # the mask really changes the result


@needs_flex
def test_flex_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        masks.flex_block_mask(10, 4, "cpu")
    with pytest.raises(ValueError, match="block_tile"):
        masks.flex_block_mask(8, 4, "cpu", block_tile=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_equal_cpu_masks():
    assert masks.bd3_mask(64, 4, "cuda").cpu().equal(masks.bd3_mask(64, 4))
    if masks.flex_available():
        bm = masks.flex_block_mask(128, 16, "cuda")
        assert masks.effective_dense(bm).cpu().equal(masks.bd3_mask(128, 16))
