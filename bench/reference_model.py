"""A plain-PyTorch BD3-LM that computes what the reference code (kuleshov-group/bd3lms) computes in a training step.

The baseline of ``bench/train_step.py``. It is independent of this project's model code on purpose (only the one
mask function, :func:`bd3_megatron.diffusion.masks.bd3_mask`, is shared) and follows the reference as described in
``shared/reference/bd3lms-spec.md`` §1 and §3 (``models/dit.py`` and ``diffusion.py``):

* input x_t ⊕ x0 [b, 2L] through a raw embedding matrix [V, D];
* time conditioning off: sigma ≡ 0, so c = silu(TimestepEmbedder(0)) [b, cond_dim] and every adaLN modulation is a
  learned constant, still computed from c at every step as the reference does;
* DDiTBlock (pre-LN, LayerNorm weight-only in fp32): h = LN1(x)(1 + scale_msa) + shift_msa; q, k, v from one fused
  Linear (no bias) applied to each half separately with the same RoPE table (positions 0..L-1 in both halves),
  rotary applied to the (three h d) tensor with v's cos = 1, sin = 0; SDPA with the dense [2L, 2L] bool mask;
  x = x + gate_msa * dropout(attn_out(a)); x = x + gate_mlp * dropout(MLP(LN2(x)(1 + scale_mlp) + shift_mlp)),
  MLP Linear(D, 4D) + GELU(tanh) + Linear(4D, D) with biases;
* DDiTFinalLayer: LN -> modulate -> Linear(D, V) with bias, on all 2L positions; the noisy half [:, :L] is kept;
* SUBS: mask-token logit += -1e6, log-softmax over the full vocabulary (fp32, as the spec advises), positions with
  x_t != mask become a point mass on x_t (log p = 0, so zero loss); loss = -(1/t) log p(x0) per token, mean over
  all b*L tokens.

Blocks and head run under ``autocast(dtype)`` when a lower precision is asked (the reference's bf16 autocast).
Initialisation is not the reference's (it zero-inits adaLN and the head, which would make the loss trivially
log V): all weights here are N(0, 0.02), which changes no shape and no cost.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bd3_megatron.diffusion.masks import bd3_mask

NEG_INFINITY = -1_000_000.0  # the reference's neg_infinity


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding [b, dim] = [cos | sin] of t [b] (reference TimestepEmbedder.timestep_embedding), in
    t's dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LayerNorm(nn.Module):
    """Weight-only LayerNorm computed in (at least) fp32 outside autocast, as the reference's."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(x.to(torch.promote_types(x.dtype, torch.float32)), [self.dim])
        return x * self.weight[None, None, :]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_tables(seq_len: int, head_dim: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, L, 3, 1, head_dim] for the (three h d) qkv layout; v's entries are cos 1, sin 0 (untouched)."""
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=dtype, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos()[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
    sin = emb.sin()[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
    cos[:, :, 2].fill_(1.0)
    sin[:, :, 2].fill_(0.0)
    return cos, sin


class Block(nn.Module):
    """The reference's DDiTBlock in its BD3 training path (x_t ⊕ x0, dense mask, SDPA)."""

    def __init__(self, dim: int, heads: int, cond_dim: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = LayerNorm(dim), LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv = self.attn_qkv(h)
        qkv = qkv.view(*qkv.shape[:2], 3, self.heads, -1)  # b s (three h d)
        with torch.autocast(device_type=h.device.type, enabled=False):
            return qkv * cos.to(qkv.dtype) + rotate_half(qkv) * sin.to(qkv.dtype)

    def forward(self, x, cos, sin, c, mask):
        n = x.shape[1] // 2
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, 2)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        qkv = torch.cat([self.qkv(h[:, :n], cos, sin), self.qkv(h[:, n:], cos, sin)], dim=1)  # same positions
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # [b, h, 2L, d]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        x = x + gate_msa * F.dropout(self.attn_out(a), self.dropout, self.training)
        return x + gate_mlp * F.dropout(
            self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)), self.dropout, self.training
        )


