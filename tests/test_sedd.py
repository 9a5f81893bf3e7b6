"""Absorbing-state SEDD math (bd3_megatron/diffusion/sedd.py) against independent evaluations.

Independent routes used here: the forward transition and its inverse come from torch.linalg.matrix_exp of the
absorbing generator (not from the closed forms in the module); the score entropy is evaluated by Python loops over
positions and target tokens in Lou et al.'s general form; the bound is integrated exactly (Gauss-Legendre, the
integrand is a polynomial in t) over every masking pattern of a tiny 3-token language whose joint distribution is
known, and compared with the exact NLL; the sampler is run with the exact scores of that language.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bd3_megatron.diffusion.sedd import (
    SEDD_NOISE_EPS,
    SEDDLogLinearNoise,
    analytic_sample,
    analytic_timesteps,
    analytic_update_probs,
    denoiser_update_probs,
    sample_categorical,
    score_entropy,
    scores_for_sampling,
    sedd_log_score,
    sedd_token_nelbo,
    staggered_score,
    transp_transition,
)

F64 = torch.float64
NOISE = SEDDLogLinearNoise()


def generator_matrix(vocab: int, mask: int) -> torch.Tensor:
    """The absorbing generator Q [V, V], rows = from: every real token moves to M at rate 1."""
    q = torch.zeros(vocab, vocab, dtype=F64)
    for y in range(vocab):
        if y != mask:
            q[y, y], q[y, mask] = -1.0, 1.0
    return q


# ---------------------------------------------------------------------------------------------- schedule
def test_schedule_matches_its_definitions():
    t = torch.tensor([1e-3, 0.1, 0.5, 0.9, 0.998], dtype=F64, requires_grad=True)
    sigma = NOISE.total_noise(t)
    torch.testing.assert_close(sigma, -torch.log(1 - (1 - 1e-3) * t))
    (grad,) = torch.autograd.grad(sigma.sum(), t)
    torch.testing.assert_close(NOISE.rate_noise(t), grad)
    assert NOISE.total_noise(torch.tensor(1.0, dtype=F64)).item() == pytest.approx(-math.log(1e-3), rel=1e-12)
    # the clip value is the reference's float32 evaluation of the same expression
    assert NOISE.sigma_max == pytest.approx(-math.log(1e-3), rel=1e-5) and NOISE.sigma_max != -math.log(1e-3)
    assert NOISE.sigma_max == NOISE.total_noise(torch.tensor(1.0, dtype=torch.float32)).item()
    with pytest.raises(ValueError, match="eps"):
        SEDDLogLinearNoise(eps=0.0)


def test_reference_sigma_and_rate_below_and_above_the_clip():
    t = torch.tensor([1e-3, 0.25, 0.5, 0.99, 0.9989], dtype=F64, requires_grad=True)
    sigma, dsigma = NOISE.sigma_dsigma(t)
    torch.testing.assert_close(torch.exp(-sigma), 1 - t)  # the move chance is t itself
    (grad,) = torch.autograd.grad(sigma.sum(), t)
    torch.testing.assert_close(dsigma, grad)  # dsigma = d sigma / dt below the clip
    torch.testing.assert_close(dsigma, 1 / (1 - t.detach()))
    top = torch.tensor([0.9995, 1.0], dtype=F64)
    sigma, dsigma = NOISE.sigma_dsigma(top)
    torch.testing.assert_close(sigma, torch.full_like(top, NOISE.sigma_max))  # finite at t = 1
    torch.testing.assert_close(dsigma, math.expm1(NOISE.sigma_max) / top)
    assert math.expm1(NOISE.sigma_max) == pytest.approx(1 / 1e-3 - 1, rel=2e-5)


# ---------------------------------------------------------------------------------------------- parameterisation
def test_log_score_parameterisation_by_hand():
    vocab, mask = 5, 4
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, vocab, generator=g, dtype=F64)
    xt = torch.tensor([[4, 1, 4], [0, 4, 2]])
    sigma = torch.tensor([0.3, 2.0], dtype=F64)
    got = sedd_log_score(logits, xt, sigma, mask)
    for b in range(2):
        for i in range(3):
            for y in range(vocab):
                want = 0.0 if y == xt[b, i] else math.log(math.exp(logits[b, i, y]) / (4 * math.expm1(sigma[b])))
                assert got[b, i, y].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    # sigma given per token ([b, L]) or per sequence ([b, 1]) means the same
    torch.testing.assert_close(sedd_log_score(logits, xt, sigma[:, None].expand(2, 3), mask), got)
    torch.testing.assert_close(sedd_log_score(logits, xt, sigma[:, None], mask), got)
    # padded columns score 0 and V counts only the real vocabulary
    padded = torch.cat([logits, torch.randn(2, 3, 3, generator=g, dtype=F64)], -1)
    pad_out = sedd_log_score(padded, xt, sigma, mask, valid_vocab=vocab)
    torch.testing.assert_close(pad_out[..., :vocab], got)
    assert torch.isneginf(pad_out[..., vocab:]).all()
    assert sedd_log_score(logits.float(), xt, sigma, mask).dtype == torch.float32
    with pytest.raises(ValueError, match="leading dims"):
        sedd_log_score(logits, xt[:, :2], sigma, mask)
    with pytest.raises(ValueError, match="mask_token_id"):
        sedd_log_score(logits, xt, sigma, 5)
    with pytest.raises(ValueError, match="broadcast"):
        sedd_log_score(logits, xt, torch.ones(3, dtype=F64), mask)


# ---------------------------------------------------------------------------------------------- score entropy
def _dse_by_loops(log_score, sigma, xt, x0, mask):
    """Lou et al.'s denoising score entropy, general form, with the forward kernel from matrix_exp:
    sum_{y != x_t} Q(y -> x_t) [s(y) - R(y) log s(y) + K(R(y))], R(y) = P_sigma(x0 -> y) / P_sigma(x0 -> x_t),
    K(a) = a (log a - 1), K(0) = 0."""
    b, n, vocab = log_score.shape
    q = generator_matrix(vocab, mask)
    out = torch.zeros(b, n, dtype=F64)
    for r in range(b):
        kernel = torch.linalg.matrix_exp(float(sigma[r]) * q)  # kernel[a, c] = P(a -> c)
        for i in range(n):
            x, z = int(xt[r, i]), int(x0[r, i])
            total = 0.0
            for y in range(vocab):
                if y == x or q[y, x] == 0:
                    continue
                ratio = float(kernel[z, y] / kernel[z, x])
                s = math.exp(float(log_score[r, i, y]))
                k = ratio * (math.log(ratio) - 1) if ratio > 0 else 0.0
                total += float(q[y, x]) * (s - (ratio * float(log_score[r, i, y]) if ratio > 0 else 0.0) + k)
            out[r, i] = total
    return out


def test_score_entropy_equals_the_general_formula_by_loops():
    vocab, mask = 6, 2  # the mask id in the middle of the vocabulary
    g = torch.Generator().manual_seed(1)
    b, n = 3, 5
    x0 = torch.randint(0, vocab - 1, (b, n), generator=g)
    x0 = torch.where(x0 >= mask, x0 + 1, x0)  # real tokens only
    masked = torch.rand(b, n, generator=g) < 0.6
    masked[0, 0] = True
    xt = torch.where(masked, mask, x0)
    sigma = torch.tensor([0.05, 1.3, 6.0], dtype=F64)
    logits = 2 * torch.randn(b, n, vocab, generator=g, dtype=F64)
    log_score = sedd_log_score(logits, xt, sigma, mask)
    got = score_entropy(log_score, sigma, xt, x0, mask)
    want = _dse_by_loops(log_score, sigma, xt, x0, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (got[~masked] == 0).all() and (got[masked] > 0).all()
    dsigma = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    torch.testing.assert_close(sedd_token_nelbo(log_score, sigma, dsigma, xt, x0, mask), dsigma[:, None] * want)


def test_score_entropy_vanishes_at_the_true_ratio_and_is_positive_elsewhere():
    vocab, mask = 4, 3
    x0 = torch.tensor([[0, 2, 1]])
    xt = torch.full_like(x0, mask)
    sigma = torch.tensor([0.7], dtype=F64)
    true = torch.full((1, 3, vocab), float("-inf"), dtype=F64)
    true[0, torch.arange(3), x0[0]] = -math.log(math.expm1(0.7))  # s(x0) = 1 / expm1(sigma), 0 elsewhere
    true[..., mask] = 0.0
    torch.testing.assert_close(score_entropy(true, sigma, xt, x0, mask), torch.zeros(1, 3, dtype=F64))
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        other = true.clone()
        other[0, torch.arange(3), x0[0]] += torch.randn(3, generator=g, dtype=F64)
        assert (score_entropy(other, sigma, xt, x0, mask) > 0).all()


def test_clean_positions_leak_into_neither_value_nor_gradient():
    vocab, mask = 4, 3
    log_score = torch.zeros(1, 3, vocab, dtype=F64)
    log_score[0, 1] = float("nan")
    log_score[0, 2] = float("inf")
    log_score.requires_grad_(True)
    xt = torch.tensor([[mask, 1, 2]])
    x0 = torch.tensor([[0, 1, 2]])
    loss = sedd_token_nelbo(log_score, torch.tensor([1.0], dtype=F64), torch.tensor([2.0], dtype=F64), xt, x0, mask)
    assert torch.isfinite(loss).all() and (loss[0, 1:] == 0).all()
    loss.sum().backward()
    assert torch.isfinite(log_score.grad).all() and (log_score.grad[0, 1:] == 0).all()
    # gradient at the masked position: d/dl [dsigma (sum_{y != M} e^l - r l_x0)] = dsigma (e^l - r 1[y = x0])
    r = 1 / math.expm1(1.0)
    torch.testing.assert_close(log_score.grad[0, 0], torch.tensor([2 * (1 - r), 2.0, 2.0, 0.0], dtype=F64))


# ---------------------------------------------------------------------------------------------- the bound
N_POS, N_TOK = 3, 3  # a language of 3 positions over 3 real tokens; M = 3, V = 4
MASK, VOCAB = N_TOK, N_TOK + 1
OUTCOMES = torch.tensor(list(itertools.product(range(N_TOK), repeat=N_POS)))  # [27, 3]


def tiny_language(seed: int = 0) -> torch.Tensor:
    """A strongly correlated joint distribution p [27] over OUTCOMES (far from the product of its marginals)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(len(OUTCOMES), generator=g, dtype=F64) * 0.1
    all_equal = (OUTCOMES[:, 0] == OUTCOMES[:, 1]) & (OUTCOMES[:, 1] == OUTCOMES[:, 2])
    w[all_equal] += torch.tensor([3.0, 2.0, 1.0], dtype=F64)
    return w / w.sum()


