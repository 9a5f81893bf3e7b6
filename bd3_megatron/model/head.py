"""The output head and its cross-entropy in one pass over vocabulary chunks (vocab-parallel, SUBS-masked).

Shape legend (megatron-core style):
    N  tokens that need a prediction (masked noisy positions; ``N = b·L·E[1-α_t]`` in training)
    h  hidden size
    Vp this tensor-parallel rank's slice of the padded vocabulary (``V_padded / tp``)
    C  tokens per chunk (``chunk_tokens``)

Why fused: the plain route (ColumnParallelLinear → masked_fill → vocab_parallel_cross_entropy) materialises the
[N, Vp] fp32 logits, copies them for the SUBS ``-inf`` fill, keeps a softmax copy for backward and copies once more
in the fill's backward. Here the logits of C tokens live in one reused buffer: the fill is in place, and when the
caller gives the per-token loss weights (the NELBO weight α'_t/(1-α_t) of each masked token, 1/t for log-linear) the
gradients w.r.t. the hidden states and the head weight are formed in the same pass, so backward only rescales them
by the incoming scalar gradient. Executed FLOPs equal the plain route's (2·N·Vp·h forward, 4·N·Vp·h backward);
peak memory of the head is one [C, Vp] buffer instead of several [N, Vp] ones.

Tensor parallelism: ``hidden`` must already have passed ``copy_to_tensor_model_parallel_region`` (identity forward,
all-reduce of the gradient backward), exactly as ColumnParallelLinear does for its input; the max, the target logit
and the sum of exponentials are all-reduced over the TP group as in megatron's ``vocab_parallel_cross_entropy``.

SEDD (``model.mode=sedd``) trains on the denoising score entropy instead, and it needs the same two reductions: with
c = log expm1(sigma) + log(V - 1) the scores are s(y) = e^(logit_y - c), so Σ_y s(y) = e^(lse - c) and the target's
log score is logit_{y0} - c; its gradient w.r.t. the logits is e^(lse - c)·softmax - r·onehot(y0) (r = 1/expm1(sigma)),
one more scale per row than the cross-entropy's softmax - onehot(y0). Same buffer, same FLOPs.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Logit buffer budget per chunk (fp32 bytes): 32 MiB is 256 tokens at a 32K vocabulary slice, 165 at 50K. Measured
# on CPU (bench/RESULTS.md): 32 MiB instead of 64 MiB lowers the step's peak memory by ~6% at no measurable speed cost.
DEFAULT_CHUNK_BYTES = 32 * 2**20


def chunk_tokens_for(vocab_slice: int, chunk_tokens: int = 0) -> int:
    """Tokens per chunk: ``chunk_tokens`` if set, else as many as fit ``DEFAULT_CHUNK_BYTES`` of fp32 logits."""
    if chunk_tokens > 0:
        return chunk_tokens
    return max(1, DEFAULT_CHUNK_BYTES // (4 * vocab_slice))


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class LinearCrossEntropy(torch.autograd.Function):
    """``ce[i] = logsumexp_v(h_i·W_v) - h_i·W_{y_i}`` over the predictable vocabulary, chunked over tokens.

    forward(hidden [N, h], weight [Vp, h], labels [N] int64 global ids, loss_weight [N] fp32 or None,
            never_predict [K] int64 local column ids, vocab_start int, chunk int, group)
        -> (ce [N] fp32, weighted_sum [] fp32)

    ``ce`` carries no gradient. ``weighted_sum = Σ_i loss_weight[i]·ce[i]`` is differentiable w.r.t. ``hidden``
    and ``weight`` when ``loss_weight`` is given (0 and not differentiable otherwise). Under autocast the two
    matmuls per chunk run in the autocast dtype and the softmax in fp32, as the unfused head would.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        labels,
        loss_weight,
        never_predict,
        vocab_start,
        chunk,
        group,
        bias=None,
        log_expm1_sigma=None,
        log_real_tokens=0.0,
    ):
        n, vp = hidden.shape[0], weight.shape[0]
        want_grad = loss_weight is not None and (
            ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[8])
        )
        ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
        local = labels - vocab_start
        owned = (local >= 0) & (local < vp)  # this rank's slice holds the target's logit
        local = torch.where(owned, local, torch.zeros_like(local))
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
        grad_bias = torch.zeros(vp, dtype=torch.float32, device=weight.device) if want_grad else None
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            h = hidden[lo:hi]
            logits = F.linear(h, weight, bias).float()  # [C, Vp]; a fresh fp32 buffer we may overwrite
            logits.index_fill_(1, never_predict, float("-inf"))  # SUBS: the mask token and vocabulary padding
            row_max = _all_reduce(logits.max(dim=1).values, dist.ReduceOp.MAX, group)
            logits.sub_(row_max[:, None])
            target = logits.gather(1, local[lo:hi, None]).squeeze(1) * owned[lo:hi]
            logits.exp_()
            sums = _all_reduce(torch.stack([logits.sum(dim=1), target]), dist.ReduceOp.SUM, group)
            if log_expm1_sigma is None:  # cross-entropy: d ce_i / d logit_iv = softmax_iv - [v = y_i]
                ce[lo:hi] = sums[0].log() - sums[1]
                spread, pull = None, owned[lo:hi].float()
            else:  # score entropy (module docstring): d se_i / d logit_iv = e^(lse_i - c_i)·softmax_iv - r_i·[v = y_i]
                c = log_expm1_sigma[lo:hi] + log_real_tokens  # log expm1(sigma) + log(V - 1), so s(y) = e^(logit - c)
                log_r = -log_expm1_sigma[lo:hi]
                spread = torch.exp(row_max + sums[0].log() - c)  # Σ_y s(y) = e^(lse - c)
                r = log_r.exp()
                ce[lo:hi] = spread - r * (sums[1] + row_max - c) + r * (log_r - 1.0)
                pull = r * owned[lo:hi]
            if want_grad:  # the token's gradient w.r.t. its logits, scaled by its NELBO weight
                logits.div_(sums[0][:, None])
                if spread is not None:
                    logits.mul_(spread[:, None])
                rows = torch.arange(hi - lo, device=logits.device)
                logits[rows, local[lo:hi]] -= pull
                logits.mul_(loss_weight[lo:hi, None])
                grad_hidden[lo:hi] = logits.to(weight.dtype) @ weight  # autocast picks bf16 here when active
                grad_weight += (logits.t().to(h.dtype) @ h).float()
                grad_bias += logits.sum(dim=0)
        ctx.mark_non_differentiable(ce)
        ctx.want_grad = want_grad
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype), grad_bias)
            ctx.bias_dtype = None if bias is None else bias.dtype
            weighted = (ce * loss_weight).sum()
        else:
            weighted = ce.new_zeros(()) if loss_weight is None else (ce * loss_weight).sum()
        return ce, weighted

    @staticmethod
    def backward(ctx, grad_ce, grad_weighted):
        if not ctx.want_grad:
            raise RuntimeError("LinearCrossEntropy: gradients exist only for weighted_sum with loss_weight given")
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grad_bias = None if ctx.bias_dtype is None else (grad_bias * grad_weighted).to(ctx.bias_dtype)
        scaled = (grad_hidden * grad_weighted, grad_weight * grad_weighted)
        return *scaled, None, None, None, None, None, None, grad_bias, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    never_predict: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    loss_weight: torch.Tensor | None = None,
    vocab_start: int = 0,
    chunk_tokens: int = 0,
    group=None,
    log_expm1_sigma: torch.Tensor | None = None,
    real_tokens: int = 0,
):
    """Per-token cross-entropy [N] (no gradient) and its ``loss_weight``-weighted sum [] (differentiable).

    ``hidden`` [N, h]; ``weight`` [Vp, h] this rank's head rows (``bias`` [Vp] their bias, optional) starting at
    global id ``vocab_start``; ``labels``
    [N] global ids; ``never_predict`` [Vp] bool or [K] int64 local column ids (SUBS: the mask token and the
    vocabulary padding get -inf);
    ``group`` the tensor-parallel group (None: single rank).

    With ``log_expm1_sigma`` [N] (log expm1 of each token's total noise sigma) the per-token value is SEDD's
    denoising score entropy of the masked token instead of the cross-entropy, the logits read as log scores
    ``logit - log expm1(sigma) - log(real_tokens)`` (``real_tokens`` = V - 1, the vocabulary without the mask token):
    ``se = Σ_y s(y) - r·log s(y0) + r·(log r - 1)``, r = 1/expm1(sigma) (``diffusion.sedd.score_entropy`` of
    ``diffusion.sedd.sedd_log_score``; the mask token and the padding are no y). Raises
    ValueError on shape mismatches.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden [N, h], weight [Vp, h], labels [N] expected, got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if loss_weight is not None and loss_weight.shape != labels.shape:
        raise ValueError(f"loss_weight must be [N] like labels, got {tuple(loss_weight.shape)}")
    chunk = chunk_tokens_for(weight.shape[0], chunk_tokens)
    if never_predict.dtype == torch.bool:
        never_predict = never_predict.nonzero().flatten()
    if log_expm1_sigma is not None:
        if log_expm1_sigma.shape != labels.shape:
            raise ValueError(f"log_expm1_sigma must be [N] like labels, got {tuple(log_expm1_sigma.shape)}")
        if real_tokens < 1:
            raise ValueError(f"real_tokens must be >= 1 with log_expm1_sigma, got {real_tokens}")
        log_expm1_sigma = log_expm1_sigma.float()
    log_real = math.log(real_tokens) if log_expm1_sigma is not None else 0.0
    return LinearCrossEntropy.apply(
        hidden, weight, labels, loss_weight, never_predict, vocab_start, chunk, group, bias, log_expm1_sigma, log_real
    )
