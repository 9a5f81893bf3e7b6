"""Build the BD3 model for this rank from the run configuration."""

from __future__ import annotations

from bd3_megatron.config import Config
from bd3_megatron.model.bd3_model import BD3Model, BD3Spec, build_transformer_config, init_parameters
from bd3_megatron.modes import get_mode
from bd3_megatron.parallel.state import ParallelContext


def build_model(cfg: Config, ctx: ParallelContext, vocab_size: int, mask_token_id: int) -> BD3Model:
    m = cfg.model
    tconf = build_transformer_config(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_heads=m.num_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        dropout=m.dropout,
        tp=ctx.tp,
        pp=ctx.pp,
        use_cpu_initialization=not ctx.runtime.is_cuda,
        add_bias_linear=m.arch == "bd3lms",  # the reference DiT block's MLP and head biases
    )
    spec = BD3Spec(
        vocab_size=vocab_size,
        mask_token_id=mask_token_id,
        seq_len=m.seq_len,
        block_size=m.block_size,
        attention_backend=m.attention_backend,
        mode=m.mode,
        ce_chunk_tokens=m.ce_chunk_tokens,
        recompute=m.recompute,
        arch=m.arch,
        cond_dim=m.cond_dim if get_mode(m.mode).time_conditioned else 0,
    )
    model = BD3Model(tconf, spec, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage)
    init_parameters(model, cfg.train.seed)
    model = model.to(ctx.runtime.device)
    if compile_enabled(cfg, ctx.runtime.is_cuda):
        compile_layers(model)
    return model


def compile_enabled(cfg: Config, is_cuda: bool) -> bool:
    """``model.compile``: auto compiles on CUDA only (see the config comment for why not on CPU)."""
    return is_cuda if cfg.model.compile == "auto" else bool(cfg.model.compile)


def compile_layers(model: BD3Model) -> None:
    """torch.compile every transformer layer in place (static shapes: one graph per layer kind). Parameters,
    names and state_dict keys are unchanged, so checkpoints, EMA and the optimizer are unaffected. Compiling
    layers rather than the whole model keeps megatron's pipeline plumbing and the head's custom autograd eager."""
    for layer in model.decoder.layers:
        layer.compile(dynamic=False)