def exact_conditionals(p: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """c [..., n, K]: p(x0_i = y | the unmasked tokens of xt) for every position i, by enumeration."""
    consistent = ((xt[..., None, :] == MASK) | (xt[..., None, :] == OUTCOMES)).all(-1)  # [..., 27]
    w = p * consistent
    onehot = torch.nn.functional.one_hot(OUTCOMES, N_TOK).to(F64)  # [27, n, K]
    c = torch.einsum("...o,onk->...nk", w, onehot)
    return c / c.sum(-1, keepdim=True)


def exact_logits(p: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """Backbone logits [..., n, V] whose SEDD log scores are the exact ones: log c + log(V - 1) (M's column -inf)."""
    c = exact_conditionals(p, xt)
    out = torch.cat([torch.log(c) + math.log(VOCAB - 1), torch.full((*c.shape[:-1], 1), -math.inf, dtype=F64)], -1)
    return out


PATTERNS = torch.tensor(list(itertools.product([False, True], repeat=N_POS)))  # [8, n]


def expected_integrand(logits_fn, t: torch.Tensor) -> torch.Tensor:
    """E_mask[sum over positions of dsigma * DSE] for every x0 and t: [len(t), 27], masking each token w.p. t."""
    sigma, dsigma = NOISE.sigma_dsigma(t)
    k = PATTERNS.sum(-1)
    prob = t[:, None] ** k * (1 - t[:, None]) ** (N_POS - k)  # [T, 8]
    x0 = OUTCOMES[None, None].expand(len(t), len(PATTERNS), -1, -1)
    xt = torch.where(PATTERNS[None, :, None, :], MASK, x0)  # [T, 8, 27, n]
    sig = sigma[:, None, None, None].expand(xt.shape)
    log_score = sedd_log_score(logits_fn(xt), xt, sig, MASK)
    dsig = dsigma[:, None, None, None].expand(xt.shape)
    terms = sedd_token_nelbo(log_score, sig, dsig, xt, x0, MASK).sum(-1)  # [T, 8, 27]
    return (prob[..., None] * terms).sum(1)


def integrate(logits_fn, lo: float, hi: float) -> torch.Tensor:
    """int_lo^hi of the expected integrand [27]; Gauss-Legendre on each side of the sigma clip, where the
    integrand is a polynomial of degree < n in t, so 8 nodes per piece are exact."""
    nodes, weights = np.polynomial.legendre.leggauss(8)
    clip = 1 - SEDD_NOISE_EPS
    total = torch.zeros(len(OUTCOMES), dtype=F64)
    for a, b in [(lo, min(hi, clip)), (max(lo, clip), hi)]:
        if b <= a:
            continue
        t = torch.tensor((b - a) / 2 * nodes + (a + b) / 2, dtype=F64)
        total += (torch.tensor(weights * (b - a) / 2, dtype=F64)[:, None] * expected_integrand(logits_fn, t)).sum(0)
    return total


def test_bound_with_exact_scores_is_the_exact_nll():
    p = tiny_language()
    nll = -torch.log(p)
    exact = lambda xt: exact_logits(p, xt)  # noqa: E731
    # the continuous-time bound over t in (0, 1) is tight for every sequence
    torch.testing.assert_close(integrate(exact, 0.0, 1.0), nll, rtol=1e-9, atol=1e-9)
    # the reference's estimator averages over t ~ U[1e-3, 1]: within O(1e-3) of the NLL
    eps = SEDD_NOISE_EPS
    ref = integrate(exact, eps, 1.0) / (1 - eps)
    assert torch.allclose(ref, nll, rtol=0, atol=3 * eps * float(nll.max()))
    # and the Monte Carlo estimator as training / eval compute it (t uniform, mask w.p. t) converges to that value
    g = torch.Generator().manual_seed(3)
    draws = 40000
    for j in [0, 13, 26, 5]:
        x0 = OUTCOMES[j].expand(draws, -1)
        t = eps + (1 - eps) * torch.rand(draws, 1, generator=g, dtype=F64)
        xt = torch.where(torch.rand(draws, N_POS, generator=g, dtype=F64) < t, MASK, x0)
        sigma, dsigma = NOISE.sigma_dsigma(t)
        est = sedd_token_nelbo(sedd_log_score(exact_logits(p, xt), xt, sigma, MASK), sigma, dsigma, xt, x0, MASK)
        per_seq = est.sum(-1)
        err = 5 * per_seq.std().item() / math.sqrt(draws)
        assert abs(per_seq.mean().item() - ref[j].item()) < err, (j, per_seq.mean().item(), ref[j].item(), err)


def test_bound_with_any_other_scores_is_above_the_entropy():
    p = tiny_language()
    entropy = float(-(p * torch.log(p)).sum())
    exact_bound = float((p * integrate(lambda xt: exact_logits(p, xt), 0.0, 1.0)).sum())
    assert exact_bound == pytest.approx(entropy, rel=1e-9)
    g = torch.Generator().manual_seed(4)
    for scale in [0.05, 0.5, 2.0]:
        # a fixed perturbation of each (x_t, position, token) cell: a deterministic "model" that is a bit wrong
        noise = scale * torch.randn(VOCAB**N_POS, N_POS, VOCAB, generator=g, dtype=F64)

        def wrong(xt, noise=noise):
            code = (xt * VOCAB ** torch.arange(N_POS)).sum(-1)
            return exact_logits(p, xt) + noise[code]

        bound = float((p * integrate(wrong, 0.0, 1.0)).sum())
        assert bound > entropy + 1e-4 * scale, (scale, bound, entropy)
    # a uniform denoiser (zero logits) gives exactly n log K: each masked token costs log K per unit of 1/t-weight
    uniform = float((p * integrate(lambda xt: torch.zeros(*xt.shape, VOCAB, dtype=F64), 0.0, 1.0)).sum())
    assert uniform == pytest.approx(N_POS * math.log(N_TOK), rel=1e-9)


# ---------------------------------------------------------------------------------------------- sampler
def test_staggered_score_and_transition_are_the_matrix_exponentials():
    vocab, mask = 5, 1
    q = generator_matrix(vocab, mask)
    g = torch.Generator().manual_seed(5)
    score = torch.rand(2, 3, vocab, generator=g, dtype=F64) * 3
    dsigma = torch.tensor([0.2, 1.5], dtype=F64)
    got = staggered_score(score, dsigma, mask)
    for b in range(2):
        torch.testing.assert_close(got[b], score[b] @ torch.linalg.matrix_exp(-float(dsigma[b]) * q))
    xt = torch.tensor([[1, 0, 4], [3, 1, 1]])
    tr = transp_transition(xt, dsigma, vocab, mask)
    for b in range(2):
        kernel = torch.linalg.matrix_exp(float(dsigma[b]) * q)
        for i in range(3):
            torch.testing.assert_close(tr[b, i], kernel[:, xt[b, i]])


def test_update_rows_are_distributions_and_clean_tokens_stay():
    vocab, mask = 6, 5
    g = torch.Generator().manual_seed(6)
    xt = torch.tensor([[5, 0, 5, 3, 5, 5]])
    sigma_t, sigma_s = NOISE.sigma_from_move_chance(torch.tensor([0.6, 0.55], dtype=F64))
    log_score = sedd_log_score(torch.randn(1, 6, vocab, generator=g, dtype=F64), xt, sigma_t[None], mask)
    probs = analytic_update_probs(scores_for_sampling(log_score), xt, (sigma_t - sigma_s)[None], mask)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 6, dtype=F64))
    assert (probs >= 0).all()
    clean = xt != mask
    torch.testing.assert_close(probs[clean], torch.nn.functional.one_hot(xt[clean], vocab).to(F64))
    den = denoiser_update_probs(scores_for_sampling(log_score), xt, sigma_s[None], mask)
    assert (den[..., mask] == 0).all() and (den.sum(-1) > 0).all()
    torch.testing.assert_close(den[clean], torch.nn.functional.one_hot(xt[clean], vocab).to(F64))


