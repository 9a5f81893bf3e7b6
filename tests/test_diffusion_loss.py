"""SUBS parameterisation and NELBO bookkeeping on hand-checkable examples."""
from __future__ import annotations

import math

import torch

from bd3_megatron.diffusion import get_schedule, nelbo_from_token_ce, nelbo_sum, subs_log_probs, token_nelbo


def test_nelbo_is_weighted_ce_over_all_tokens():
    ce = torch.tensor([[2.0, 3.0, 4.0, 5.0]])
    masked = torch.tensor([[True, False, True, False]])
    t = torch.tensor([[0.5, 0.5, 0.25, 0.25]])
    sched = get_schedule("loglinear")
    assert torch.equal(token_nelbo(ce, masked, t, sched), torch.tensor([[4.0, 0.0, 16.0, 0.0]]))
    assert nelbo_from_token_ce(ce, masked, t, sched).item() == 5.0  # (2/0.5 + 4/0.25) / 4 tokens
    total, n = nelbo_sum(ce, masked, t, sched)
    assert total.item() == 20.0 and n == 4


def test_schedule_weight_is_minus_alpha_prime_over_one_minus_alpha():
    sched = get_schedule("loglinear")
    t = torch.tensor([0.1, 0.5, 1.0], requires_grad=True)
    alpha = sched.alpha(t)
    (dalpha,) = torch.autograd.grad(alpha.sum(), t)
    torch.testing.assert_close(sched.loss_weight(t), -dalpha / (1 - alpha))


def test_subs_log_probs():
    V, mask_id = 6, 4
    logits = torch.randn(2, 3, V)
    xt = torch.tensor([[mask_id, 2, mask_id], [1, mask_id, 0]])
    lp = subs_log_probs(logits, xt, mask_id, valid_vocab=5)
    probs = lp.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))
    assert torch.all(probs[..., mask_id] == 0) and torch.all(probs[..., 5] == 0)  # never mask, never padding
    assert probs[0, 1, 2] == 1.0 and probs[1, 0, 1] == 1.0 and probs[1, 2, 0] == 1.0  # carry-over point masses
    ref = torch.log_softmax(logits[0, 0].clone().index_fill_(0, torch.tensor([mask_id, 5]), -math.inf), -1)
    torch.testing.assert_close(lp[0, 0], ref)
