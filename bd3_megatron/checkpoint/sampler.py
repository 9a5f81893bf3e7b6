"""The single-device sampler checkpoint: ``model.safetensors`` + ``config.json``, readable with torch alone.

Two layouts are read and written:

* ``native`` (here) — the training checkpoint's canonical tensor names (global layer indices, TP shards merged,
  vocabulary padding dropped) and a config.json with ``"format": "bd3-megatron-sampler"``: model sizes, block size,
  vocabulary, mask id, tokenizer name, clip window, where the weights came from.
* ``hf`` (``bd3_megatron.checkpoint.hf``) — the reference ``BD3LM`` Hugging Face layout.

Nothing here executes code from a file: safetensors and JSON only (a ``pytorch_model.bin`` is read with
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bd3_megatron.sampling.net import NetConfig, expected_shapes

FORMAT = "bd3-megatron-sampler"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class SamplerCheckpoint:
    """Weights (native names, fp32) + the model config + descriptive metadata (tokenizer, clip window, source)."""

    config: NetConfig
    state: dict[str, torch.Tensor]
    tokenizer: str | None = None
    clip_window: tuple[float, float] = (1e-3, 1.0)
    source: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what an import ignored and why (printed by convert)

    def config_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.config.to_dict(),
            "tokenizer": self.tokenizer,
            "clip_window": {"eps_min": self.clip_window[0], "eps_max": self.clip_window[1]},
            "source": self.source,
        }


# ---------------------------------------------------------------------------------------------- files
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged") from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / WEIGHTS_FILE
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"cannot read {st} ({exc}); the file is truncated or not a safetensors file") from None
    binf = folder / "pytorch_model.bin"
    if binf.is_file():
        try:
            return torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for damaged zip/pickle data
            raise ValueError(f"cannot read {binf} ({type(exc).__name__}: {exc}); the file is damaged") from None
    raise FileNotFoundError(
        f"{folder} has no {WEIGHTS_FILE}; pass a folder written by tools/convert.py or an HF bd3lm folder"
    )


def write_folder(out: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Path:
    """Write config.json + model.safetensors into a new folder, published by rename (never over a non-empty one)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} already exists and is not empty; choose a new folder (nothing is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in state.items()},
            str(tmp / WEIGHTS_FILE),
            metadata={"format": "pt"},
        )
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / WEIGHTS_FILE, 0o644 & ~umask)  # safetensors creates it owner-only
        os.replace(tmp, out)  # an existing empty folder is replaced atomically too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def detect_format(folder: str | Path) -> str:
    """``native`` or ``hf`` for a sampler folder; raises for anything else (with what it is instead)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        if (folder / "latest").exists() or (folder / "metadata.json").exists():
            raise ValueError(
                f"{folder} is a training checkpoint; convert it first: python tools/convert.py "
                f"--input {folder} --output DIR"
            )
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}; pass a folder written by tools/convert.py")
    cfg = _read_json(cfg_file)
    if cfg.get("format") == FORMAT:
        return "native"
    if cfg.get("model_type") == "bd3lm":
        return "hf"
    raise ValueError(
        f"{cfg_file} is neither a bd3-megatron sampler config (format={FORMAT!r}) nor a Hugging Face "
        f"bd3lm config (model_type='bd3lm')"
    )


def save_native(ckpt: SamplerCheckpoint, out: str | Path) -> Path:
    check_state(ckpt.config, ckpt.state)
    return write_folder(out, ckpt.config_json(), ckpt.state)


def load_native(folder: str | Path) -> SamplerCheckpoint:
    folder = Path(folder)
    cfg = _read_json(folder / CONFIG_FILE)
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE} is not a {FORMAT} config")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder} has sampler format version {cfg.get('format_version')}, this code reads {FORMAT_VERSION}"
        )
    net_cfg = NetConfig.from_dict(cfg["model"])
    state = _read_weights(folder)
    check_state(net_cfg, state)
    win = cfg.get("clip_window") or {}
    return SamplerCheckpoint(
        net_cfg,
        state,
        tokenizer=cfg.get("tokenizer"),
        clip_window=(float(win.get("eps_min", 1e-3)), float(win.get("eps_max", 1.0))),
        source=cfg.get("source", {}),
    )


def load_checkpoint(folder: str | Path) -> SamplerCheckpoint:
    """A sampler checkpoint in either layout, as native weights."""
    if detect_format(folder) == "native":
        return load_native(folder)
    from bd3_megatron.checkpoint.hf import load_hf

    return load_hf(folder)


def save_checkpoint(ckpt: SamplerCheckpoint, out: str | Path, fmt: str = "native") -> Path:
    if fmt == "native":
        return save_native(ckpt, out)
    if fmt == "hf":
        from bd3_megatron.checkpoint.hf import save_hf

        return save_hf(ckpt, out)
    raise ValueError(f"unknown format {fmt!r}; use native or hf")


def check_state(cfg: NetConfig, state: dict[str, torch.Tensor]) -> None:
    """Exactly the expected tensors with the expected shapes, all finite floating point."""
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing:
        raise ValueError(f"weights lack {len(missing)} tensors (e.g. {missing[:3]}); the checkpoint is incomplete")
    if extra:
        raise ValueError(f"weights hold {len(extra)} tensors this model does not have (e.g. {extra[:3]})")
    for name, shape in want.items():
        t = state[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, the config implies {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} has dtype {t.dtype}, expected a floating point tensor")


# ---------------------------------------------------------------------------------------------- summary
def checksum(t: torch.Tensor) -> str:
    """First 12 hex digits of the SHA-256 of the tensor's bytes (layout-independent identity of a weight)."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:12]


def summary_table(state: dict[str, torch.Tensor]) -> str:
    """name | shape | dtype | params | checksum, one row per tensor plus a total."""
    rows = [
        (n, "x".join(map(str, t.shape)) or "scalar", str(t.dtype).replace("torch.", ""), t.numel(), checksum(t))
        for n, t in state.items()
    ]
    w = max([len(r[0]) for r in rows] + [4])
    lines = [f"{'name':<{w}}  {'shape':>14}  {'dtype':>8}  {'params':>11}  checksum"]
    lines += [f"{n:<{w}}  {s:>14}  {d:>8}  {p:>11,}  {c}" for n, s, d, p, c in rows]
    lines.append(f"{'total':<{w}}  {'':>14}  {'':>8}  {sum(r[3] for r in rows):>11,}  {len(rows)} tensors")
    return "\n".join(lines)