def test_with_exact_scores_a_step_is_the_mdlm_step():
    p = tiny_language()
    xt = torch.tensor([[MASK, 1, MASK], [MASK, MASK, MASK], [2, MASK, 0]])
    c = exact_conditionals(p, xt)
    for t, s in [(1.0, 0.9), (0.7, 0.4), (0.2, 0.0001)]:
        tt = torch.full((3,), t, dtype=F64)
        st = torch.full((3,), s, dtype=F64)
        sigma_t, sigma_s = NOISE.sigma_from_move_chance(tt), NOISE.sigma_from_move_chance(st)
        score = scores_for_sampling(sedd_log_score(exact_logits(p, xt), xt, sigma_t, MASK))
        probs = analytic_update_probs(score, xt, sigma_t - sigma_s, MASK)
        masked = xt == MASK
        # move chance at t = 1 is clipped to 1 - eps: the odds use exp(-sigma_max) = 1e-3 there
        te = 1 - math.exp(-float(sigma_t[0]))
        se = 1 - math.exp(-float(sigma_s[0]))
        torch.testing.assert_close(probs[masked][:, :N_TOK], c[masked] * (te - se) / te)
        torch.testing.assert_close(probs[masked][:, MASK], torch.full((int(masked.sum()),), se / te, dtype=F64))
    den = denoiser_update_probs(
        scores_for_sampling(sedd_log_score(exact_logits(p, xt), xt, torch.full((3,), 1e-5, dtype=F64), MASK)),
        xt,
        torch.full((3,), 1e-5, dtype=F64),
        MASK,
    )
    torch.testing.assert_close(den[xt == MASK][:, :N_TOK], c[xt == MASK])


