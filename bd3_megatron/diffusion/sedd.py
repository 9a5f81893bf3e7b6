"""Score entropy discrete diffusion (SEDD) with the absorbing state, as the reference's SEDD baseline computes it.

Source: Lou, Meng & Ermon, "Discrete Diffusion Modeling by Estimating the Ratios of the Data Distribution" (ICML
2024), and its re-implementation in kuleshov-group/bd3lms (``diffusion.py``: ``_sedd_parameterization``,
``_score_entropy``, ``_forward_pass_diffusion``, ``_analytic_update``, ``_denoiser_update``, ``_staggered_score``,
``_transp_transition``; ``noise_schedule.py``: ``LogLinearNoise``; ``configs/algo/sedd.yaml``). The derivations
below are written out here, not copied; every function names the reference behaviour it reproduces.

Notation. V is the vocabulary size *including* the absorbing (mask) token M; a position of x_t is either a clean
token or M. The forward process moves each clean token to M at rate dsigma(t), so after total noise sigma(t) a token
is still clean with probability exp(-sigma) and absorbed with probability 1 - exp(-sigma).

Schedule (the reference's default path, ``mdlm_loss_scale: False``). t ~ U[eps_min, 1] with eps_min = 1e-3; the
move chance (masking probability) is p = t itself; the total noise is sigma = min(-log(1 - p), sigma_max) with
sigma_max = -log(eps) (evaluated in float32, as the reference), eps = 1e-3; the rate is dsigma = expm1(sigma) / t,
which equals d sigma / dt = 1 / (1 - t) wherever sigma is not clipped. SEDD's own form (``total_noise`` and
``rate_noise``, the reference's ``mdlm_loss_scale: True`` path) is sigma(t) = -log(1 - (1 - eps) t),
dsigma(t) = (1 - eps) / (1 - (1 - eps) t).

Scores. For a masked position i of x_t, the concrete score towards token y != M is the ratio
p_t(x_t with y at i) / p_t(x_t) = p_0(x_i = y | unmasked part of x_t) / expm1(sigma) (the clean/absorbed odds
exp(-sigma) / (1 - exp(-sigma)) times the denoising distribution). The network outputs log scores directly:
log s(y) = logits(y) - log expm1(sigma) - log(V - 1), so zero logits mean a uniform denoiser over the V - 1 real
tokens; the log score of the current token x_t itself is set to 0 (score 1, the ratio of x_t to itself).

Loss. The denoising score entropy (Lou et al.'s DSE loss, specialised to the absorbing process) at a masked
position with clean token x0 is
    DSE = sum_{y != M} s(y) - r log s(x0) + r (log r - 1),   r = 1 / expm1(sigma),
where r = p_t(x0 | x0) / p_t(M | x0) = exp(-sigma) / (1 - exp(-sigma)) is the forward ratio, the only non-zero
one; a clean position contributes 0 (no forward transition leads into a clean token). The NELBO integrand per
token is dsigma * DSE and the perplexity bound is exp of its mean over tokens and t (Lou et al.'s likelihood
bound; the reference drops its prior term and averages over t ~ U[1e-3, 1]). With the exact scores
dsigma * DSE = -(1 / t) log p_0(x0_i | unmasked part of x_t) on every masked token, for every t (clip included):
the MDLM integrand, whose integral over t in (0, 1) is exactly -log p_0(x0); the reference's t range moves it by
O(1e-3). log expm1(sigma) cancels between the three terms, so the bound does not depend on sigma beyond what
the network does with it.

Use in a model mode (the reference's SEDD: one t per sequence, i.e. block size L, no clean copy; the backbone is
conditioned on sigma, ``algo.time_conditioning: True``; ``algo.ignore_bos: True`` in training): draw the mask with
:func:`bd3_megatron.diffusion.noise.corrupt` (``block_size = L``, masking probability t), take
``sigma, dsigma = SEDDLogLinearNoise().sigma_dsigma(t)``, run the backbone on (x_t, sigma), and train on
``sedd_token_nelbo(sedd_log_score(logits, x_t, sigma, M), sigma, dsigma, x_t, x0, M).mean()``; the same per-token
terms averaged over a test set (and K noise draws) are the NELBO of the perplexity bound.

Checked against the reference itself (its methods run on the same random tensors, 2026-11-30, float64 inputs):
log scores, the per-token loss (to the reference's float32 loss buffer), sigma and dsigma, the sampler's scores
with and without nucleus filtering, and both update steps agree to within 3e-7.

Sampler (``algo.sampler: analytic``, the reference's SEDD baseline): the Tweedie tau-leaping update of Lou et al.
(absorbing case) over ``num_steps`` uniform steps of t from 1 to eps = 1e-5, then one denoising step at
t = eps that forbids M. All randomness comes from a ``torch.Generator`` the caller passes in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SEDD_NOISE_EPS = 1e-3  # LogLinearNoise(eps=1e-3): sigma_max = -log(1e-3)
SEDD_SAMPLING_EPS = 1e-5  # Diffusion._sample(eps=1e-5): the analytic sampler's last time


@dataclass(frozen=True)
class SEDDLogLinearNoise:
    """The log-linear noise schedule in SEDD's total-noise form (reference ``noise_schedule.LogLinearNoise``).

    ``eps`` keeps the total noise finite at t = 1: sigma(1) = sigma_max = -log(eps). All maps take t as a float
    tensor of any shape (t in [0, 1], dimensionless) and return a tensor of the same shape and dtype.
    """

    eps: float = SEDD_NOISE_EPS

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"SEDD noise eps must lie in (0, 1), got {self.eps}")

    @property
    def sigma_max(self) -> float:
        """Total noise at t = 1, -log(eps), evaluated in float32 as the reference does (``total_noise`` of a float32
        tensor at construction): 6.9077435 for eps = 1e-3, where -log(1e-3) = 6.9077553. The clip then gives the
        reference's sigma and dsigma bit for bit at t near 1."""
        return float(-torch.log1p(torch.tensor(-(1.0 - self.eps), dtype=torch.float32)))

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = -log(1 - (1 - eps) t) (SEDD's log-linear total noise)."""
        return -torch.log1p(-(1.0 - self.eps) * t)

    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:
        """dsigma/dt = (1 - eps) / (1 - (1 - eps) t)."""
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)

    def sigma_from_move_chance(self, p: torch.Tensor) -> torch.Tensor:
        """sigma = min(-log(1 - p), sigma_max) (reference ``_sigma_from_p``); p = 1 gives sigma_max, not inf."""
        return torch.clamp(-torch.log1p(-p), max=self.sigma_max)

    def sigma_dsigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, dsigma) for training and the NELBO, as the reference's default path computes them.

        The move chance is p = t (``LogLinearNoise`` returns (loss_scale = -1/t, p = t)); sigma =
        ``sigma_from_move_chance(t)`` and dsigma = -loss_scale * expm1(sigma) = expm1(sigma) / t, which is
        1 / (1 - t) = d sigma / dt below the clip and (1/eps - 1) / t above it. t must lie in (0, 1].
        """
        sigma = self.sigma_from_move_chance(t)
        return sigma, torch.expm1(sigma) / t


def _check_tokens(log_score: torch.Tensor, xt: torch.Tensor, mask_token_id: int, name: str = "log_score") -> None:
    if log_score.shape[:-1] != xt.shape:
        raise ValueError(
            f"{name} [..., V] and xt [...] must agree on the leading dims, got {tuple(log_score.shape)} and "
            f"{tuple(xt.shape)}"
        )
    if not 0 <= mask_token_id < log_score.shape[-1]:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary of {log_score.shape[-1]}")


def _sigma_like(sigma: torch.Tensor | float, xt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sigma broadcast to xt's shape [...] ([b], [b, 1] and [b, L] are accepted for xt [b, L])."""
    sigma = torch.as_tensor(sigma, dtype=dtype, device=xt.device)
    if sigma.dim() == 1 and xt.dim() == 2:
        sigma = sigma[:, None]  # the reference's per-sequence sigma [b]
    try:
        return sigma.expand(xt.shape)
    except RuntimeError:
        raise ValueError(f"sigma of shape {tuple(sigma.shape)} does not broadcast to xt {tuple(xt.shape)}") from None


