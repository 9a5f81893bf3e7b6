"""SUBS parameterisation and the BD3 NELBO.

Under SUBS an unmasked token is carried over unchanged (zero loss) and the mask token is never predicted, so the
NELBO is a weighted cross-entropy on masked positions only: sum over tokens of loss_weight(t) * CE (1/t for the
log-linear schedule). The reference averages over *all* b*L tokens, counting carried-over tokens as zeros; the
training loss here does the same so numbers compare.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class NELBO(NamedTuple):
    loss: torch.Tensor  # [] the training loss: NELBO per token (nats), differentiable
    terms: torch.Tensor  # [b, L] per-token NELBO terms w·CE (0 where nothing is predicted)


def _check_shapes(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{', '.join(shapes)} must share one shape, got {', '.join(map(str, shapes.values()))}")


def nelbo_weights(masked: torch.Tensor, t_tokens: torch.Tensor, schedule) -> torch.Tensor:
    """Per-token NELBO weights [b, L]: ``schedule.loss_weight(t)`` = -α'(t)/(1-α(t)) (1/t for the log-linear
    schedule) on masked tokens, exactly 0 on carried-over ones (SUBS; paper Eq. (8), bd3lms ``_loss``).

    masked: [b, L] bool; t_tokens: [b, L] the t of each token's block. Off the mask t may be anything (0, NaN):
    it never reaches the weight. Raises ValueError for mismatched shapes or a non-bool mask."""
    _check_shapes(masked=masked, t_tokens=t_tokens)
    if masked.dtype != torch.bool:
        raise ValueError(f"masked must be a bool tensor, got {masked.dtype}")
    safe_t = torch.where(masked, t_tokens, torch.ones_like(t_tokens))
    return torch.where(masked, schedule.loss_weight(safe_t), torch.zeros_like(t_tokens))


def nelbo(
    ce: torch.Tensor, weight: torch.Tensor, num_tokens: int | torch.Tensor, weighted_sum: torch.Tensor | None = None
) -> NELBO:
    """The training objective of every mode: the NELBO per token, Σ_l w_l·CE_l / num_tokens.

    ce: [b, L] per-token cross-entropy (nats) of the predicted tokens; weight: [b, L] their NELBO weights
    (:func:`nelbo_weights` for masked diffusion; (tokens averaged over)/(tokens predicted) for AR), 0 where nothing
    is predicted — whatever ``ce`` holds there (inf, NaN) reaches neither the value nor the gradient. num_tokens:
    the tokens averaged over, all b·L (the reference counts carried-over tokens as zeros) or the real ones of
    padded data. weighted_sum: Σ w·CE as a fused head computed it with its gradient (``model.head``); when given, it
    is the differentiable numerator and ``ce`` only feeds the statistics in ``terms``."""
    _check_shapes(ce=ce, weight=weight)
    terms = weight * torch.where(weight != 0, ce, torch.zeros_like(ce))
    total = terms.sum() if weighted_sum is None else weighted_sum
    return NELBO(total / num_tokens, terms)


def subs_log_probs(
    logits: torch.Tensor, xt: torch.Tensor, mask_token_id: int, valid_vocab: int | None = None
) -> torch.Tensor:
    """SUBS log-probabilities [..., V] in fp32 from dense logits [..., V] and the noisy tokens xt [...].

    The mask token (and padded vocabulary rows, ids >= valid_vocab) get -inf before the softmax, so they are never
    predicted; at an unmasked position (xt != mask) the distribution is a point mass on xt (log p = 0 there,
    -inf elsewhere), which is the carry-over rule.
    """
    vocab = logits.shape[-1]
    if logits.shape[:-1] != xt.shape:
        raise ValueError(
            f"logits [..., V] and xt [...] must agree on the leading dims, got {tuple(logits.shape)} "
            f"and {tuple(xt.shape)}"
        )
    if not 0 <= mask_token_id < vocab:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the logits' vocabulary of {vocab}")
    limit = vocab if valid_vocab is None else valid_vocab
    if not 1 <= limit <= vocab or (limit == 1 and mask_token_id == 0):
        raise ValueError(f"valid_vocab must leave at least one predictable id in [1, {vocab}], got {valid_vocab}")
    ids = torch.arange(vocab, device=logits.device)
    never = never_predicted(ids, mask_token_id, limit)
    logp = torch.log_softmax(logits.float().masked_fill(never, float("-inf")), dim=-1)
    point = torch.where(ids == xt[..., None], 0.0, float("-inf"))  # comparison, not scatter: no index can overflow
    return torch.where((xt != mask_token_id)[..., None], point, logp)


def never_predicted(ids: torch.Tensor, mask_token_id: int, vocab_size: int) -> torch.Tensor:
    """bool like ``ids``: True for the vocabulary ids SUBS never predicts — the mask token, and the padding ids >=
    ``vocab_size`` that round the embedding up for tensor parallelism. Their logits are set to -inf (the head, the
    sampler network, :func:`subs_log_probs`)."""
    return (ids == mask_token_id) | (ids >= vocab_size)