def test_sample_categorical_frequencies_and_negative_weights():
    g = torch.Generator().manual_seed(7)
    w = torch.tensor([0.5, 0.0, 1.5, -0.3], dtype=F64).expand(60000, -1)
    draws = sample_categorical(w, g)
    freq = torch.bincount(draws, minlength=4).to(F64) / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.25, 0.0, 0.75, 0.0], dtype=F64), atol=0.01, rtol=0)


def test_nucleus_scores_follow_the_reference():
    log_score = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=F64))
    torch.testing.assert_close(scores_for_sampling(log_score), torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=F64))
    # cumulative 0.5, 0.8, 0.95, 1.0: p = 0.9 keeps the first two; p = 0.1 keeps the top one
    torch.testing.assert_close(scores_for_sampling(log_score, 0.9), torch.tensor([[0.625, 0.375, 0, 0]], dtype=F64))
    torch.testing.assert_close(scores_for_sampling(log_score, 0.1), torch.tensor([[1.0, 0, 0, 0]], dtype=F64))
    with pytest.raises(ValueError, match="nucleus_p"):
        scores_for_sampling(log_score, 0.0)
    with pytest.raises(ValueError, match="num_steps"):
        analytic_timesteps(0)
    torch.testing.assert_close(analytic_timesteps(4), torch.linspace(1, 1e-5, 5, dtype=F64))


