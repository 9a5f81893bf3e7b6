"""Crash-safe checkpoints: written under a temporary name, published by rename, tracked by ``latest``.

Layout of ``checkpoint.dir``::

    latest                       one line: the name of the newest complete checkpoint (written last)
    step_00000500/
        metadata.json            config, step, consumed samples, layout, library versions, file sizes
        model_tp00_pp00.pt       model (+ EMA) shard of one (tp, pp) position, written by data-parallel rank 0
        optim_tp00_pp00_dp000.pt optimizer state (ZeRO partition) of one rank
        rng_rank00000.pt         RNG states of one rank

Every torch file is read with ``weights_only=True``; metadata is JSON. A directory that ``latest`` does not name,
or whose files do not match the sizes recorded in its metadata, is never loaded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bd3_megatron.parallel import device

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and what is wrong."""


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    rank: int

    def model_file(self) -> str:
        return f"model_tp{self.tp_rank:02d}_pp{self.pp_rank:02d}.pt"

    def optim_file(self, dp_rank: int | None = None) -> str:
        dp_rank = self.dp_rank if dp_rank is None else dp_rank
        return f"optim_tp{self.tp_rank:02d}_pp{self.pp_rank:02d}_dp{dp_rank:03d}.pt"

    def rng_file(self) -> str:
        return f"rng_rank{self.rank:05d}.pt"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "megatron-core", "deepspeed", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import random as mrandom

    state = {"torch": torch.get_rng_state()}
    accel = device.accelerator_rng_state()
    if accel is not None:
        state["cuda"] = accel
    if mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED:
        state["tracker"] = mrandom.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    torch.set_rng_state(state["torch"])
    device.set_accelerator_rng_state(state.get("cuda"))
    if "tracker" in state:
        mrandom.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(root: str | Path, step: int, layout: Layout, *, model_state: dict, optim_state: dict,
                    metadata: dict[str, Any], keep: int = 0) -> Path:
    """Collective: every rank calls it. Returns the published directory."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if layout.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # leftover of a crashed save: never a published checkpoint
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    if layout.dp_rank == 0:
        torch.save(model_state, tmp / layout.model_file())
    torch.save(optim_state, tmp / layout.optim_file())
    torch.save(rng_state(), tmp / layout.rng_file())
    _barrier()
    if layout.rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        meta = dict(metadata, format_version=FORMAT_VERSION, step=step, saved_at=time.time(),
                    layout={"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}, versions=_library_versions(),
                    files=files)
        _atomic_write_text(tmp / "metadata.json", json.dumps(meta, indent=2, sort_keys=True))
        if final.exists():  # re-saving the same step (e.g. after a resume): replace only once the new one is whole
            old = root / (step_dir_name(step) + ".old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _atomic_write_text(root / "latest", final.name + "\n")
        if keep:
            _prune(root, keep, protect=final.name)
    _barrier()
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name))
    for old in steps[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(spec: str, root: str | Path | None) -> Path | None:
    """``auto``: the directory ``root/latest`` names, or None if no checkpoint was published yet;
    ``none``: None; otherwise an explicit checkpoint directory (or a root holding ``latest``)."""
    if spec == "none":
        return None
    if spec == "auto":
        if root is None:
            return None
        tracker = Path(root) / "latest"
        if not tracker.exists():
            return None
        name = tracker.read_text().strip()
        path = Path(root) / name
        if not _STEP_RE.match(name) or not path.is_dir():
            raise CheckpointError(f"{tracker} names '{name}', which is not a checkpoint directory; restore it or "
                                  f"pass checkpoint.resume=<dir> explicitly")
        return path
    path = Path(spec)
    if (path / "latest").exists():
        return resolve_checkpoint("auto", path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def read_metadata(path: Path) -> dict[str, Any]:
    """Metadata of a complete checkpoint; raises CheckpointError for partial or damaged ones."""
    meta_file = path / "metadata.json"
    if path.name.endswith(".tmp") or not meta_file.exists():
        raise CheckpointError(f"{path} is an incomplete checkpoint (no metadata.json: the save did not finish); "
                              f"resume from an earlier step")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_file} is corrupt ({exc}); resume from an earlier step") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('format_version')}, this code reads "
                              f"{FORMAT_VERSION}")
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{path} is missing {name}; the checkpoint is incomplete")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f} has {f.stat().st_size} bytes, metadata says {size}: the file is truncated or "
                                  f"was modified")
    return meta


def load_file(path: Path, safe_globals: list | None = None) -> Any:
    """torch.load with ``weights_only=True``; ``safe_globals`` names the few plain classes (e.g. DeepSpeed's
    optimizer bookkeeping) a file may contain besides tensors and containers."""
    try:
        with torch.serialization.safe_globals(safe_globals or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged zip/pickle data
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


def layout_matches(meta: dict[str, Any], layout: Layout) -> bool:
    saved = meta["layout"]
    return (saved["tp"], saved["pp"], saved["dp"]) == (layout.tp, layout.pp, layout.dp)


# How megatron-core splits each tensor across tensor-parallel ranks, for model files that do not record it.
_DEFAULT_PARTITION = {"word_embeddings.weight": 0, "output_layer.weight": 0, "linear_qkv.weight": 0,
                      "linear_fc1.weight": 0, "linear_proj.weight": 1, "linear_fc2.weight": 1}


def default_partition(name: str) -> int | None:
    for suffix, dim in _DEFAULT_PARTITION.items():
        if name.endswith(suffix):
            return dim
    return None


def load_full_weights(path: Path, meta: dict[str, Any], log=None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Every model file of a checkpoint merged into full (unsharded) canonical tensors: the weights, and the EMA
    (``{"decay", "num_updates", "shadow"}``) when every file has one. The one place TP/PP shards are merged (resume
    with reshard, init_from, evaluation, convert). Tensor-parallel shards are concatenated along the dimension
    the file records (megatron-core's default for older files); each tensor must come from exactly one pipeline stage
    and from every tp rank. Vocabulary padding rows are kept (their count depends on tp). Replicated tensors that
    differ between tp ranks are reported through ``log`` and taken from rank 0."""
    tp, pp = int(meta["layout"]["tp"]), int(meta["layout"]["pp"])
    files = {(t, p): path / f"model_tp{t:02d}_pp{p:02d}.pt" for p in range(pp) for t in range(tp)}
    missing = [f.name for f in files.values() if not f.exists()]
    if missing:
        raise CheckpointError(f"{path} (tp={tp}, pp={pp}) lacks {', '.join(missing)}")
    shards: dict[str, dict[str, dict[int, torch.Tensor]]] = {"model": {}, "ema": {}}
    owner: dict[str, int] = {}
    partition: dict[str, int | None] = {}
    with_ema, ema_meta = 0, None
    for (t, p), f in files.items():
        state = load_file(f)
        if not isinstance(state, dict) or "model" not in state:
            raise CheckpointError(f"{f} has no 'model' entry; not a model shard")
        recorded = state.get("tp_partition") or {}
        for name, tensor in state["model"].items():
            if owner.setdefault(name, p) != p:
                raise CheckpointError(f"{name} appears in pipeline stages {owner[name]} and {p}")
            shards["model"].setdefault(name, {})[t] = tensor
            partition[name] = recorded[name] if name in recorded else default_partition(name)
        if "ema" in state:
            with_ema += 1
            ema_meta = {"decay": state["ema"]["decay"], "num_updates": state["ema"]["num_updates"]}
            for name, tensor in state["ema"]["shadow"].items():
                shards["ema"].setdefault(name, {})[t] = tensor
    if 0 < with_ema < len(files):
        raise CheckpointError(f"{path}: only {with_ema} of {len(files)} model files hold EMA weights")

    def merge(kind: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, by_rank in sorted(shards[kind].items()):
            if sorted(by_rank) != list(range(tp)):
                raise CheckpointError(f"{name} ({kind}): shards for tp ranks {sorted(by_rank)} of {tp}")
            parts = [by_rank[r] for r in range(tp)]
            if partition.get(name) is None:
                for r, other in enumerate(parts[1:], start=1):
                    if log is not None and not torch.equal(other, parts[0]):
                        log(f"warning: replicated {name} differs between tp ranks 0 and {r} (max |diff| "
                            f"{(other.float() - parts[0].float()).abs().max().item():.3g}); using rank 0")
                out[name] = parts[0]
            else:
                out[name] = torch.cat(parts, dim=partition[name])
        return out

    full = merge("model")
    ema = dict(ema_meta, shadow=merge("ema")) if with_ema else None
    return full, ema


def shard_for_rank(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full tensor for ``param``. Vocabulary padding (rows beyond the real vocabulary, whose
    count depends on tp) is truncated or kept from ``param``'s own initial values."""
    from megatron.core import parallel_state as ps

    dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    if dim is None:
        if full.shape != param.shape:
            raise CheckpointError(f"checkpoint tensor of shape {tuple(full.shape)} does not fit {tuple(param.shape)}")
        return full
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    want = param.shape[dim] * tp
    if full.shape[dim] != want:  # padded vocabulary: different tp => different padding
        if dim != 0:
            raise CheckpointError(f"checkpoint tensor of shape {tuple(full.shape)} cannot be resharded to "
                                  f"{tp} x {tuple(param.shape)}")
        rows = min(full.shape[0], want)
        padded = torch.zeros((want, *full.shape[1:]), dtype=full.dtype)
        padded[:rows] = full[:rows]
        full = padded
    return full.chunk(tp, dim=dim)[rank]


def load_resharded(path: Path, meta: dict[str, Any], named: dict[str, torch.Tensor],
                   canonical: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Weights (and EMA) of a checkpoint of any TP/PP layout, sliced for this rank's parameters."""
    full, ema = load_full_weights(path, meta)
    mine = {canonical[n]: p for n, p in named.items()}
    missing = set(mine) - set(full)
    if missing:
        raise CheckpointError(f"{path} lacks tensors this model needs: {sorted(missing)[:4]}")
    weights = {c: shard_for_rank(full[c], p) for c, p in mine.items()}
    if ema is not None:
        ema = dict(ema, shadow={c: shard_for_rank(ema["shadow"][c], p) for c, p in mine.items()})
    return weights, ema


def check_layout(meta: dict[str, Any], layout: Layout, path: Path) -> None:
    saved = meta["layout"]
    if (saved["tp"], saved["pp"], saved["dp"]) != (layout.tp, layout.pp, layout.dp):
        raise CheckpointError(
            f"{path} was saved with tp={saved['tp']} pp={saved['pp']} dp={saved['dp']} but this run is "
            f"tp={layout.tp} pp={layout.pp} dp={layout.dp}; resume with the same layout, or set "
            f"checkpoint.reshard=true to load the weights resharded with a fresh optimizer state")
