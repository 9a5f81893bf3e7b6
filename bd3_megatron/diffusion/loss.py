"""SUBS parameterisation and the BD3 NELBO."""
from __future__ import annotations

import torch


def token_nelbo(ce: torch.Tensor, masked: torch.Tensor, t_tokens: torch.Tensor, schedule) -> torch.Tensor:
    """Per-token NELBO terms [b, L]: loss_weight(t) * CE on masked tokens, 0 on carried-over tokens."""
    return torch.where(masked, schedule.loss_weight(t_tokens) * ce, torch.zeros_like(ce))


def nelbo_sum(ce, masked, t_tokens, schedule) -> tuple[torch.Tensor, int]:
    """(sum of NELBO terms, number of tokens) for token-weighted aggregation across batches."""
    terms = token_nelbo(ce, masked, t_tokens, schedule)
    return terms.sum(), terms.numel()


def nelbo_from_token_ce(ce, masked, t_tokens, schedule) -> torch.Tensor:
    """The training loss: NELBO terms averaged over all b*L tokens (unmasked tokens count as zero-loss tokens,
    the reference convention), i.e. NELBO per token."""
    return token_nelbo(ce, masked, t_tokens, schedule).mean()


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_token_id: int,
                   valid_vocab: int | None = None) -> torch.Tensor:
    """SUBS log-probabilities [..., V] in fp32: the mask token (and padded ids >= valid_vocab) is never predicted;
    an unmasked position is a point mass on its observed token (carry-over)."""
    logits = logits.float().clone()
    logits[..., mask_token_id] = float("-inf")
    if valid_vocab is not None and valid_vocab < logits.shape[-1]:
        logits[..., valid_vocab:] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1)
    carry = xt != mask_token_id
    point = torch.full_like(logp, float("-inf")).scatter(-1, xt.clamp(max=logp.shape[-1] - 1)[..., None], 0.0)
    return torch.where(carry[..., None], point, logp)
