"""The BD3 network in plain PyTorch, for sampling on one device without megatron-core or DeepSpeed.

It computes exactly what the megatron-core model computes (pre-LN GPT layer, fp32 LayerNorm with bias, RoPE
rotate-half over the full head dim with positions shared by the noisy and clean halves, GELU(tanh) MLP, no linear
biases, untied head) and its parameter names are the training checkpoint's canonical names, so a converted state
dict loads with ``load_state_dict(strict=True)``. Entry points:

* :meth:`BD3Net.bd3_logits` — the training-shaped forward over x_t ⊕ x0 with the BD3 mask (used by the uncached
  sampler and by the equivalence tests against the megatron model);
* :meth:`BD3Net.run` — any token span at explicit positions, attending to a :class:`KVCache` of post-rotary K/V
  plus itself under an optional mask (used by the KV-cache sampler);
* :meth:`BD3Net.causal_hidden` — the AR baseline's causal forward over x0 (``mode="ar"``), for scoring.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bd3_megatron.diffusion.masks import bd3_mask
from bd3_megatron.model.rope import rope_angles, rope_inv_freq
from bd3_megatron.model.time_embedding import TIMESTEP_DIM, TimeEmbedding
from bd3_megatron.modes import MODES

SAMPLER_NET_MODES = tuple(name for name, mode in MODES.items() if mode.sampler_net)


@dataclass(frozen=True)
class NetConfig:
    """Everything needed to rebuild the network (and to decode its output)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    vocab_size: int  # real vocabulary incl. the mask token (padding rows are dropped at export)
    mask_token_id: int
    seq_len: int  # L: the training context; the sampler's window
    block_size: int  # L' used in training
    layernorm_eps: float = 1e-5
    rope_base: float = 10000.0
    mode: str = "bd3"  # bd3 (block diffusion) | ar (the causal next-token baseline on the same backbone)
    # hidden dropout the run trained with: never applied here (inference only), carried so an exported HF config
    # states the run's value; None when the source did not record it
    dropout: float | None = None
    # megatron: pre-LN GPT layer, LayerNorm with bias, no linear biases | bd3lms: the reference DiT block (adaLN
    # modulation, weight-only LayerNorms, MLP and head biases; bd3_megatron.model.adaln)
    arch: str = "megatron"
    # bd3lms only: adaLN modulation from the time embedding c = silu(MLP(sinusoid(sigma))) of width cond_dim (the
    # reference's time_conditioning=true); false: a per-layer constant modulation
    time_conditioning: bool = False
    cond_dim: int = 0

    def __post_init__(self) -> None:
        if self.mode not in SAMPLER_NET_MODES:
            raise ValueError(
                f"model mode {self.mode!r} is not one the single-device network runs ({', '.join(SAMPLER_NET_MODES)})"
            )
        if self.arch not in ("megatron", "bd3lms"):
            raise ValueError(f"model arch {self.arch!r} is not megatron or bd3lms")
        if self.time_conditioning and (self.arch != "bd3lms" or self.cond_dim < 1):
            raise ValueError("time_conditioning needs arch bd3lms and cond_dim >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"head dim {self.hidden_size // self.num_heads} must be even for rotary embeddings")
        if self.seq_len % self.block_size:
            raise ValueError(f"seq_len {self.seq_len} is not a multiple of block_size {self.block_size}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetConfig:
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}; the checkpoint's config.json is incomplete")
        return cls(**{k: v for k, v in d.items() if k in names})


def expected_shapes(cfg: NetConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> full (unsharded, unpadded) shape: the contract between convert, export and the net."""
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (v, h)}
    if cfg.arch == "bd3lms":
        return _bd3lms_shapes(cfg, out)
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "input_layernorm.bias": (h,),
                p + "self_attention.linear_qkv.weight": (3 * h, h),
                p + "self_attention.linear_proj.weight": (h, h),
                p + "pre_mlp_layernorm.weight": (h,),
                p + "pre_mlp_layernorm.bias": (h,),
                p + "mlp.linear_fc1.weight": (f, h),
                p + "mlp.linear_fc2.weight": (h, f),
            }
        )
    out.update(
        {"decoder.final_layernorm.weight": (h,), "decoder.final_layernorm.bias": (h,), "output_layer.weight": (v, h)}
    )
    return out


def _bd3lms_shapes(cfg: NetConfig, out: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """arch bd3lms: the reference DiT block's tensors under canonical names (model/adaln.py)."""
    h, f, v, c = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.cond_dim
    if cfg.time_conditioning:
        out.update(
            {
                "time_embedding.mlp.0.weight": (c, TIMESTEP_DIM),
                "time_embedding.mlp.0.bias": (c,),
                "time_embedding.mlp.2.weight": (c, c),
                "time_embedding.mlp.2.bias": (c,),
            }
        )
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attention.linear_qkv.weight": (3 * h, h),
                p + "self_attention.linear_proj.weight": (h, h),
                p + "pre_mlp_layernorm.weight": (h,),
                p + "mlp.linear_fc1.weight": (f, h),
                p + "mlp.linear_fc1.bias": (f,),
                p + "mlp.linear_fc2.weight": (h, f),
                p + "mlp.linear_fc2.bias": (h,),
                p + "modulation.bias": (6 * h,),
            }
        )
        if cfg.time_conditioning:
            out[p + "modulation.weight"] = (6 * h, c)
    out.update(
        {
            "decoder.final_layernorm.weight": (h,),
            "decoder.final_layernorm.modulation.bias": (2 * h,),
            "output_layer.weight": (v, h),
            "output_layer.bias": (v,),
        }
    )
    if cfg.time_conditioning:
        out["decoder.final_layernorm.modulation.weight"] = (2 * h, c)
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# ---- modules named like megatron-core's, so state dict keys are the canonical names ----
class _Embedding(nn.Module):
    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.linear_qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.linear_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, cfg: NetConfig, bias: bool = False):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=bias)
        self.linear_fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=bias)


