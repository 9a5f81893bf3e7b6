"""The reference-compatible layer variant (``model.arch: bd3lms``): the bd3lms DiT block on megatron-core.

The reference's ``DDiTBlock`` (kuleshov-group/bd3lms ``models/dit.py`` and ``models/hf/modeling_bd3lm.py``; spec §8)
differs from megatron's pre-LN GPT layer in three ways, all reproduced here as ModuleSpec parts:

* weight-only LayerNorms (fp32, eps 1e-5, no bias): :class:`RefLayerNorm`;
* adaLN modulation from a conditioning vector c: per layer ``(shift, scale, gate)`` for attention and for the MLP,
  ``x + gate_msa·attn(LN(x)·(1+scale_msa) + shift_msa)`` then ``x + gate_mlp·mlp(LN(x)·(1+scale_mlp) + shift_mlp)``;
  the final norm has ``(shift, scale)``: :class:`AdaLNTransformerLayer`, :class:`AdaLNFinalNorm`;
* biases on the MLP linears and on the output head (none on the attention linears).

The modulation is ``W·c + b`` with ``c = silu(TimestepEmbedder(sigma))``. With time conditioning off (every BD3 and
MDLM model of the reference: it zeroes sigma) c is one constant vector, so the modulation is a per-layer constant:
:class:`ConstantModulation` holds it as one parameter ``modulation.bias`` [chunks·h] (imports compute it once as
``W·c₀ + b``). With time conditioning on, :class:`TimeModulation` adds ``modulation.weight`` [chunks·h, cond] and
reads c [b, cond] from the layer's ``context`` argument (megatron's TransformerBlock hands it to every layer).

Modulation parameters and LayerNorm weights are replicated over tensor-parallel ranks (they act on the full hidden
state, as megatron's own LayerNorms do); the MLP's fc1 bias and the head bias are split with their linears.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer

from bd3_megatron.model.attention import BD3CoreAttention

ATTN_CHUNKS = 6  # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (the reference's chunk order)
FINAL_CHUNKS = 2  # shift, scale


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference's ``modulate``: x·(1 + scale) + shift (same operation order, so the same rounding)."""
    return x * (1 + scale) + shift


class RefLayerNorm(MegatronModule):
    """The reference LayerNorm: ``F.layer_norm(x.float(), [h]) * weight`` (eps 1e-5, no bias). x [S, b, h]."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.eps = eps
        self.weight.sequence_parallel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype) * self.weight


class ConstantModulation(MegatronModule):
    """adaLN modulation without time conditioning: a per-layer constant ``bias`` [chunks·h], returned whatever c is.

    forward(c: ignored) -> [chunks·h] (broadcasts against [S, b, chunks·h])."""

    def __init__(self, config, chunks: int, cond_dim: int = 0):
        super().__init__(config=config)
        self.bias = torch.nn.Parameter(torch.zeros(chunks * config.hidden_size, dtype=config.params_dtype))

    def forward(self, c: torch.Tensor | None) -> torch.Tensor:
        return self.bias


class TimeModulation(ConstantModulation):
    """adaLN modulation from the time embedding: ``weight·c + bias``. c [b, cond] -> [1, b, chunks·h] (sequence
    first, broadcasting over positions). Raises ValueError without c."""

    def __init__(self, config, chunks: int, cond_dim: int):
        super().__init__(config, chunks)
        self.weight = torch.nn.Parameter(torch.zeros(chunks * config.hidden_size, cond_dim, dtype=config.params_dtype))

    def forward(self, c: torch.Tensor | None) -> torch.Tensor:
        if c is None:
            raise ValueError("a time-conditioned adaLN layer needs the conditioning vector c [b, cond] as context")
        return F.linear(c, self.weight, self.bias)[None]


def _modulation_spec(chunks: int, cond_dim: int) -> ModuleSpec:
    if cond_dim:
        return ModuleSpec(module=TimeModulation, params={"chunks": chunks, "cond_dim": cond_dim})
    return ModuleSpec(module=ConstantModulation, params={"chunks": chunks})


class _NoBiasColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """The reference's attention QKV has no bias, whatever ``add_bias_linear`` says for the MLP."""

    def __init__(self, *args, bias: bool = True, **kwargs):
        super().__init__(*args, bias=False, **kwargs)


class _NoBiasRowParallelLinear(tensor_parallel.RowParallelLinear):
    """The reference's attention output projection has no bias."""

    def __init__(self, *args, bias: bool = True, **kwargs):
        super().__init__(*args, bias=False, **kwargs)


