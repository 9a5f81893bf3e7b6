"""Builders for the bd3lms interop tests (plain functions, importable by the distributed workers)."""

from __future__ import annotations

from pathlib import Path

import torch

from bd3_megatron.checkpoint.sampler import SamplerCheckpoint

FIXTURE_HF = Path(__file__).parent / "fixtures" / "bd3lms" / "tiny_bd3lm"
BERT_VOCAB, BERT_MASK = 30522, 103


def bd3lms_megatron_model(ck: SamplerCheckpoint, attention_backend: str = "sdpa", dropout: float = 0.0):
    """A single-process megatron-core BD3Model with model.arch=bd3lms holding ``ck``'s weights (vocabulary padding
    rows zero), in eval mode."""
    from bd3_megatron.checkpoint.sharded import shard_for_rank
    from bd3_megatron.model.bd3_model import (
        BD3Model,
        BD3Spec,
        build_transformer_config,
        canonical_parameter_names,
        init_parameters,
    )

    c = ck.config
    tconf = build_transformer_config(
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        num_heads=c.num_heads,
        ffn_hidden_size=c.ffn_hidden_size,
        dropout=dropout,
        tp=1,
        pp=1,
        add_bias_linear=True,
    )
    spec = BD3Spec(
        vocab_size=c.vocab_size,
        mask_token_id=c.mask_token_id,
        seq_len=c.seq_len,
        block_size=c.block_size,
        attention_backend=attention_backend,
        arch="bd3lms",
    )
    model = BD3Model(tconf, spec)
    init_parameters(model, 0)
    names = canonical_parameter_names(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(shard_for_rank(ck.state[names[n]], p))
    return model.eval()


def bert_sized_reference_folder(out: Path) -> Path:
    """The golden fixture's reference model grown to the bert-base-uncased vocabulary (30,522 ids, [MASK] = 103,
    the reference's convention, inferred on import): the fixture's 96 rows first, the rest random (seeded), written
    in the HF BD3LM layout, so trainer runs with the project's bert tokenizer can start from it."""
    from bd3_megatron.checkpoint.sampler import _read_json, _read_weights, write_folder

    config, state = _read_json(FIXTURE_HF / "config.json"), _read_weights(FIXTURE_HF)
    gen = torch.Generator().manual_seed(7)
    for name in ("backbone.vocab_embed.embedding", "backbone.output_layer.linear.weight"):
        t = state[name]
        extra = torch.randn(BERT_VOCAB - t.shape[0], t.shape[1], generator=gen) * t.std()
        state[name] = torch.cat([t, extra])
    b = state["backbone.output_layer.linear.bias"]
    state["backbone.output_layer.linear.bias"] = torch.cat(
        [b, torch.randn(BERT_VOCAB - b.shape[0], generator=gen) * 0.3]
    )
    config = dict(config, vocab_size=BERT_VOCAB)
    config.pop("bd3_megatron", None)
    return write_folder(out, config, state)
