"""A training checkpoint of any TP/PP/ZeRO layout read as one single-device :class:`SamplerCheckpoint`.

The shards are merged by :func:`bd3_megatron.checkpoint.sharded.load_full_weights` (the project's only merge);
here the vocabulary padding rows are dropped and the result is checked against the network's expected shapes.
Used by ``tools/convert.py``, ``tools/eval_ppl.py`` (own checkpoints as generative-perplexity scorers) and tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bd3_megatron.checkpoint import sharded as ckpt
from bd3_megatron.checkpoint.sampler import SamplerCheckpoint, check_state, detect_format, load_checkpoint
from bd3_megatron.modes import get_mode
from bd3_megatron.sampling.net import NetConfig

_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias")


def resolve_step_dir(path: Path, step: int | None) -> Path:
    """The step directory to read: ``step`` or ``latest`` under a root, or the given step directory."""
    path = Path(path)
    if (path / "latest").exists():
        if step is None:
            resolved = ckpt.resolve_checkpoint("auto", path)
            if resolved is None:
                raise ckpt.CheckpointError(f"{path} has no published checkpoint")
            return resolved
        step_dir = path / ckpt.step_dir_name(step)
        if not step_dir.is_dir():
            have = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith("step_"))
            raise FileNotFoundError(f"{path} has no checkpoint for step {step}; available: {', '.join(have) or 'none'}")
        return step_dir
    if (path / "metadata.json").exists() or path.name.startswith("step_"):
        return path
    raise FileNotFoundError(f"{path} is not a training checkpoint (no 'latest' and no metadata.json)")


def is_training_checkpoint(path: Path) -> bool:
    path = Path(path)
    return (path / "latest").exists() or (path / "metadata.json").exists()


def net_config_from_metadata(meta: dict[str, Any]) -> NetConfig:
    try:
        m = meta["config"]["model"]
        mode = m.get("mode", "bd3")
        if not get_mode(mode).sampler_net:
            raise ValueError(
                f"this checkpoint is a model.mode={mode} baseline; the sampler checkpoint format holds "
                f"bd3 and sedd models and the ar baseline (evaluate {mode} with tools/eval_ppl.py)"
            )
        return NetConfig(
            num_layers=m["num_layers"],
            hidden_size=m["hidden_size"],
            num_heads=m["num_heads"],
            ffn_hidden_size=m.get("ffn_hidden_size") or 4 * m["hidden_size"],
            vocab_size=int(meta["vocab_size"]),
            mask_token_id=int(meta["mask_token_id"]),
            seq_len=m["seq_len"],
            block_size=m["block_size"],
            mode=mode,
            dropout=m.get("dropout"),
            arch=m.get("arch", "megatron"),
            time_conditioning=get_mode(mode).time_conditioned,
            cond_dim=m["cond_dim"] if get_mode(mode).time_conditioned else 0,
        )
    except KeyError as exc:
        raise ValueError(f"checkpoint metadata lacks {exc}; it was not written by this trainer") from None


def clip_window_of(meta: dict[str, Any]) -> tuple[float, float]:
    """The window training used at this step: ``clip_window`` [eps_min, eps_max] (the variance search's choice)
    when recorded, else the configured diffusion.eps_min/eps_max."""
    window = meta.get("clip_window")
    if window is not None:
        if not (isinstance(window, (list, tuple)) and len(window) == 2):
            raise ValueError(f"metadata clip_window {window!r} is not [eps_min, eps_max]")
        return float(window[0]), float(window[1])
    d = meta["config"].get("diffusion", {})
    return float(d.get("eps_min", 1e-3)), float(d.get("eps_max", 1.0))


def gather_training_checkpoint(
    step_dir: Path, weights: str | None = None, log: Callable[[str], None] = print
) -> SamplerCheckpoint:
    """Full fp32 weights of a training checkpoint: ``weights`` = "ema", "raw" or None (EMA when present)."""
    step_dir = Path(step_dir)
    meta = ckpt.read_metadata(step_dir)  # refuses partial/truncated checkpoints
    cfg = net_config_from_metadata(meta)
    full, ema = ckpt.load_full_weights(step_dir, meta, log=log)
    if weights == "ema" and ema is None:
        raise ValueError(f"{step_dir} holds no EMA weights (trained with optim.ema=0); pass --raw")
    use = weights or ("ema" if ema is not None else "raw")
    if weights is None and ema is None:
        log(f"note: {step_dir} holds no EMA weights; using the raw weights")
    tensors = ema["shadow"] if use == "ema" else full
    state: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.float()
        if name in _VOCAB_ROWS:
            if t.shape[0] < cfg.vocab_size:
                raise ckpt.CheckpointError(f"{name} has {t.shape[0]} rows < vocabulary {cfg.vocab_size}")
            t = t[: cfg.vocab_size]  # rows beyond the vocabulary are TP padding
        state[name] = t.contiguous()
    check_state(cfg, state)
    source = {
        "kind": "training-checkpoint",
        "path": str(step_dir.resolve()),
        "step": int(meta["step"]),
        "layout": meta["layout"],
        "weights": use,
    }
    return SamplerCheckpoint(
        cfg, state, tokenizer=meta.get("tokenizer"), clip_window=clip_window_of(meta), source=source
    )


def read_input(
    path: Path, step: int | None = None, weights: str | None = None, log: Callable[[str], None] = print
) -> SamplerCheckpoint:
    """A training checkpoint (root or step dir), a native/HF sampler folder or a bd3lms Lightning ``.ckpt``, as a
    SamplerCheckpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_file() and path.suffix == ".ckpt":  # the reference's own Lightning training checkpoint
        from bd3_megatron.checkpoint.lightning import load_lightning

        if step is not None:
            raise ValueError("--step applies to this project's training checkpoints; a .ckpt holds one step")
        log(f"input: bd3lms Lightning checkpoint {path} (read without executing pickled code)")
        return load_lightning(path, weights)
    if (path / "config.json").is_file() and not (path / "metadata.json").exists():
        if step is not None or weights is not None:
            raise ValueError("--step/--ema/--raw apply to training checkpoints only; this input is a sampler folder")
        log(f"input: {detect_format(path)} sampler folder {path}")
        return load_checkpoint(path)
    step_dir = resolve_step_dir(path, step)
    log(f"input: training checkpoint {step_dir}")
    return gather_training_checkpoint(step_dir, weights, log=log)