def sedd_log_score(
    logits: torch.Tensor,
    xt: torch.Tensor,
    sigma: torch.Tensor | float,
    mask_token_id: int,
    valid_vocab: int | None = None,
) -> torch.Tensor:
    """Log concrete scores [..., V] in fp32 (fp64 kept) from the backbone's logits [..., V] (reference
    ``_sedd_parameterization``).

    log s(y) = logits(y) - log expm1(sigma) - log(V - 1), then log s(xt) = 0 at every position (the ratio of the
    current state to itself; for a clean xt it is the only column the sampler and the loss ever use). ``sigma`` is
    the total noise the backbone was conditioned on, shape [b], [b, 1] or xt's shape. ``valid_vocab`` (the real
    vocabulary size including M, when the logits carry padded columns for tensor parallelism) makes the padded
    columns -inf (score 0) and uses V = valid_vocab; the reference has no padding. Raises ValueError on
    mismatched shapes, a mask id outside the vocabulary or a valid_vocab outside [2, V].
    """
    _check_tokens(logits, xt, mask_token_id, "logits")
    vocab = logits.shape[-1]
    limit = vocab if valid_vocab is None else valid_vocab
    if not 2 <= limit <= vocab or mask_token_id >= limit:
        raise ValueError(f"valid_vocab must lie in [max(2, mask_token_id + 1), {vocab}], got {valid_vocab}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    sig = _sigma_like(sigma, xt, dtype)
    log_score = logits.to(dtype) - (torch.log(torch.expm1(sig)) + math.log(limit - 1))[..., None]
    ids = torch.arange(vocab, device=logits.device)
    if limit < vocab:
        log_score = log_score.masked_fill(ids >= limit, float("-inf"))
    return torch.where(ids == xt[..., None], torch.zeros((), dtype=dtype, device=logits.device), log_score)


def score_entropy(
    log_score: torch.Tensor,
    sigma: torch.Tensor | float,
    xt: torch.Tensor,
    x0: torch.Tensor,
    mask_token_id: int,
) -> torch.Tensor:
    """Denoising score entropy per token [...] for log scores [..., V] (reference ``_score_entropy``).

    At a masked position (xt == M): sum_{y != M} exp(log_score(y)) - r log_score(x0) + r (log r - 1) with
    r = 1 / expm1(sigma); exactly 0 at clean positions, whose log scores (any value, inf or NaN) reach neither the
    value nor the gradient. Units: nats per token, before the dsigma weight. ``x0`` must hold real tokens
    (never M) where xt is masked. Raises ValueError on mismatched shapes.
    """
    _check_tokens(log_score, xt, mask_token_id)
    if x0.shape != xt.shape:
        raise ValueError(f"x0 and xt must share one shape, got {tuple(x0.shape)} and {tuple(xt.shape)}")
    masked = xt == mask_token_id
    zero = torch.zeros((), dtype=log_score.dtype, device=log_score.device)
    safe = torch.where(masked[..., None], log_score, zero)  # clean rows never touch the value or the gradient
    one = torch.ones((), dtype=log_score.dtype, device=log_score.device)
    sig = torch.where(masked, _sigma_like(sigma, xt, log_score.dtype), one)
    log_r = -torch.log(torch.expm1(sig))
    r = torch.exp(log_r)
    ids = torch.arange(log_score.shape[-1], device=log_score.device)
    pos_term = torch.where(ids == mask_token_id, zero, safe.exp()).sum(-1)
    neg_term = r * safe.gather(-1, torch.where(masked, x0, 0)[..., None]).squeeze(-1)
    const = r * (log_r - 1.0)
    return torch.where(masked, pos_term - neg_term + const, zero)


def sedd_token_nelbo(
    log_score: torch.Tensor,
    sigma: torch.Tensor | float,
    dsigma: torch.Tensor | float,
    xt: torch.Tensor,
    x0: torch.Tensor,
    mask_token_id: int,
) -> torch.Tensor:
    """Per-token NELBO terms [...]: dsigma * score_entropy (reference ``_forward_pass_diffusion`` for sedd).

    ``dsigma`` broadcasts like ``sigma`` ([b], [b, 1] or xt's shape). The training loss and the eval NELBO are the
    mean over all tokens (clean ones count 0), as for the other modes; exp of the token-weighted mean over a test
    set and over t draws is the perplexity bound.
    """
    entropy = score_entropy(log_score, sigma, xt, x0, mask_token_id)
    return _sigma_like(dsigma, xt, entropy.dtype) * entropy


# ---------------------------------------------------------------------------------------------- sampler
def scores_for_sampling(log_score: torch.Tensor, nucleus_p: float = 1.0) -> torch.Tensor:
    """Scores [..., V] in fp64 for the sampler (reference ``get_score``).

    nucleus_p = 1 (the reference default): exp(log_score). nucleus_p < 1 (the reference's gen-PPL scripts use 0.99)
    reproduces the reference: the log scores are normalised over the vocabulary (M's column included), the smallest
    set of most probable columns with cumulative mass <= p (at least the top one) is kept and renormalised, and
    that distribution stands in for the scores. Raises ValueError unless 0 < nucleus_p <= 1.
    """
    if not 0.0 < nucleus_p <= 1.0:
        raise ValueError(f"nucleus_p must lie in (0, 1], got {nucleus_p}")
    log_score = log_score.to(torch.float64)
    if nucleus_p == 1.0:
        return log_score.exp()
    probs = torch.softmax(log_score, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) <= nucleus_p
    keep[..., 0] = True
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return kept / kept.sum(-1, keepdim=True)


def staggered_score(score: torch.Tensor, dsigma: torch.Tensor | float, mask_token_id: int) -> torch.Tensor:
    """The scores moved back by noise dsigma (reference ``_staggered_score``), [..., V] -> [..., V].

    s' = s exp(-dsigma Q) for the absorbing generator Q (rows = from: Q[y, y] = -1, Q[y, M] = 1 for y != M):
    s'(y) = exp(dsigma) s(y) for all y, and M's column gains (1 - exp(dsigma)) * sum_y s(y) (M's own score
    included, which makes s'(M) = s(M) + (1 - exp(dsigma)) sum_{y != M} s(y)). ``dsigma`` broadcasts over the
    leading dims ([b], [b, 1], ...).
    """
    d = torch.as_tensor(dsigma, dtype=score.dtype, device=score.device)
    if d.dim() == 1 and score.dim() == 3:
        d = d[:, None]
    d = d.expand(score.shape[:-1])
    out = score * d.exp()[..., None]
    extra = (1.0 - d.exp()) * score.sum(-1)
    out[..., mask_token_id] += extra
    return out


def transp_transition(xt: torch.Tensor, sigma: torch.Tensor | float, vocab: int, mask_token_id: int) -> torch.Tensor:
    """Columns of exp(sigma Q) at the current tokens (reference ``_transp_transition``), [...] -> [..., V].

    Entry y is the probability that token y moves to x_t over noise sigma (Q as in :func:`staggered_score`):
    exp(-sigma) for y = x_t, plus 1 - exp(-sigma) for every y when x_t = M (so M's own entry is 1).
    """
    s = torch.as_tensor(sigma, dtype=torch.float64, device=xt.device)
    if s.dim() == 1 and xt.dim() == 2:
        s = s[:, None]
    s = s.expand(xt.shape)
    edge = torch.exp(-s)[..., None] * torch.nn.functional.one_hot(xt, vocab).to(torch.float64)
    return edge + torch.where(xt == mask_token_id, -torch.expm1(-s), torch.zeros_like(s))[..., None]


def analytic_update_probs(
    score: torch.Tensor, xt: torch.Tensor, dsigma: torch.Tensor | float, mask_token_id: int
) -> torch.Tensor:
    """Unnormalised reverse-step weights [..., V] from noise sigma_t to sigma_t - dsigma (reference
    ``_analytic_update``, Lou et al.'s Tweedie tau-leaping): staggered_score(score) * transp_transition(xt, dsigma).

    A clean position keeps its token (weight s(x_t) = 1 on it, 0 elsewhere). A masked position gets
    s(y) (exp(dsigma) - 1) for y != M and 1 - (exp(dsigma) - 1) sum_{y != M} s(y) for M: the row sums to 1, and
    with the exact scores it is the MDLM step c(y) (t - s)/t, M with s/t. A model whose scores overshoot can make
    M's weight negative; the categorical draw then never picks M, as in the reference.
    """
    _check_tokens(score, xt, mask_token_id, "score")
    return staggered_score(score, dsigma, mask_token_id) * transp_transition(xt, dsigma, score.shape[-1], mask_token_id)


def denoiser_update_probs(
    score: torch.Tensor, xt: torch.Tensor, sigma: torch.Tensor | float, mask_token_id: int
) -> torch.Tensor:
    """The final denoising step's weights [..., V] (reference ``_denoiser_update``): the analytic step with
    dsigma = sigma (down to zero noise) and M's column set to 0, so every masked token becomes a real token."""
    probs = analytic_update_probs(score, xt, sigma, mask_token_id)
    probs[..., mask_token_id] = 0.0
    return probs


def sample_categorical(
    weights: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
) -> torch.Tensor:
    """One index per row of non-negative weights [..., V] -> [...] (reference ``_sample_categorical``).

    argmax(w / E) with E ~ Exp(1) (E = 1e-10 - log(U + 1e-10), U uniform, as in the reference) picks index y with
    probability w(y) / sum w; negative weights are never picked unless the whole row is negative. ``generator``
    may be a list with one generator per batch row (weights [b, ...]): each row's draws then come from its own
    stream, whatever else is in the batch.
    """
    if isinstance(generator, list):
        if len(generator) != weights.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {weights.shape[0]} rows")
        u = torch.stack(
            [torch.rand(weights.shape[1:], generator=g, dtype=weights.dtype, device=weights.device) for g in generator]
        )
    else:
        u = torch.rand(weights.shape, generator=generator, dtype=weights.dtype, device=weights.device)
    return (weights / (1e-10 - (u + 1e-10).log())).argmax(dim=-1)


def analytic_timesteps(num_steps: int, eps: float = SEDD_SAMPLING_EPS) -> torch.Tensor:
    """The sampler's times [num_steps + 1] in float64: linspace(1, eps, num_steps + 1) (reference
    ``_analytic_sampler``). Raises ValueError unless num_steps >= 1 and 0 < eps < 1."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"sampling eps must lie in (0, 1), got {eps}")
    return torch.linspace(1.0, eps, num_steps + 1, dtype=torch.float64)


LogScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def analytic_sample(
    log_score_fn: LogScoreFn,
    xt: torch.Tensor,
    num_steps: int,
    mask_token_id: int,
    *,
    noise: SEDDLogLinearNoise | None = None,
    eps: float = SEDD_SAMPLING_EPS,
    nucleus_p: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The reference's SEDD sampler (``_analytic_sampler``): ``num_steps`` analytic steps, then the denoiser step.

    ``xt`` [b, L] is the start (all M, with the BOS id at position 0 as the reference sets it; clean positions are
    carried over unchanged). ``log_score_fn(x [b, L], sigma [b])`` returns log scores [b, L, V] (e.g.
    :func:`sedd_log_score` of the backbone conditioned on sigma). Step i goes from t_i to t_{i+1} on
    :func:`analytic_timesteps`, with sigma = ``noise.sigma_from_move_chance(t)`` (so t = 1 gives sigma_max) and
    dsigma = sigma(t_i) - sigma(t_{i+1}); the last call, at t = eps, removes all remaining noise. The network runs
    num_steps + 1 times (the reference reports num_steps as the NFE). The reference's SEDD baseline runs
    ``num_steps = algo.T = 1000`` with nucleus_p = 0.99 for generative perplexity (scripts/gen_ppl/genppl_sedd.sh)
    and nucleus_p = 1 by default. Clean positions are kept explicitly: with
    exact or finite scores this is what the weights already do, and it also covers the one case where the
    reference does not (nucleus_p < 1 filtering out a clean token's own column leaves an all-zero row, which the
    reference's argmax turns into token id 0). ``generator``: one for the batch, or a list with one per row (see
    :func:`sample_categorical`); ``progress(done, total)`` is called after each network call. Returns the tokens
    [b, L] (int64, no M left when the scores are finite).
    """
    if xt.dim() != 2:
        raise ValueError(f"xt must be [batch, seq_len], got shape {tuple(xt.shape)}")
    noise = noise or SEDDLogLinearNoise()
    x = xt.clone()
    times = analytic_timesteps(num_steps, eps).to(x.device)
    ones = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(num_steps):
        sigma_t = noise.sigma_from_move_chance(times[i] * ones)
        sigma_s = noise.sigma_from_move_chance(times[i + 1] * ones)
        score = scores_for_sampling(log_score_fn(x, sigma_t), nucleus_p)
        drawn = sample_categorical(analytic_update_probs(score, x, sigma_t - sigma_s, mask_token_id), generator)
        x = torch.where(x == mask_token_id, drawn, x)
        if progress is not None:
            progress(i + 1, num_steps + 1)
    sigma = noise.sigma_from_move_chance(times[-1] * ones)
    score = scores_for_sampling(log_score_fn(x, sigma), nucleus_p)
    drawn = sample_categorical(denoiser_update_probs(score, x, sigma, mask_token_id), generator)
    return torch.where(x == mask_token_id, drawn, x)