def _tv(p: torch.Tensor, samples: torch.Tensor) -> float:
    code = (samples * N_TOK ** torch.arange(N_POS - 1, -1, -1)).sum(-1)  # OUTCOMES is in lexicographic order
    freq = torch.bincount(code, minlength=len(OUTCOMES)).to(F64) / len(samples)
    return 0.5 * float((freq - p).abs().sum())


def test_sampler_with_exact_scores_reproduces_the_language():
    p = tiny_language()
    calls = []

    def log_score_fn(x, sigma):
        calls.append(1)
        return sedd_log_score(exact_logits(p, x), x, sigma, MASK)

    start = torch.full((20000, N_POS), MASK)
    many = analytic_sample(log_score_fn, start, 64, MASK, generator=torch.Generator().manual_seed(8))
    assert len(calls) == 65 and not (many == MASK).any()
    assert _tv(p, many) < 0.03
    # one step unmasks every token at once from its marginal: the product of marginals, far from p
    one = analytic_sample(log_score_fn, start, 1, MASK, generator=torch.Generator().manual_seed(9))
    assert _tv(p, one) > 0.2
    # a clean start token (the reference's BOS) is carried over and the rest follows p conditioned on it
    start = start.clone()
    start[:, 0] = 2
    cond = analytic_sample(log_score_fn, start, 64, MASK, generator=torch.Generator().manual_seed(10))
    assert (cond[:, 0] == 2).all()
    p_cond = torch.where(OUTCOMES[:, 0] == 2, p, torch.zeros_like(p))
    assert _tv(p_cond / p_cond.sum(), cond) < 0.03
