"""BD3 core attention for megatron-core's SelfAttention: one mask, two kernels.

megatron-core hands the core attention per-rank q [sq, b, np, hn] and k/v [sk, b, ng, hn] after RoPE. The mask
arrives as the ``attention_mask`` argument and is one of
  * a dense ``torch.BoolTensor`` [sq, sk], True where the query may attend the key (SDPA; CPU and tests), or
  * a FlexAttention ``BlockMask`` built from the same ``mask_mod`` (CUDA; skips empty tiles).
Both come from :mod:`bd3_megatron.diffusion.masks`, so the two kernels cannot disagree about the mask.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from bd3_megatron.diffusion.masks import noisy_query_rows

_COMPILED_FLEX = None


def _flex_attention(on_cuda: bool):
    """flex_attention, compiled once per process on CUDA. On CPU the eager kernel is used: it is a forward-only
    reference there (no CPU backward), good for checking flex against SDPA without a 25 s compile."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not on_cuda:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def is_block_mask(mask: Any) -> bool:
    return type(mask).__name__ == "BlockMask"


class BD3CoreAttention(MegatronModule):
    """Scaled dot-product attention under an arbitrary (BD3) mask; drop-in for megatron's core_attention."""

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        attention_dropout=None,
        softmax_scale=None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) != 0.0:
            raise ValueError(
                "BD3CoreAttention does not implement attention dropout; set attention_dropout=0 "
                "(the reference model uses dropout only on the residual branches)"
            )
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.layer_number = layer_number
        # set by NoisyHalfTransformerLayer: queries [2L] -> [L] (the noisy half), keys and values stay [2L]
        self.noisy_queries_only = False

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("BD3CoreAttention takes neither attention_bias nor packed sequences")
        if self.noisy_queries_only:
            query = query[: query.shape[0] // 2]
            attention_mask = noisy_query_rows(attention_mask, query.shape[0])
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        gqa = k.shape[1] != q.shape[1]
        if is_block_mask(attention_mask):
            out = _flex_attention(q.is_cuda)(
                q, k, v, block_mask=attention_mask, scale=self.softmax_scale, enable_gqa=gqa
            )
        else:
            if attention_mask is None or attention_mask.dtype != torch.bool:
                raise TypeError("BD3CoreAttention needs a bool mask (True = may attend) or a flex BlockMask")
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, scale=self.softmax_scale, enable_gqa=gqa
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
