"""The vectorised x_t ⊕ x0 forward against independent references on a tiny megatron-core model (fp32)."""

from __future__ import annotations

import pytest
import torch

from bd3_megatron.diffusion import ClipWindow, block_causal_mask, corrupt, get_schedule, nelbo, nelbo_weights
from tests.helpers import MASK_ID, random_tokens, tiny_model


def naive_block_ce(model, xt, x0, block_size):
    """For each block b: run the model on clean x0[<b] followed by noisy xt[b] under an ordinary block-causal mask
    (positions 0..), and read the CE of block b's masked tokens. No 2L layout, no BD3 mask."""
    b, seq = x0.shape
    ce = torch.zeros(b, seq)
    for blk in range(seq // block_size):
        lo, hi = blk * block_size, (blk + 1) * block_size
        ids = torch.cat([x0[:, :lo], xt[:, lo:hi]], dim=1)
        hidden = model.encode(ids, torch.arange(hi), block_causal_mask(hi, block_size))  # [hi, b, h]
        h_blk = hidden[lo:hi].transpose(0, 1)  # [b, L', h]
        masked = xt[:, lo:hi] == MASK_ID
        if masked.any():
            vals = model.output_layer(h_blk[masked], labels=x0[:, lo:hi][masked]).ce
            ce[:, lo:hi] = torch.zeros(b, block_size).masked_scatter(masked, vals)
    return ce


@pytest.mark.parametrize("seq_len,block_size", [(16, 4), (16, 1), (16, 16), (12, 3)])
def test_vectorised_loss_equals_naive_per_block_loop(mcore, seq_len, block_size):
    torch.manual_seed(0)
    model = tiny_model(seq_len, block_size)
    x0 = random_tokens(3, seq_len)
    c = corrupt(
        x0,
        torch.arange(3),
        step=0,
        seed=5,
        block_size=block_size,
        window=ClipWindow(0.2, 0.9),
        mask_token_id=MASK_ID,
        global_batch_size=3,
    )
    assert c.masked.any() and (~c.masked).any()
    with torch.no_grad():
        fast = model(c.xt, x0, c.masked).ce
        slow = naive_block_ce(tiny_model(seq_len, block_size, noisy_half_last_layer=False), c.xt, x0, block_size)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    weight = nelbo_weights(c.masked, c.t_tokens, get_schedule("loglinear"))
    torch.testing.assert_close(
        nelbo(fast, weight, fast.numel()).loss,
        nelbo(slow, weight, slow.numel()).loss,
        rtol=1e-5,
        atol=1e-6,
    )


def test_block_size_one_with_window_one_is_autoregressive_nll(mcore):
    """L'=1, t ≡ 1: every token is masked and sees exactly the clean prefix, so the NELBO is the AR NLL."""
    seq_len = 12
    model = tiny_model(seq_len, block_size=1)
    x0 = random_tokens(2, seq_len, seed=3)
    c = corrupt(
        x0,
        torch.arange(2),
        step=0,
        seed=1,
        block_size=1,
        window=ClipWindow(1.0, 1.0),
        mask_token_id=MASK_ID,
        global_batch_size=2,
    )
    assert c.masked.all() and torch.all(c.t == 1.0)
    with torch.no_grad():
        ce = model(c.xt, x0, c.masked).ce
        bound = nelbo(ce, nelbo_weights(c.masked, c.t_tokens, get_schedule("loglinear")), ce.numel()).loss
        model = tiny_model(seq_len, block_size=1, noisy_half_last_layer=False)  # same weights, every row returned
        nll = []
        for pos in range(seq_len):  # one forward per position: prefix x0[<pos] then a mask token
            ids = torch.cat([x0[:, :pos], torch.full((2, 1), MASK_ID)], dim=1)
            hidden = model.encode(ids, torch.arange(pos + 1), block_causal_mask(pos + 1, 1))
            nll.append(model.output_layer(hidden[pos], labels=x0[:, pos]).ce)
        ar = torch.stack(nll, dim=1).mean()
    torch.testing.assert_close(bound, ar, rtol=1e-5, atol=1e-6)


def test_clean_half_and_other_noisy_blocks_cannot_leak(mcore):
    """Changing noisy block 2 leaves blocks 0,1 untouched; changing clean block 0 changes noisy blocks > 0 only."""
    model = tiny_model(16, 4)
    x0 = random_tokens(1, 16)
    xt = x0.clone()
    xt[:, ::2] = MASK_ID
    masked = xt == MASK_ID
    with torch.no_grad():
        base = model(xt, x0, masked).ce
        xt2 = xt.clone()
        xt2[:, 9] = (xt2[:, 9] + 1) % MASK_ID  # an unmasked token of noisy block 2
        other = model(xt2, x0, masked).ce
        assert torch.equal(base[:, :8], other[:, :8]) and not torch.equal(base[:, 8:12], other[:, 8:12])
        x0b = x0.clone()
        x0b[:, 1] = (x0b[:, 1] + 1) % MASK_ID  # a token of clean block 0
        changed = model(xt, x0b, masked).ce
        assert torch.equal(base[:, :4].masked_fill(masked[:, :4], 0), changed[:, :4].masked_fill(masked[:, :4], 0))
        assert not torch.allclose(base[:, 4:], changed[:, 4:])


def test_flex_forward_equals_sdpa_on_cpu(mcore):
    """The flex BlockMask path (eager, forward only on CPU) gives the same CE as dense SDPA."""
    sdpa = tiny_model(128, 8, backend="sdpa")
    flex = tiny_model(128, 8, backend="flex")
    x0 = random_tokens(2, 128, seed=7)
    c = corrupt(
        x0,
        torch.arange(2),
        step=3,
        seed=2,
        block_size=8,
        window=ClipWindow(),
        mask_token_id=MASK_ID,
        global_batch_size=2,
    )
    with torch.no_grad():
        torch.testing.assert_close(flex(c.xt, x0, c.masked).ce, sdpa(c.xt, x0, c.masked).ce, rtol=1e-4, atol=1e-5)


def test_head_never_predicts_mask_or_padding(mcore):
    model = tiny_model(8, 4)
    x0 = random_tokens(1, 8)
    with torch.no_grad():
        logits = model.head_logits(torch.randn(5, 32))
    assert logits.shape[-1] == model.padded_vocab >= 61
    assert torch.isinf(logits[:, MASK_ID]).all() and torch.isinf(logits[:, 61:]).all()
    assert torch.isfinite(logits[:, :MASK_ID]).all()
    full = model.block_logits(x0, x0, 4, 8)
    assert full.shape == (1, 4, 61)


def test_initialisation_is_keyed_by_name_and_seed(mcore):
    a, b, c = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=1)
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
        if p.dim() > 1:
            assert not torch.equal(p, r), n


