"""``checkpoint.init_from`` of weights that are not one of this trainer's checkpoints: a sampler folder (native or
the reference's HF ``BD3LM`` layout) or a reference Lightning ``.ckpt``.

:func:`read_foreign` returns the canonical full weights and the model config they need; :func:`weights_for_rank`
checks them against the run's config and slices them for this rank's parameters (any TP/PP layout; vocabulary
padding rows added as zeros), so the trainer only copies them in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bd3_megatron.checkpoint.sampler import SamplerCheckpoint, load_checkpoint
from bd3_megatron.checkpoint.sharded import CheckpointError, shard_for_rank
from bd3_megatron.modes import get_mode


def is_foreign(spec: str) -> bool:
    """True for a ``.ckpt`` file or a folder holding ``config.json`` (a sampler / HF folder), not a training run."""
    path = Path(spec)
    if path.is_file():
        return path.suffix == ".ckpt"
    return (path / "config.json").is_file() and not (path / "metadata.json").exists()


def read_foreign(spec: str, weights: str = "ema") -> SamplerCheckpoint:
    """Native full weights (canonical names, real vocabulary) + their NetConfig. ``weights`` picks a Lightning
    checkpoint's EMA or raw weights (a sampler folder holds one set)."""
    path = Path(spec)
    try:
        if path.is_file():
            from bd3_megatron.checkpoint.lightning import load_lightning

            return load_lightning(path, weights)
        return load_checkpoint(path)
    except (ValueError, FileNotFoundError) as exc:
        raise CheckpointError(f"checkpoint.init_from {spec}: {exc}") from None


def required_model_config(ck: SamplerCheckpoint) -> dict[str, object]:
    """The ``model.*`` values a run must have to hold these weights."""
    c = ck.config
    return {
        "arch": c.arch,
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "num_heads": c.num_heads,
        "ffn_hidden_size": c.ffn_hidden_size,
    }


def weights_for_rank(
    ck: SamplerCheckpoint,
    model_cfg,
    vocab_size: int,
    mask_token_id: int,
    tokenizer: str | None,
    named: dict[str, torch.Tensor],
    canonical: dict[str, str],
    where: str,
) -> dict[str, torch.Tensor]:
    """This rank's shards of ``ck`` keyed by canonical name, or CheckpointError naming the first mismatch (model
    config with the override that fixes it, vocabulary, mask id, tokenizer, time conditioning, tensor names)."""
    for key, want in required_model_config(ck).items():
        have = getattr(model_cfg, key)
        if key == "ffn_hidden_size":
            have = have or 4 * model_cfg.hidden_size
        if have != want:
            raise CheckpointError(f"checkpoint.init_from {where} needs model.{key}={want} (this run has {have})")
    conditioned = get_mode(model_cfg.mode).time_conditioned
    if ck.config.time_conditioning != conditioned:
        raise CheckpointError(
            f"checkpoint.init_from {where} is {'' if ck.config.time_conditioning else 'not '}time-conditioned "
            f"(time_conditioning={str(ck.config.time_conditioning).lower()}) but model.mode={model_cfg.mode} "
            f"{'is' if conditioned else 'is not'}; "
            + ("use model.mode=sedd" if ck.config.time_conditioning else "start from a time-conditioned model")
        )
    if conditioned and ck.config.cond_dim != model_cfg.cond_dim:
        raise CheckpointError(
            f"checkpoint.init_from {where} needs model.cond_dim={ck.config.cond_dim} "
            f"(this run has {model_cfg.cond_dim})"
        )
    if (ck.config.vocab_size, ck.config.mask_token_id) != (vocab_size, mask_token_id):
        raise CheckpointError(
            f"checkpoint.init_from {where} has vocabulary {ck.config.vocab_size} (mask id {ck.config.mask_token_id}) "
            f"but this run's tokenizer gives {vocab_size} (mask id {mask_token_id})"
        )
    if ck.tokenizer is not None and tokenizer is not None and ck.tokenizer != tokenizer:
        raise CheckpointError(f"checkpoint.init_from {where} uses tokenizer {ck.tokenizer!r}, this run {tokenizer!r}")
    mine = {canonical[n]: p for n, p in named.items()}
    missing = sorted(set(mine) - set(ck.state))  # a pipeline stage holds a subset of the layers
    if missing:
        raise CheckpointError(f"checkpoint.init_from {where} lacks tensors this model needs (e.g. {missing[:4]})")
    return {c: shard_for_rank(ck.state[c].to(p.dtype), p) for c, p in mine.items()}
