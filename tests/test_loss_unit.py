"""Schedule, SUBS parameterisation and NELBO bookkeeping on hand-checkable examples."""

from __future__ import annotations

import math

import pytest
import torch

from bd3_megatron.diffusion import (
    ClipWindow,
    LogLinearSchedule,
    get_schedule,
    nelbo,
    nelbo_weights,
    subs_log_probs,
)

SCHED = get_schedule("loglinear")


def test_nelbo_equals_a_hand_computation():
    ce = torch.tensor([[2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 6.0, 8.0]])
    masked = torch.tensor([[True, False, True, False], [False, False, True, True]])
    t = torch.tensor([[0.5, 0.5, 0.25, 0.25], [0.1, 0.1, 0.75, 0.75]])
    expected = torch.tensor([[2 / 0.5, 0.0, 4 / 0.25, 0.0], [0.0, 0.0, 6 / 0.75, 8 / 0.75]])
    weight = nelbo_weights(masked, t, SCHED)
    torch.testing.assert_close(weight, torch.tensor([[2.0, 0.0, 4.0, 0.0], [0.0, 0.0, 4 / 3, 4 / 3]]))
    out = nelbo(ce, weight, ce.numel())
    torch.testing.assert_close(out.terms, expected)
    # mean over all 8 tokens, carried-over ones counting as zero: (4 + 16 + 8 + 32/3) / 8
    assert out.loss.item() == pytest.approx((4 + 16 + 8 + 32 / 3) / 8, rel=1e-6)
    # token-weighted aggregation over two batches equals the loss on their union
    s1, s2 = nelbo(ce[:1], weight[:1], 4).terms.sum(), nelbo(ce[1:], weight[1:], 4).terms.sum()
    assert ((s1 + s2) / 8).item() == pytest.approx(out.loss.item())
    # a fused head's differentiable sum is the numerator when given; the terms still come from ce
    fused = torch.tensor(7.0, requires_grad=True)
    given = nelbo(ce, weight, 8, weighted_sum=fused)
    assert given.loss.item() == pytest.approx(7.0 / 8) and torch.equal(given.terms, out.terms)
    given.loss.backward()
    assert fused.grad.item() == pytest.approx(1 / 8)


def test_unmasked_positions_never_leak_into_value_or_gradient():
    ce = torch.tensor([[1.0, float("inf"), float("nan")]], requires_grad=True)
    masked = torch.tensor([[True, False, False]])
    t = torch.tensor([[0.5, 0.0, 0.0]])  # weight 1/t is inf off the mask: it must not matter
    loss = nelbo(ce, nelbo_weights(masked, t, SCHED), ce.numel()).loss
    assert loss.item() == pytest.approx(2.0 / 3)
    loss.backward()
    assert ce.grad.tolist() == [[pytest.approx(2.0 / 3), 0.0, 0.0]]


def test_nelbo_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one shape"):
        nelbo_weights(torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4), SCHED)
    with pytest.raises(ValueError, match="bool"):
        nelbo_weights(torch.ones(2, 4), torch.ones(2, 4), SCHED)
    with pytest.raises(ValueError, match="one shape"):
        nelbo(torch.ones(2, 4), torch.ones(2, 3), 8)


def test_loglinear_schedule():
    t = torch.tensor([0.1, 0.5, 1.0], requires_grad=True)
    alpha = SCHED.alpha(t)
    (dalpha,) = torch.autograd.grad(alpha.sum(), t)
    torch.testing.assert_close(SCHED.loss_weight(t), -dalpha / (1 - alpha))  # -alpha'/(1 - alpha) = 1/t
    torch.testing.assert_close(SCHED.move_chance(t), 1 - alpha)
    assert isinstance(SCHED, LogLinearSchedule) and SCHED.name == "loglinear"
    with pytest.raises(ValueError, match="unknown noise schedule 'cosine'"):
        get_schedule("cosine")


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (0.5, 0.4), (0.1, 1.5), (float("nan"), 1.0), (-0.1, 0.5)])
def test_clip_window_validation(lo, hi):
    with pytest.raises(ValueError, match="0 < eps_min <= eps_max <= 1"):
        ClipWindow(lo, hi)


def test_clip_window_defaults():
    assert ClipWindow().is_default and ClipWindow(1e-3, 1.0) == ClipWindow()
    assert not ClipWindow(0.3, 0.8).is_default and not ClipWindow(1.0, 1.0).is_default
    with pytest.raises(AttributeError):
        ClipWindow().eps_min = 0.5  # frozen: a window is a value


def test_subs_log_probs_properties():
    V, mask_id = 6, 4
    logits = torch.randn(2, 3, V, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    xt = torch.tensor([[mask_id, 2, mask_id], [1, mask_id, 0]])
    lp = subs_log_probs(logits, xt, mask_id, valid_vocab=5)
    assert lp.dtype == torch.float32 and lp.shape == (2, 3, V)
    probs = lp.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))  # rows are distributions
    assert torch.all(probs[..., mask_id] == 0) and torch.all(probs[..., 5] == 0)  # never mask, never padding
    for b, l in [(0, 1), (1, 0), (1, 2)]:  # carry-over: point mass on the observed token
        assert lp[b, l, xt[b, l]] == 0.0 and torch.isinf(lp[b, l]).sum() == V - 1
    never = torch.tensor([mask_id, 5])
    ref = torch.log_softmax(logits[0, 0].float().index_fill(0, never, -math.inf), -1)
    torch.testing.assert_close(lp[0, 0], ref)  # masked position: softmax over the admissible ids
    all_ids = subs_log_probs(logits, xt, mask_id)  # without valid_vocab the last id is predictable
    assert torch.all(all_ids[0, 0, 5] > -math.inf)


def test_subs_log_probs_rejects_bad_arguments():
    logits, xt = torch.zeros(2, 4), torch.tensor([3, 1])
    with pytest.raises(ValueError, match="mask_token_id"):
        subs_log_probs(logits, xt, 4)
    with pytest.raises(ValueError, match="valid_vocab"):
        subs_log_probs(logits, xt, 3, valid_vocab=5)
    with pytest.raises(ValueError, match="leading dims"):
        subs_log_probs(logits, torch.tensor([3]), 3)