class _Layer(nn.Module):
    """megatron's pre-LN GPT layer: x + proj(attn(LN(x))), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.self_attention = _SelfAttention(cfg)
        self.pre_mlp_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.mlp = _MLP(cfg)

    def modulation(self, c: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def attention_input(self, x: torch.Tensor, mod) -> torch.Tensor:
        return self.input_layernorm(x)

    def attention_residual(self, x: torch.Tensor, a: torch.Tensor, mod) -> torch.Tensor:
        return x + self.self_attention.linear_proj(a)

    def mlp_residual(self, x: torch.Tensor, mod) -> torch.Tensor:
        h = self.pre_mlp_layernorm(x)
        return x + self.mlp.linear_fc2(F.gelu(self.mlp.linear_fc1(h), approximate="tanh"))


class _RefLayerNorm(nn.Module):
    """The reference's weight-only LayerNorm: layer_norm(x.float()) * weight."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size))
        self.eps = cfg.layernorm_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype) * self.weight


class _Modulation(nn.Module):
    """adaLN modulation [.., chunks*h]: a constant ``bias`` (no time conditioning), or ``weight @ c + bias``."""

    def __init__(self, cfg: NetConfig, chunks: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(chunks * cfg.hidden_size))
        if cfg.time_conditioning:
            self.weight = nn.Parameter(torch.zeros(chunks * cfg.hidden_size, cfg.cond_dim))

    def forward(self, c: torch.Tensor | None) -> torch.Tensor:
        if c is None:  # [chunks*h], broadcast over batch and positions
            return self.bias
        return F.linear(c, self.weight, self.bias)[:, None]  # [b, 1, chunks*h]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift  # the reference's order of operations


