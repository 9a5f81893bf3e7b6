"""The fused, chunked head + cross-entropy against the plain route (linear, SUBS -inf fill, full-vocab CE)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bd3_megatron.model.head import chunk_tokens_for, linear_cross_entropy


def plain(hidden, weight, labels, never, loss_weight):
    logits = F.linear(hidden, weight).float().masked_fill(never, float("-inf"))
    ce = F.cross_entropy(logits, labels, reduction="none")
    return ce, (ce * loss_weight).sum()


@pytest.mark.parametrize("chunk", [1, 3, 7, 0])
def test_fused_value_and_gradients_equal_the_plain_head(chunk):
    gen = torch.Generator().manual_seed(0)
    n, h, v = 7, 16, 37
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=gen)).requires_grad_()
    never = torch.zeros(v, dtype=torch.bool)
    never[[5, 33, 34, 35, 36]] = True  # a mask token and vocabulary padding
    labels = torch.tensor([0, 1, 2, 3, 4, 6, 32])
    loss_weight = torch.rand(n, generator=gen) * 10  # NELBO weights 1/t are large and uneven

    ce, total = linear_cross_entropy(hidden, weight, labels, never, loss_weight=loss_weight, chunk_tokens=chunk)
    total.backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_ce, ref_total = plain(hidden, weight, labels, never, loss_weight)
    ref_total.backward()

    assert not ce.requires_grad
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total, ref_total.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_hidden, hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_weight, weight.grad, rtol=1e-5, atol=1e-6)
    assert torch.all(g_weight[never] == 0)  # never-predicted rows get exactly no gradient


def test_scaled_upstream_gradient_and_no_tokens():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 8, generator=gen, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, requires_grad=True)
    never = torch.zeros(11, dtype=torch.bool)
    labels, lw = torch.tensor([1, 2, 3, 4]), torch.rand(4, generator=gen)
    _, total = linear_cross_entropy(hidden, weight, labels, never, loss_weight=lw, chunk_tokens=2)
    (total / 7.0).backward()  # the trainer divides by b·L; DeepSpeed by the accumulation steps
    g = hidden.grad.clone()
    hidden.grad = None
    (plain(hidden, weight, labels, never, lw)[1] / 7.0).backward()
    torch.testing.assert_close(g, hidden.grad, rtol=1e-5, atol=1e-7)
    # a micro-batch where nothing is masked: empty CE, zero loss, zero gradients
    empty = hidden[:0].detach().requires_grad_()
    ce, total = linear_cross_entropy(empty, weight, labels[:0], never, loss_weight=lw[:0])
    total.backward()
    assert ce.shape == (0,) and float(total) == 0.0 and empty.grad.shape == (0, 8)


def test_values_only_without_weights_and_shape_errors():
    hidden, weight = torch.randn(3, 4), torch.randn(6, 4)
    never = torch.zeros(6, dtype=torch.bool)
    ce, total = linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2]), never)
    torch.testing.assert_close(ce, plain(hidden, weight, torch.tensor([0, 1, 2]), never, torch.ones(3))[0])
    assert float(total) == 0.0
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 1]), never)
    assert chunk_tokens_for(32768) == 256 and chunk_tokens_for(50304, 100) == 100


@pytest.mark.parametrize("chunk", [1, 3, 0])
def test_fused_head_with_a_bias_equals_the_plain_biased_head(chunk):
    """model.arch=bd3lms: the reference head has a bias; value and gradients (bias included) as the plain route."""
    gen = torch.Generator().manual_seed(2)
    n, h, v = 7, 16, 37
    hidden = torch.randn(n, h, generator=gen).requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=gen)).requires_grad_()
    bias = torch.randn(v, generator=gen).requires_grad_()
    never = torch.zeros(v, dtype=torch.bool)
    never[[5, 33, 34, 35, 36]] = True
    labels = torch.tensor([0, 1, 2, 3, 4, 6, 32])
    loss_weight = torch.rand(n, generator=gen) * 10
    ce, total = linear_cross_entropy(
        hidden, weight, labels, never, bias=bias, loss_weight=loss_weight, chunk_tokens=chunk
    )
    total.backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    logits = F.linear(hidden, weight, bias).float().masked_fill(never, float("-inf"))
    ref_ce = F.cross_entropy(logits, labels, reduction="none")
    (ref_ce * loss_weight).sum().backward()
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-6, atol=1e-6)
    for got, t in zip(grads, (hidden, weight, bias), strict=True):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-6)
    assert torch.all(grads[2][never] == 0) and grads[2].abs().sum() > 0


@pytest.mark.parametrize("chunk", [1, 4, 0])
def test_fused_score_entropy_equals_the_sedd_formula_on_dense_logits(chunk):
    """model.mode=sedd: the head's per-token value and gradients are diffusion.sedd's score entropy of the dense log
    scores (an independent, unfused evaluation), padding columns and the mask token excluded, with a head bias."""
    from bd3_megatron.diffusion.sedd import score_entropy, sedd_log_score

    gen = torch.Generator().manual_seed(2)
    n, h, v, real_vocab, mask = 6, 8, 13, 11, 10  # ids 11, 12 are vocabulary padding; 10 the mask token
    hidden = torch.randn(n, h, generator=gen).requires_grad_()
    weight = (0.5 * torch.randn(v, h, generator=gen)).requires_grad_()
    bias = (0.1 * torch.randn(v, generator=gen)).requires_grad_()
    never = torch.zeros(v, dtype=torch.bool)
    never[[10, 11, 12]] = True
    labels = torch.tensor([0, 3, 9, 4, 4, 7])
    sigma = torch.tensor([1e-3, 0.05, 0.7, 2.0, 6.9, 0.3])
    loss_weight = torch.rand(n, generator=gen) * 5

    se, total = linear_cross_entropy(
        hidden,
        weight,
        labels,
        never,
        bias=bias,
        loss_weight=loss_weight,
        chunk_tokens=chunk,
        log_expm1_sigma=torch.log(torch.expm1(sigma)),
        real_tokens=real_vocab - 1,
    )
    total.backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    logits = F.linear(hidden, weight, bias)
    xt = torch.full((n,), mask)
    ref = score_entropy(sedd_log_score(logits, xt, sigma, mask, valid_vocab=real_vocab), sigma, xt, labels, mask)
    (ref * loss_weight).sum().backward()

    torch.testing.assert_close(se, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, (ref * loss_weight).sum().detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, (hidden.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.all(grads[1][never] == 0)
    with pytest.raises(ValueError, match="log_expm1_sigma must be"):
        linear_cross_entropy(hidden, weight, labels, never, log_expm1_sigma=sigma[:2], real_tokens=10)
