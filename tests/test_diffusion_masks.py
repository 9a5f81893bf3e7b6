"""bd3_mask and the flex BlockMask against a brute-force reference written from the definition."""
from __future__ import annotations

import pytest
import torch

from bd3_megatron.diffusion import masks


def brute_force(seq_len: int, block_size: int) -> torch.Tensor:
    n = 2 * seq_len
    out = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            qc, kc = q >= seq_len, k >= seq_len
            qb, kb = (q % seq_len) // block_size, (k % seq_len) // block_size
            same_block = qb == kb and qc == kc  # M_BD
            offset_causal = (not qc) and kc and kb < qb  # M_OBC
            block_causal = qc and kc and kb <= qb  # M_BC
            out[q, k] = same_block or offset_causal or block_causal
    return out


CASES = [(L, d) for L in (1, 2, 4, 6, 8, 12, 16) for d in range(1, L + 1) if L % d == 0]


@pytest.mark.parametrize("seq_len,block_size", CASES)
def test_dense_mask_equals_brute_force(seq_len, block_size):
    assert torch.equal(masks.bd3_mask(seq_len, block_size), brute_force(seq_len, block_size))


def test_semantics_on_a_concrete_layout():
    L, d = 12, 4
    m = masks.bd3_mask(L, d)
    noisy, clean = slice(0, L), slice(L, 2 * L)
    assert not m[clean, noisy].any()  # clean never reads noisy
    for b in range(L // d):
        rows = slice(b * d, (b + 1) * d)
        assert m[rows, b * d:(b + 1) * d].all()  # bidirectional within the noisy block
        assert not m[rows, noisy].clone().index_fill_(1, torch.arange(b * d, (b + 1) * d), False).any()
        assert m[rows, L:L + b * d].all() and not m[rows, L + b * d:].any()  # clean blocks < b only
    assert torch.equal(masks.block_causal_mask(L, d), m[clean, clean])
    assert masks.block_causal_mask(8, 1).equal(torch.ones(8, 8, dtype=torch.bool).tril())


def test_l_prime_equal_l_and_one():
    L = 8
    m = masks.bd3_mask(L, L)
    assert m[:L, :L].all() and not m[:L, L:].any()  # MDLM-like noisy half: sees itself only
    m1 = masks.bd3_mask(L, 1)
    assert torch.equal(m1[:L, L:], torch.ones(L, L, dtype=torch.bool).tril(-1))  # noisy l sees clean < l


@pytest.mark.parametrize("seq_len,block_size", [(4, 3), (0, 1), (8, 0)])
def test_bad_shapes_are_rejected(seq_len, block_size):
    with pytest.raises(ValueError):
        masks.bd3_mask(seq_len, block_size)


def test_density_is_about_a_quarter_for_small_blocks():
    assert 0.24 < masks.mask_density(256, 4) < 0.27


@pytest.mark.skipif(not masks.flex_available(), reason="FlexAttention not available")
@pytest.mark.parametrize("seq_len,block_size,tile", [(128, 4, 128), (128, 16, 128), (128, 128, 128), (64, 4, 32),
                                                     (256, 8, 128), (192, 64, 64)])
def test_flex_block_mask_lets_through_exactly_bd3_mask(seq_len, block_size, tile):
    bm = masks.flex_block_mask(seq_len, block_size, "cpu", block_tile=tile)
    eff = masks.effective_dense(bm, masks.make_mask_mod(seq_len, block_size), 2 * seq_len)
    assert torch.equal(eff, masks.bd3_mask(seq_len, block_size))
    if block_size >= tile:  # whole tiles inside blocks are marked full, so they skip mask_mod
        assert bm.full_kv_num_blocks is not None and bm.full_kv_num_blocks.sum() > 0


@pytest.mark.skipif(not masks.flex_available(), reason="FlexAttention not available")
def test_flex_attention_forward_equals_sdpa():
    from torch.nn.attention.flex_attention import flex_attention

    L, d = 128, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 2 * L, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=masks.bd3_mask(L, d))
        out = flex_attention(q, k, v, block_mask=masks.flex_block_mask(L, d, "cpu"))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
