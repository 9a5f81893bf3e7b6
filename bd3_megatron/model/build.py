"""Build the BD3 model for this rank from the run configuration."""
from __future__ import annotations

import torch

from bd3_megatron.config import Config
from bd3_megatron.model.bd3_model import BD3Model, BD3Spec, build_transformer_config, init_parameters
from bd3_megatron.parallel.state import ParallelContext


def build_model(cfg: Config, ctx: ParallelContext, vocab_size: int, mask_token_id: int) -> BD3Model:
    m = cfg.model
    tconf = build_transformer_config(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_heads, ffn_hidden_size=m.ffn_hidden_size,
        dropout=m.dropout, tp=ctx.tp, pp=ctx.pp, use_cpu_initialization=not ctx.runtime.is_cuda,
        recompute=m.recompute)
    spec = BD3Spec(vocab_size=vocab_size, mask_token_id=mask_token_id, seq_len=m.seq_len, block_size=m.block_size,
                   attention_backend=m.attention_backend, mode=m.mode)
    model = BD3Model(tconf, spec, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage)
    init_parameters(model, cfg.train.seed)
    return model.to(ctx.runtime.device)


def precision_dtype(cfg: Config, is_cuda: bool) -> torch.dtype:
    p = cfg.train.precision
    if p == "auto":
        return torch.bfloat16 if is_cuda else torch.float32
    return torch.bfloat16 if p == "bf16" else torch.float32
