"""SUBS parameterisation and the BD3 NELBO.

Under SUBS an unmasked token is carried over unchanged (zero loss) and the mask token is never predicted, so the
NELBO is a weighted cross-entropy on masked positions only: sum over tokens of loss_weight(t) * CE (1/t for the
log-linear schedule). The reference averages over *all* b*L tokens, counting carried-over tokens as zeros; the
training loss here does the same so numbers compare.
"""

from __future__ import annotations

import torch


def _check_shapes(ce: torch.Tensor, masked: torch.Tensor, t_tokens: torch.Tensor) -> None:
    if not (ce.shape == masked.shape == t_tokens.shape):
        raise ValueError(
            f"ce, masked and t_tokens must share one shape, got {tuple(ce.shape)}, "
            f"{tuple(masked.shape)}, {tuple(t_tokens.shape)}"
        )
    if masked.dtype != torch.bool:
        raise ValueError(f"masked must be a bool tensor, got {masked.dtype}")


def token_nelbo(ce: torch.Tensor, masked: torch.Tensor, t_tokens: torch.Tensor, schedule) -> torch.Tensor:
    """Per-token NELBO terms [b, L]: loss_weight(t) * CE on masked tokens, exactly 0 on carried-over tokens.

    Both factors are zeroed off the mask before multiplying, so whatever the CE or weight hold there (inf, NaN from
    a head that skipped those positions) reaches neither the value nor the gradient.
    """
    _check_shapes(ce, masked, t_tokens)
    weight = torch.where(
        masked,
        schedule.loss_weight(torch.where(masked, t_tokens, torch.ones_like(t_tokens))),
        torch.zeros_like(t_tokens),
    )
    return weight * torch.where(masked, ce, torch.zeros_like(ce))


def nelbo_sum(ce: torch.Tensor, masked: torch.Tensor, t_tokens: torch.Tensor, schedule) -> tuple[torch.Tensor, int]:
    """(sum of NELBO terms, number of tokens), for token-weighted aggregation across batches (eval perplexity)."""
    terms = token_nelbo(ce, masked, t_tokens, schedule)
    return terms.sum(), terms.numel()


def nelbo_from_token_ce(ce: torch.Tensor, masked: torch.Tensor, t_tokens: torch.Tensor, schedule) -> torch.Tensor:
    """The training loss: NELBO per token, i.e. the terms averaged over all b*L tokens (unmasked ones count as 0)."""
    return token_nelbo(ce, masked, t_tokens, schedule).mean()


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
    never = (ids == mask_token_id) | (ids >= limit)
    logp = torch.log_softmax(logits.float().masked_fill(never, float("-inf")), dim=-1)
    point = torch.where(ids == xt[..., None], 0.0, float("-inf"))  # comparison, not scatter: no index can overflow
    return torch.where((xt != mask_token_id)[..., None], point, logp)