class AdaLNTransformerLayer(TransformerLayer):
    """The reference DiT block over [S, b, h] hidden states (S = 2L for x_t ⊕ x0) with the BD3 mask.

    forward(hidden_states [S, b, h], attention_mask, context = c [b, cond] or None, rotary_pos_emb) ->
    (hidden [S', b, h], context), S' = S, or L for the noisy-half last layer. Dropout (``hidden_dropout``) acts on
    each residual branch before its gate, as the reference's ``bias_dropout_add_scale``. ``recompute`` (set by the
    model) wraps the layer in torch's non-reentrant checkpoint, as :class:`BD3TransformerLayer` does."""

    recompute = False
    noisy_half = False  # NoisyHalfAdaLNLayer: queries and outputs for the first half of the rows only

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None, **kwargs):
        super().__init__(config, submodules, layer_number=layer_number, hidden_dropout=hidden_dropout, **kwargs)
        self.modulation = self._modulation_module(config)
        self.self_attention.core_attention.noisy_queries_only = self.noisy_half

    def _modulation_module(self, config):
        return build_module(self.submodules_config.modulation, config=config)

    def forward(self, *args, **kwargs):
        if self.recompute and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._block, *args, use_reentrant=False, **kwargs)
        return self._block(*args, **kwargs)

    def _residual_rows(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def _block(self, hidden_states, attention_mask=None, context=None, rotary_pos_emb=None, **unused):
        ignored = {k: v for k, v in unused.items() if v is not None and k not in ("context_mask", "padding_mask")}
        if ignored:
            raise NotImplementedError(f"{type(self).__name__} does not take {sorted(ignored)}")
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(context).chunk(ATTN_CHUNKS, dim=-1)
        x = self._residual_rows(hidden_states)
        attn, attn_bias = self.self_attention(
            modulate(self.input_layernorm(hidden_states), shift1, scale1),
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
        )
        assert attn_bias is None  # the reference's attention has no bias (_NoBias* linears)
        x = x + gate1 * F.dropout(attn, p=self.hidden_dropout, training=self.training)
        out, out_bias = self.mlp(modulate(self.pre_mlp_layernorm(x), shift2, scale2))
        out = out + out_bias  # fc2's bias, added after the tensor-parallel all-reduce (skip_bias_add)
        x = x + gate2 * F.dropout(out, p=self.hidden_dropout, training=self.training)
        return x, context


class NoisyHalfAdaLNLayer(AdaLNTransformerLayer):
    """:class:`AdaLNTransformerLayer` computing outputs for the noisy half [L, b, h] only (the model's last layer):
    K/V from all 2L rows, queries, residual and MLP from the first L (see ``NoisyHalfTransformerLayer``)."""

    noisy_half = True

    def _residual_rows(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[: hidden_states.shape[0] // 2]


class AdaLNFinalNorm(RefLayerNorm):
    """The reference final layer's norm: ``modulate(RefLayerNorm(x), shift, scale)`` (``weight`` [h],
    ``modulation.bias`` [2h], and ``modulation.weight`` [2h, cond] when ``cond_dim`` > 0). x [S, b, h] -> [S, b, h];
    the head (with its bias) follows.

    megatron's TransformerBlock calls its final norm with the hidden states alone, so a time-conditioned model hands
    c [b, cond] over in ``context`` just before the block runs (``BD3Model._stream_hidden``); one forward pass is
    atomic on a stage, so the value read is always that micro-batch's."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, cond_dim: int = 0):
        super().__init__(config, hidden_size, eps)
        self.modulation = build_module(_modulation_spec(FINAL_CHUNKS, cond_dim), config=config)
        self.context: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(self.context).chunk(FINAL_CHUNKS, dim=-1)
        return modulate(super().forward(x), shift, scale)


def adaln_final_norm_spec(cond_dim: int = 0) -> ModuleSpec:
    """The final norm of the reference DiT, time-conditioned when ``cond_dim`` > 0."""
    return ModuleSpec(module=AdaLNFinalNorm, params={"cond_dim": cond_dim})


def adaln_layer_spec(noisy_queries_only: bool = False, cond_dim: int = 0) -> ModuleSpec:
    """megatron-core local GPT layer spec turned into the reference DiT block: weight-only norms, bias-free
    attention linears with the BD3 core attention, MLP linears with bias (``config.add_bias_linear``), adaLN
    modulation (constant, or from c when ``cond_dim`` > 0)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    spec = get_gpt_layer_local_spec()
    sub = spec.submodules
    sub.input_layernorm = RefLayerNorm
    sub.pre_mlp_layernorm = RefLayerNorm
    sub.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    sub.self_attention.submodules.core_attention = BD3CoreAttention
    sub.self_attention.submodules.linear_qkv = _NoBiasColumnParallelLinear
    sub.self_attention.submodules.linear_proj = _NoBiasRowParallelLinear
    sub.modulation = _modulation_spec(ATTN_CHUNKS, cond_dim)
    spec.module = NoisyHalfAdaLNLayer if noisy_queries_only else AdaLNTransformerLayer
    return spec
