"""``python tools/convert.py --input CKPT_DIR [--step N] [--ema|--raw] --output DIR [--format native|hf]``

Turns a training checkpoint of any TP/PP/ZeRO layout into the single-device sampler checkpoint
(``model.safetensors`` + ``config.json``, loadable with torch + safetensors alone), or moves weights between the
native and the reference (bd3lms Hugging Face ``BD3LM``) layouts in either direction. ``--input`` may be

* a training checkpoint root (holding ``latest``) or one of its ``step_XXXXXXXX`` directories,
* a sampler folder written by this tool (native), or an HF bd3lm folder (import).

Tensor-parallel shards are concatenated along their partition dimension in rank order; pipeline stages each
contribute their own (globally numbered) layers; ZeRO does not touch the model files. Vocabulary padding rows are
dropped. EMA weights are exported by default. Bad input ends with one ``error:`` line and exit code 2; an existing
output folder is never overwritten.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tools/convert.py` from anywhere
    sys.path.insert(0, str(ROOT))

from bd3_megatron.sampling.export import (SamplerCheckpoint, check_state, detect_format, load_checkpoint,  # noqa: E402
                                          save_checkpoint, summary_table, to_hf)
from bd3_megatron.sampling.net import NetConfig  # noqa: E402
from bd3_megatron.training import checkpoint as ckpt  # noqa: E402

# How megatron-core splits each tensor across tensor-parallel ranks, for checkpoints that do not record it.
_DEFAULT_PARTITION = {"word_embeddings.weight": 0, "output_layer.weight": 0, "linear_qkv.weight": 0,
                      "linear_fc1.weight": 0, "linear_proj.weight": 1, "linear_fc2.weight": 1}
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def default_partition(name: str) -> int | None:
    for suffix, dim in _DEFAULT_PARTITION.items():
        if name.endswith(suffix):
            return dim
    return None


def resolve_step_dir(path: Path, step: int | None) -> Path:
    """The step directory to read: ``--step`` or ``latest`` under a root, or the given step directory."""
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


def net_config_from_metadata(meta: dict[str, Any]) -> NetConfig:
    try:
        m = meta["config"]["model"]
        if m.get("mode", "bd3") != "bd3":
            raise ValueError(f"this checkpoint is a model.mode={m['mode']} baseline; the sampler checkpoint format "
                             f"holds bd3 models only (evaluate baselines with tools/eval_ppl.py)")
        return NetConfig(num_layers=m["num_layers"], hidden_size=m["hidden_size"], num_heads=m["num_heads"],
                         ffn_hidden_size=m.get("ffn_hidden_size") or 4 * m["hidden_size"],
                         vocab_size=int(meta["vocab_size"]), mask_token_id=int(meta["mask_token_id"]),
                         seq_len=m["seq_len"], block_size=m["block_size"])
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


def gather_training_checkpoint(step_dir: Path, weights: str | None = None, log=print) -> SamplerCheckpoint:
    """Full fp32 weights of a training checkpoint: ``weights`` = "ema", "raw" or None (EMA when present)."""
    meta = ckpt.read_metadata(step_dir)  # refuses partial/truncated checkpoints
    cfg = net_config_from_metadata(meta)
    tp, pp = int(meta["layout"]["tp"]), int(meta["layout"]["pp"])
    files = {(t, p): step_dir / f"model_tp{t:02d}_pp{p:02d}.pt" for p in range(pp) for t in range(tp)}
    missing = [f.name for f in files.values() if not f.exists()]
    if missing:
        raise ckpt.CheckpointError(f"{step_dir} (tp={tp}, pp={pp}) lacks {', '.join(missing)}")
    loaded = {k: ckpt.load_file(f) for k, f in files.items()}
    has_ema = all("ema" in s for s in loaded.values())
    if weights == "ema" and not has_ema:
        raise ValueError(f"{step_dir} holds no EMA weights (trained with optim.ema=0); pass --raw")
    use = weights or ("ema" if has_ema else "raw")
    if weights is None and not has_ema:
        log(f"note: {step_dir} holds no EMA weights; exporting the raw weights")

    # name -> {tp_rank: tensor}, each name owned by exactly one pipeline stage
    shards: dict[str, dict[int, torch.Tensor]] = {}
    owner: dict[str, int] = {}
    partition: dict[str, int | None] = {}
    for (t, p), state in loaded.items():
        if "model" not in state:
            raise ckpt.CheckpointError(f"{files[(t, p)]} has no 'model' entry; not a model shard")
        tensors = state["ema"]["shadow"] if use == "ema" else state["model"]
        recorded = state.get("tp_partition") or {}
        for name, tensor in tensors.items():
            if owner.setdefault(name, p) != p:
                raise ckpt.CheckpointError(f"{name} appears in pipeline stages {owner[name]} and {p}")
            shards.setdefault(name, {})[t] = tensor
            partition[name] = recorded[name] if name in recorded else default_partition(name)
    state: dict[str, torch.Tensor] = {}
    for name, by_rank in sorted(shards.items()):
        if sorted(by_rank) != list(range(tp)):
            raise ckpt.CheckpointError(f"{name}: shards for tp ranks {sorted(by_rank)} of {tp}")
        parts = [by_rank[r].float() for r in range(tp)]
        dim = partition[name]
        if dim is None:
            for r, other in enumerate(parts[1:], start=1):
                if not torch.equal(other, parts[0]):
                    log(f"warning: replicated {name} differs between tp ranks 0 and {r} (max |diff| "
                        f"{(other - parts[0]).abs().max().item():.3g}); using rank 0")
            full = parts[0]
        else:
            full = torch.cat(parts, dim=dim)
        if name in _VOCAB_ROWS:
            if full.shape[0] < cfg.vocab_size:
                raise ckpt.CheckpointError(f"{name} has {full.shape[0]} rows < vocabulary {cfg.vocab_size}")
            full = full[: cfg.vocab_size]  # rows beyond the vocabulary are TP padding
        state[name] = full.contiguous()
    check_state(cfg, state)
    clip = clip_window_of(meta)
    source = {"kind": "training-checkpoint", "path": str(step_dir.resolve()), "step": int(meta["step"]),
              "layout": meta["layout"], "weights": use}
    return SamplerCheckpoint(cfg, state, tokenizer=meta.get("tokenizer"), clip_window=clip, source=source)


def read_input(path: Path, step: int | None, weights: str | None, log=print) -> SamplerCheckpoint:
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if (path / "config.json").is_file() and not (path / "metadata.json").exists():
        if step is not None or weights is not None:
            raise ValueError("--step/--ema/--raw apply to training checkpoints only; this input is a sampler folder")
        fmt = detect_format(path)
        log(f"input: {fmt} sampler folder {path}")
        return load_checkpoint(path)
    step_dir = resolve_step_dir(path, step)
    log(f"input: training checkpoint {step_dir}")
    return gather_training_checkpoint(step_dir, weights, log=log)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/convert.py", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, type=Path, help="training checkpoint (root or step dir), or a "
                                                             "native/HF sampler folder")
    p.add_argument("--step", type=int, default=None, help="step to export (default: the one 'latest' names)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ema", dest="weights", action="store_const", const="ema", help="export EMA weights (default)")
    g.add_argument("--raw", dest="weights", action="store_const", const="raw", help="export the raw weights")
    p.add_argument("--output", required=True, type=Path, help="new folder for config.json + model.safetensors")
    p.add_argument("--format", choices=("native", "hf"), default="native",
                   help="native (this project) or hf (the reference bd3lms BD3LM layout)")
    p.add_argument("--quiet", action="store_true", help="no summary table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ck = read_input(args.input, args.step, args.weights)
        out = save_checkpoint(ck, args.output, args.format)
    except (ValueError, FileNotFoundError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    c = ck.config
    print(f"model: {c.num_layers} layers x {c.hidden_size} (heads {c.num_heads}, ffn {c.ffn_hidden_size}), "
          f"L={c.seq_len} L'={c.block_size}, vocab {c.vocab_size} (mask id {c.mask_token_id}), tokenizer "
          f"{ck.tokenizer}, clip window [{ck.clip_window[0]:g}, {ck.clip_window[1]:g}]")
    print(f"source: {json.dumps(ck.source, sort_keys=True)}")
    for note in ck.notes:
        print(f"note: {note}")
    if not args.quiet:
        print(summary_table(ck.state if args.format == "native" else to_hf(ck)[1]))
    print(f"wrote {args.format} checkpoint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