class ReferenceBD3(nn.Module):
    """The reference's DIT backbone + Diffusion SUBS loss for L'-block BD3 training.

    ``loss(xt, x0, t_tokens)``: xt, x0 [b, L] int64, t_tokens [b, L] float (each token's block t) -> scalar NELBO
    per token. Errors: ValueError when L is not the configured seq_len or shapes disagree.
    """

    def __init__(
        self,
        vocab_size: int,
        mask_token_id: int,
        num_layers: int,
        hidden_size: int,
        num_heads: int,
        seq_len: int,
        block_size: int,
        cond_dim: int = 128,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"hidden_size {hidden_size} must split into {num_heads} heads of even width")
        self.vocab_size, self.mask_token_id = vocab_size, mask_token_id
        self.seq_len, self.block_size = seq_len, block_size
        self.head_dim, self.dtype = hidden_size // num_heads, dtype
        self.vocab_embed = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.sigma_map = nn.Sequential(nn.Linear(256, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, cond_dim, dropout) for _ in range(num_layers))
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.final_adaLN = nn.Linear(cond_dim, 2 * hidden_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    def _autocast(self, device: torch.device):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def logits(self, xt: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Head output of the noisy half [b, L, V] (the head runs on all 2L positions, as in the reference)."""
        if xt.shape != x0.shape or xt.dim() != 2 or xt.shape[1] != self.seq_len:
            raise ValueError(f"xt and x0 must both be [b, {self.seq_len}], got {tuple(xt.shape)}, {tuple(x0.shape)}")
        n, dev = self.seq_len, xt.device
        wide = torch.promote_types(self.vocab_embed.dtype, torch.float32)  # fp32 as the reference (fp64 in tests)
        x = self.vocab_embed[torch.cat([xt, x0], dim=1)]
        c = F.silu(self.sigma_map(timestep_embedding(torch.zeros(xt.shape[0], device=dev, dtype=wide))))  # sigma ≡ 0
        cos, sin = rotary_tables(n, self.head_dim, dev, wide)
        mask = bd3_mask(n, self.block_size, device=dev)
        with self._autocast(dev):
            for block in self.blocks:
                x = block(x, cos, sin, c, mask)
            shift, scale = self.final_adaLN(c)[:, None].chunk(2, dim=2)
            logits = self.linear(modulate(self.norm_final(x), shift, scale))
        return logits[:, :n]

    def subs_log_probs(self, logits: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """The reference's _subs_parameterization on [b, L, V], in (at least) fp32."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logits[:, :, self.mask_token_id] += NEG_INFINITY
        logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        unmasked = xt != self.mask_token_id
        logits[unmasked] = NEG_INFINITY
        logits[unmasked, xt[unmasked]] = 0
        return logits

    def loss(self, xt: torch.Tensor, x0: torch.Tensor, t_tokens: torch.Tensor) -> torch.Tensor:
        log_p = self.subs_log_probs(self.logits(xt, x0), xt).gather(-1, x0[:, :, None])[:, :, 0]
        return ((-1.0 / t_tokens) * log_p).mean()  # loss_scale = -1/t (log-linear), averaged over all tokens


def random_batch(
    gen: torch.Generator,
    batch: int,
    seq_len: int,
    block_size: int,
    vocab_size: int,
    mask_token_id: int,
    eps_min: float = 1e-3,
    eps_max: float = 1.0,
    device="cpu",
):
    """(xt, x0, t_tokens) drawn with torch's generator: one t per (sequence, block) uniform in [eps_min, eps_max],
    each token masked with probability t. Tokens avoid the mask id."""
    x0 = torch.randint(0, vocab_size - 1, (batch, seq_len), generator=gen)
    x0 = x0 + (x0 >= mask_token_id).long()  # never the mask token
    t = eps_min + (eps_max - eps_min) * torch.rand(batch, seq_len // block_size, generator=gen)
    t_tokens = t.repeat_interleave(block_size, dim=1)
    xt = torch.where(torch.rand(batch, seq_len, generator=gen) < t_tokens, mask_token_id, x0)
    return xt.to(device), x0.to(device), t_tokens.to(device)