def test_noisy_half_last_layer_equals_the_full_layer_on_the_noisy_half(mcore):
    """The last layer computes noisy queries only: same noisy-half outputs, loss and every gradient as the full
    layer whose clean-half rows are thrown away."""
    fast, full = tiny_model(16, 4), tiny_model(16, 4, noisy_half_last_layer=False)
    x0 = random_tokens(3, 16, seed=11)
    c = corrupt(
        x0,
        torch.arange(3),
        step=2,
        seed=4,
        block_size=4,
        window=ClipWindow(),
        mask_token_id=MASK_ID,
        global_batch_size=3,
    )
    weight = torch.where(c.masked, 1.0 / c.t_tokens, torch.zeros_like(c.t_tokens))
    h_fast, seq = fast._stream_hidden(c.xt, x0)
    h_full, _ = full._stream_hidden(c.xt, x0)
    assert h_fast.shape[0] == seq == 16 and h_full.shape[0] == 32
    torch.testing.assert_close(h_fast, h_full[:seq], rtol=1e-5, atol=1e-6)
    out_fast, out_full = fast(c.xt, x0, c.masked, weight), full(c.xt, x0, c.masked, weight)
    torch.testing.assert_close(out_fast.nelbo_sum, out_full.nelbo_sum, rtol=1e-5, atol=0)
    out_fast.nelbo_sum.backward()
    out_full.nelbo_sum.backward()
    for (name, p), (_, q) in zip(fast.named_parameters(), full.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recomputed_layers_give_the_same_loss_and_gradients(mcore, dropout):
    """model.recompute (non-reentrant checkpoint of each layer) changes memory, not math: same loss and every
    gradient, dropout included (the recomputation replays the same dropout draws)."""
    x0 = random_tokens(3, 16, seed=5)
    c = corrupt(
        x0,
        torch.arange(3),
        step=1,
        seed=8,
        block_size=4,
        window=ClipWindow(),
        mask_token_id=MASK_ID,
        global_batch_size=3,
    )
    weight = torch.where(c.masked, 1.0 / c.t_tokens, torch.zeros_like(c.t_tokens))
    grads, losses = [], []
    for recompute in (False, True):
        model = tiny_model(16, 4, recompute=recompute, dropout=dropout).train()
        torch.manual_seed(123)  # the same dropout draws in both runs
        out = model(c.xt, x0, c.masked, weight)
        out.nelbo_sum.backward()
        losses.append(out.nelbo_sum.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_recomputation_takes_the_flex_block_mask(mcore):
    """The flex BlockMask passes through the recomputed layers (megatron's CheckpointFunction refused it:
    save_for_backward takes tensors only). CPU flex has no backward, so the parameters are frozen here: the
    checkpoint still runs, with the BlockMask among its arguments, and gives the eager CE."""
    recomputed, plain = tiny_model(128, 8, backend="flex", recompute=True), tiny_model(128, 8, backend="flex")
    x0 = random_tokens(2, 128, seed=3)
    c = corrupt(
        x0,
        torch.arange(2),
        step=0,
        seed=1,
        block_size=8,
        window=ClipWindow(),
        mask_token_id=MASK_ID,
        global_batch_size=2,
    )
    for model in (recomputed, plain):
        model.train().requires_grad_(False)
    with torch.enable_grad():
        torch.testing.assert_close(
            recomputed(c.xt, x0, c.masked).ce, plain(c.xt, x0, c.masked).ce, rtol=1e-5, atol=1e-6
        )