class _AdaLNLayer(nn.Module):
    """The reference DiT block (model/adaln.py): modulated weight-only norms, gated residuals, MLP biases."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.input_layernorm = _RefLayerNorm(cfg)
        self.self_attention = _SelfAttention(cfg)
        self.pre_mlp_layernorm = _RefLayerNorm(cfg)
        self.mlp = _MLP(cfg, bias=True)
        self.modulation = _Modulation(cfg, 6)

    def attention_input(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift, scale = mod.chunk(6, dim=-1)[:2]
        return _modulate(self.input_layernorm(x), shift, scale)

    def attention_residual(self, x: torch.Tensor, a: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        return x + mod.chunk(6, dim=-1)[2] * self.self_attention.linear_proj(a)

    def mlp_residual(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = mod.chunk(6, dim=-1)[3:]
        h = _modulate(self.pre_mlp_layernorm(x), shift, scale)
        return x + gate * self.mlp.linear_fc2(F.gelu(self.mlp.linear_fc1(h), approximate="tanh"))


class _AdaLNFinalNorm(_RefLayerNorm):
    def __init__(self, cfg: NetConfig):
        super().__init__(cfg)
        self.modulation = _Modulation(cfg, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return _modulate(super().forward(x), shift, scale)


class _FinalNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


# arch -> (layer, final norm)
_ARCH_MODULES = {"megatron": (_Layer, None), "bd3lms": (_AdaLNLayer, _AdaLNFinalNorm)}


class _Decoder(nn.Module):
    def __init__(self, cfg: NetConfig):
        super().__init__()
        layer, final = _ARCH_MODULES[cfg.arch]
        self.layers = nn.ModuleList(layer(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = final(cfg) if final else _FinalNorm(cfg.hidden_size, eps=cfg.layernorm_eps)


class BD3Net(nn.Module):
    """BD3-LM forward passes for sampling and evaluation (no dropout: inference only)."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = _Embedding(cfg)
        if cfg.time_conditioning:
            self.time_embedding = TimeEmbedding(cfg.cond_dim)
        self.decoder = _Decoder(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.arch == "bd3lms")

    # ---- rotary ----
    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """The training model's SharedRotary table, always fp32 (not a buffer, so ``.to(bfloat16)`` keeps it)."""
        return rope_inv_freq(self.cfg.head_dim, self.cfg.rope_base).to(device)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [S, head_dim] (fp32) for integer positions [S]."""
        emb = rope_angles(positions, self.inv_freq(positions.device))
        return emb.cos(), emb.sin()

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)

    def shift_keys(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """Re-base post-rotary keys by ``-delta`` positions (RoPE rotations compose): used when the sliding
        window drops its oldest block, so cached keys keep positions 0.. like a recomputed window."""
        ang = torch.outer(
            torch.tensor([-float(delta)], dtype=torch.float64, device=k.device), self.inv_freq(k.device).double()
        )
        emb = torch.cat((ang, ang), dim=-1)
        return self._rope(k, emb.cos().float(), emb.sin().float())

    # ---- forward pieces ----
    def run(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [b, S, h] after the final LayerNorm for ``tokens`` [b, S] at ``positions`` [S].

        ``sigma`` [b] (time-conditioned bd3lms models only, where it is required) conditions the adaLN modulation;
        every other model ignores it (the reference zeroes sigma without time conditioning).

        Without ``cache`` the span attends to itself. With it, the span's post-rotary K/V are written at
        ``cache.length`` and queries attend to the ``cache.length`` cached entries followed by the span; the
        caller keeps the new entries by advancing ``cache.length``. ``attn_mask`` ([S, keys], bool, True = may
        attend) restricts attention; None lets every query see every key."""
        cfg = self.cfg
        b, s = tokens.shape
        x = self.embedding.word_embeddings(tokens)
        cos, sin = self.rotary(positions)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        t0 = cache.length if cache is not None else 0
        if cache is not None and t0 + s > cache.capacity:
            raise ValueError(f"KV cache overflow: {t0} cached + {s} new > capacity {cache.capacity}")
        c = self.condition(sigma)
        for i, layer in enumerate(self.decoder.layers):
            mod = layer.modulation(c)
            h = layer.attention_input(x, mod)
            qkv = layer.self_attention.linear_qkv(h).view(b, s, cfg.num_heads, 3, cfg.head_dim)
            q, k, v = (qkv[:, :, :, j].transpose(1, 2) for j in range(3))  # megatron: per head [q | k | v]
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            if cache is not None:
                cache.k[i][:, :, t0 : t0 + s] = k
                cache.v[i][:, :, t0 : t0 + s] = v
                k, v = cache.k[i][:, :, : t0 + s], cache.v[i][:, :, : t0 + s]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
            x = layer.attention_residual(x, a.transpose(1, 2).reshape(b, s, -1), mod)
            x = layer.mlp_residual(x, mod)
        return self.decoder.final_layernorm(x, c)

    def condition(self, sigma: torch.Tensor | None) -> torch.Tensor | None:
        """The conditioning vector c [b, cond] of a time-conditioned model (None otherwise: constant modulation).
        Raises ValueError when such a model gets no sigma."""
        if not self.cfg.time_conditioning:
            return None
        if sigma is None:
            raise ValueError("this model is time-conditioned (time_conditioning=true); pass sigma [b]")
        return self.time_embedding(sigma)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [..., V]; the mask token is -inf (SUBS: never predicted; padding rows were dropped)."""
        logits = self.output_layer(hidden).float()
        logits[..., self.cfg.mask_token_id] = float("-inf")
        return logits

    def bd3_logits(
        self,
        xt: torch.Tensor,
        x0: torch.Tensor,
        start: int = 0,
        end: int | None = None,
        block_size: int | None = None,
        sigma: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [b, end-start, V] of noisy positions [start, end) of the forward over x_t ⊕ x0 (each [b, P],
        P a multiple of the block size) with positions [0..P-1, 0..P-1] and the BD3 mask: the training forward."""
        end = xt.shape[1] if end is None else end
        return self.logits(self.bd3_hidden(xt, x0, block_size, sigma)[:, start:end])

    def causal_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states [b, S, h] of ``tokens`` [b, S] at positions 0..S-1 under a causal mask: the AR
        baseline's forward (the state at l predicts token l+1)."""
        s = tokens.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
        return self.run(tokens, torch.arange(s, device=tokens.device), attn_mask=causal)

    def full_logits(self, xt: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [b, S, V] of ``xt`` [b, S] at positions 0..S-1 under full attention, conditioned on ``sigma``
        [b] for time-conditioned models: the MDLM/SEDD training forward (x_t alone, no clean copy)."""
        positions = torch.arange(xt.shape[1], device=xt.device)
        return self.logits(self.run(xt, positions, sigma=sigma))

    def bd3_hidden(
        self, xt: torch.Tensor, x0: torch.Tensor, block_size: int | None = None, sigma: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states [b, 2P, h] of the x_t ⊕ x0 forward (see :meth:`bd3_logits`)."""
        p = xt.shape[1]
        pos = torch.arange(p, device=xt.device)
        mask = bd3_mask(p, block_size or self.cfg.block_size, device=xt.device)
        return self.run(torch.cat([xt, x0], dim=1), torch.cat([pos, pos]), attn_mask=mask, sigma=sigma)


class KVCache:
    """Post-rotary K and V per layer, preallocated [b, heads, capacity, head_dim]; the first ``length`` positions
    are valid. Only K and V are kept (queries of cached tokens are never needed again)."""

    def __init__(self, cfg: NetConfig, batch: int, capacity: int, device: torch.device, dtype: torch.dtype):
        shape = (batch, cfg.num_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.capacity = capacity
        self.length = 0

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (finished sequences leave the batch)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]

    def drop_oldest(self, n: int, net: BD3Net) -> None:
        """Slide the window: forget the oldest ``n`` positions and re-base the rest to start at position 0."""
        if n <= 0:
            return
        keep = self.length - n
        for i in range(len(self.k)):
            self.k[i][:, :, :keep] = net.shift_keys(self.k[i][:, :, n : self.length], n)
            self.v[i][:, :, :keep] = self.v[i][:, :, n : self.length].clone()
        self.length = keep


def build_net(
    cfg: NetConfig, state: dict[str, torch.Tensor] | None = None, device: str | torch.device = "cpu"
) -> BD3Net:
    """The network (fp32, eval mode) with ``state`` loaded strictly, shapes checked against
    :func:`expected_shapes` first; without ``state``, small random weights (benchmarks, tests)."""
    with torch.device("meta"):  # no throw-away random init of large matrices
        net = BD3Net(cfg)
    net = net.to_empty(device=device)
    if state is not None:
        want = expected_shapes(cfg)
        missing = sorted(set(want) - set(state))
        extra = sorted(set(state) - set(want))
        if missing or extra:
            raise ValueError(f"weights do not match the config: missing {missing[:4]}, unexpected {extra[:4]}")
        for name, shape in want.items():
            if tuple(state[name].shape) != shape:
                raise ValueError(f"{name} has shape {tuple(state[name].shape)}, the config implies {shape}")
        net.load_state_dict(state, strict=True)
    else:
        for p in net.parameters():
            nn.init.normal_(p, std=0.02)
        for mod in net.modules():
            if isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
            if isinstance(mod, _RefLayerNorm):
                nn.init.ones_(mod.weight)
    return net.eval()
