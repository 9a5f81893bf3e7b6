"""Crash-safe checkpoints: written under a temporary name, published by rename, tracked by ``latest``.

Layout of ``checkpoint.dir``::

    latest                       one line: the name of the newest complete checkpoint (written last)
    step_00000500/
        metadata.json            config, step, consumed samples, layout, library versions, size and sha256 of every
                                 file, and the sha256 of the metadata itself
        model_tp00_pp00.pt       model (+ EMA) shard of one (tp, pp) position, written by data-parallel rank 0
        optim_tp00_pp00_dp000.pt optimizer state (ZeRO partition) of one rank
        rng_rank00000.pt         RNG states of one rank

Every torch file is read with ``weights_only=True``; metadata is JSON. Every file is written through a hashing
writer, fsynced, and the folder fsynced before the rename that publishes it. A checkpoint whose metadata disagrees
with its folder name, whose files differ in size or content hash from the metadata, or that holds non-finite tensors
is damaged (:class:`CheckpointDamaged`) and never loaded; resume then falls back to the next older one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bd3_megatron.io import atomic_write_text, fsync_dir
from bd3_megatron.model.time_embedding import PIPELINE_REPLICATED_PREFIX
from bd3_megatron.parallel import device

FORMAT_VERSION = 2  # 2: files[name] = {"bytes", "sha256"} and metadata_sha256; 1 (sizes only) is still read
_READABLE_VERSIONS = (1, 2)
_STEP_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and what is wrong."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose bytes or values are not what was saved (size, content hash, metadata, non-finite tensors):
    resume falls back to an older intact one."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (e.g. ENOSPC); the partial folder was removed, published ones are untouched."""


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    rank: int

    @classmethod
    def of(cls, ctx) -> Layout:
        """This rank's place in the run's ParallelContext (``bd3_megatron.parallel.state``)."""
        return cls(ctx.tp, ctx.pp, ctx.dp, ctx.tp_rank, ctx.pp_rank, ctx.dp_rank, ctx.rank)

    def model_file(self) -> str:
        return f"model_tp{self.tp_rank:02d}_pp{self.pp_rank:02d}.pt"

    def optim_file(self, dp_rank: int | None = None) -> str:
        dp_rank = self.dp_rank if dp_rank is None else dp_rank
        return f"optim_tp{self.tp_rank:02d}_pp{self.pp_rank:02d}_dp{dp_rank:03d}.pt"

    def rng_file(self) -> str:
        return f"rng_rank{self.rank:05d}.pt"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("torch", "megatron-core", "deepspeed", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


class _HashingWriter:
    """File object for ``torch.save``: hashes the bytes as they are written (no second read of the file) and keeps
    the OSError of a failed write, which torch would otherwise turn into a bare "unexpected pos" RuntimeError."""

    def __init__(self, fh):
        self.fh, self.sha, self.size, self.error = fh, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        try:
            n = self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha.update(data)
        self.size += len(data)
        return n

    def flush(self) -> None:
        self.fh.flush()


def _save_file(obj: Any, path: Path) -> dict[str, Any]:
    """``torch.save`` to ``path``, fsynced; returns the metadata entry ``{"bytes", "sha256"}``. Raises OSError."""
    with open(path, "wb") as fh:
        writer = _HashingWriter(fh)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
        fh.flush()
        os.fsync(fh.fileno())
    return {"bytes": writer.size, "sha256": writer.sha.hexdigest()}


def metadata_digest(meta: dict[str, Any]) -> str:
    """sha256 of the metadata without its own digest field (canonical JSON), so any edit of metadata.json shows."""
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def all_ranks(value: Any) -> list[Any]:
    """Every rank's ``value`` on every rank (a list of one without distributed): how ranks agree on an outcome
    (a failed write, a damaged file) before acting on it, so no rank waits in a collective the others skipped."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    return [value]


def non_finite(obj: Any, prefix: str = "") -> list[str]:
    """Names (dotted paths) of the floating-point tensors inside nested dicts/lists/tuples that hold NaN or inf."""
    if isinstance(obj, torch.Tensor):
        return [prefix or "tensor"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [bad for key, value in items for bad in non_finite(value, f"{prefix}.{key}" if prefix else str(key))]


def check_dir_writable(path: str | Path) -> None:
    """Start-up check of ``checkpoint.dir`` (created if missing): a file in the way, a read-only filesystem or missing
    permissions raise CheckpointError now, not at the first checkpoint interval. Probes with a real file (root
    ignores permission bits; a read-only mount refuses everyone)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"checkpoint.dir {path} exists and is not a directory; point checkpoint.dir at a folder")
    probe = path / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint.dir {path} is not writable ({exc.strerror or exc}); fix its permissions "
            f"or choose another checkpoint.dir"
        ) from None


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


def save_checkpoint(
    root: str | Path,
    step: int,
    layout: Layout,
    *,
    model_state: dict,
    optim_state: dict,
    metadata: dict[str, Any],
    keep: int = 0,
    verified: set[str] | None = None,
    resumed_step: int | None = None,
    intact_step: int | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the published directory.

    Each rank writes and fsyncs its files in ``step_N.tmp`` (hashing them as written); rank 0 writes the metadata
    with every rank's sizes and sha256, fsyncs the folder, renames it to ``step_N``, fsyncs ``root`` and updates
    ``latest``. A failed write on any rank (ENOSPC, EIO, ...) removes the partial folder and raises
    CheckpointSaveError on every rank ("no space left on device while saving step N to DIR; step M is intact",
    M = ``intact_step``). ``verified`` (folder names this run wrote or verified on load) and ``resumed_step`` bound
    pruning, see :func:`_prune`; a folder of the same step that the run did not write is kept as ``step_N.replaced``
    rather than deleted."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")

    def fail_if_any(errors: list) -> None:
        error = next((e for e in errors if e is not None), None)
        if error is None:
            return
        if layout.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        intact = f"step {intact_step} is intact" if intact_step is not None else "no earlier checkpoint exists"
        raise CheckpointSaveError(f"{error} while saving step {step} to {root}; {intact}")

    def reason(exc: OSError) -> str:
        return os.strerror(exc.errno).lower() if exc.errno else str(exc)

    error = None
    if layout.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # leftover of a crashed save: never a published checkpoint
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as exc:
            error = reason(exc)
    fail_if_any(all_ranks(error))
    files, error = {}, None
    try:
        if layout.dp_rank == 0:
            files[layout.model_file()] = _save_file(model_state, tmp / layout.model_file())
        files[layout.optim_file()] = _save_file(optim_state, tmp / layout.optim_file())
        files[layout.rng_file()] = _save_file(rng_state(), tmp / layout.rng_file())
    except OSError as exc:
        error = reason(exc)
    written = all_ranks((files, error))
    fail_if_any([e for _, e in written])
    error = None
    if layout.rank == 0:
        published = False
        try:
            all_files = {name: entry for f, _ in written for name, entry in f.items()}
            meta = dict(
                metadata,
                format_version=FORMAT_VERSION,
                step=step,
                saved_at=time.time(),
                layout={"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
                versions=_library_versions(),
                files=dict(sorted(all_files.items())),
            )
            meta["metadata_sha256"] = metadata_digest(meta)
            atomic_write_text(tmp / "metadata.json", json.dumps(meta, indent=2, sort_keys=True), durable=True)
            fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace only once the new one is whole
                mine = verified is not None and final.name in verified
                old = root / (final.name + (".old" if mine else ".replaced"))
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                os.replace(tmp, final)
                if mine:
                    shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            published = True
            fsync_dir(root)
            atomic_write_text(root / "latest", final.name + "\n", durable=True)
            if keep:
                _prune(root, keep, (verified or set()) | {final.name}, resumed_step)
        except OSError as exc:
            error = reason(exc)
            if published:  # the folder is whole and published: only `latest` or pruning failed; resume still finds it
                intact_step = step
    outcome = all_ranks((error, intact_step))
    intact_step = outcome[0][1]  # rank 0 knows whether the new folder was published before the failure
    fail_if_any([e for e, _ in outcome])
    return final


def _prune(root: Path, keep: int, verified: set[str], resumed_step: int | None) -> None:
    """Delete step folders older than the ``keep`` newest *verified* ones (written by this run, or resumed from after
    verification). Never deleted: a folder newer than the resumed step that this run did not write (another
    trajectory, or a damaged checkpoint kept for inspection), and anything while fewer than ``keep`` verified
    checkpoints exist."""
    steps = sorted(p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name))
    good = [p for p in steps if p.name in verified]
    if len(good) < keep:
        return
    oldest_kept = good[-keep].name
    floor = step_dir_name(resumed_step) if resumed_step is not None else None
    for old in steps:
        if old.name >= oldest_kept or (floor is not None and old.name > floor and old.name not in verified):
            continue
        shutil.rmtree(old, ignore_errors=True)


def step_dirs(root: Path) -> list[Path]:
    """Published step folders under ``root``, newest first (``.tmp``/``.replaced`` folders never match)."""
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)), reverse=True)


def resume_candidates(spec: str, root: str | Path | None) -> tuple[list[Path], list[str]]:
    """The checkpoints a resume may use, in order of preference, and warnings for the log.

    ``none``: nothing. ``auto``: the folder ``root/latest`` names, then the older step folders, newest first (the
    caller takes the first intact one); with ``latest`` missing or naming no folder, every step folder newest first
    (never a silent restart from step 0). Otherwise an explicit step folder, or a root handled like ``auto``."""
    if spec == "none":
        return [], []
    if spec != "auto":
        path = Path(spec)
        if path.is_dir() and ((path / "latest").exists() or step_dirs(path)):
            return resume_candidates("auto", path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        return [path], []
    if root is None or not Path(root).is_dir():
        return [], []
    root = Path(root)
    steps, tracker = step_dirs(root), Path(root) / "latest"
    if not tracker.exists():
        return steps, [f"{tracker} is missing; using the newest intact step folder"] if steps else []
    name = tracker.read_text().strip()
    if _STEP_RE.match(name) and (root / name).is_dir():
        return [root / name] + [p for p in steps if p.name < name], []
    if not steps:
        raise CheckpointError(
            f"{tracker} names '{name}', which is not a checkpoint directory, and {root} holds no "
            f"step folder; restore the checkpoint, or remove {tracker} to start from step 0"
        )
    return steps, [
        f"{tracker} names '{name}', which is not a checkpoint directory; using the newest intact step folder"
    ]


def resolve_checkpoint(spec: str, root: str | Path | None) -> Path | None:
    """The first of :func:`resume_candidates` (None: no checkpoint), for readers that do not fall back."""
    candidates, _ = resume_candidates(spec, root)
    return candidates[0] if candidates else None


def read_metadata(path: Path) -> dict[str, Any]:
    """Metadata of a complete checkpoint. Raises CheckpointDamaged for partial or damaged ones: no or unparsable
    metadata.json, a metadata digest that does not match (the file was edited), a ``step`` that disagrees with the
    folder name, a missing file or one whose size differs. Content hashes are checked by :func:`load_file`."""
    meta_file = path / "metadata.json"
    if path.name.endswith(".tmp") or not meta_file.exists():
        raise CheckpointDamaged(
            f"{path} is an incomplete checkpoint (no metadata.json: the save did not finish); "
            f"resume from an earlier step"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointDamaged(f"{meta_file} is corrupt ({exc}); resume from an earlier step") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has format version {meta.get('format_version') if isinstance(meta, dict) else '?'}"
            f", this code reads {', '.join(map(str, _READABLE_VERSIONS))}"
        )
    if meta["format_version"] >= 2 and meta.get("metadata_sha256") != metadata_digest(meta):
        raise CheckpointDamaged(f"{meta_file} does not match its recorded digest: it was edited or corrupted")
    folder = _STEP_RE.match(path.name)
    if folder and meta.get("step") != int(folder.group(1)):
        raise CheckpointDamaged(f"{meta_file} says step {meta.get('step')} but the folder is {path.name}")
    for name, entry in meta.get("files", {}).items():
        size = entry["bytes"] if isinstance(entry, dict) else entry
        f = path / name
        if not f.exists():
            raise CheckpointDamaged(f"{path} is missing {name}; the checkpoint is incomplete")
        if f.stat().st_size != size:
            raise CheckpointDamaged(
                f"{f} has {f.stat().st_size} bytes, metadata says {size}: the file is truncated or was modified"
            )
    return meta


def _refusal(path: Path, exc: Exception) -> str:
    """Why torch.load refused a file, without torch's advice to retry with ``weights_only=False`` (which would run
    whatever code the file references)."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (
            f"{path} references {found.group(1)}, which a checkpoint may not contain (only tensors and plain "
            f"containers are loaded); the file was not written by this trainer or was tampered with"
        )
    lines = [ln for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return f"cannot read {path}: {type(exc).__name__}: {lines[0] if lines else 'unreadable'}"


def load_file(path: Path, safe_globals: list | None = None, meta: dict[str, Any] | None = None) -> Any:
    """torch.load with ``weights_only=True``; ``safe_globals`` names the few plain classes (e.g. DeepSpeed's
    optimizer bookkeeping) a file may contain besides tensors and containers. With ``meta`` (the checkpoint's
    metadata) the file's sha256 must equal the recorded one. Every floating-point tensor must be finite. Raises
    CheckpointDamaged naming the file and the problem (hashing costs one pass over bytes read anyway)."""
    entry = (meta or {}).get("files", {}).get(path.name)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointDamaged(f"cannot read {path}: {exc.strerror or exc}") from None
    if isinstance(entry, dict) and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointDamaged(
            f"{path} does not match the sha256 recorded when it was saved: the file was modified or corrupted"
        )
    try:
        with torch.serialization.safe_globals(safe_globals or []):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged zip/pickle data
        raise CheckpointDamaged(_refusal(path, exc)) from None
    bad = non_finite(obj)
    if bad:
        raise CheckpointDamaged(
            f"{path} holds non-finite values in {', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}"
        )
    return obj


def layout_matches(meta: dict[str, Any], layout: Layout) -> bool:
    saved = meta["layout"]
    return (saved["tp"], saved["pp"], saved["dp"]) == (layout.tp, layout.pp, layout.dp)


# How megatron-core splits each tensor across tensor-parallel ranks, for model files that do not record it.
_DEFAULT_PARTITION = {
    "word_embeddings.weight": 0,
    "output_layer.weight": 0,
    "linear_qkv.weight": 0,
    "linear_fc1.weight": 0,
    "linear_fc1.bias": 0,
    "output_layer.bias": 0,
    "linear_proj.weight": 1,
    "linear_fc2.weight": 1,
}


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
    (the time embedding, replicated on every stage, from the first) and from every tp rank. Vocabulary padding rows
    are kept (their count depends on tp). Replicated tensors that differ between tp ranks are reported through ``log``
    and taken from rank 0."""
    tp, pp = int(meta["layout"]["tp"]), int(meta["layout"]["pp"])
    files = {(t, p): path / f"model_tp{t:02d}_pp{p:02d}.pt" for p in range(pp) for t in range(tp)}
    missing = [f.name for f in files.values() if not f.exists()]
    if missing:
        raise CheckpointDamaged(f"{path} (tp={tp}, pp={pp}) lacks {', '.join(missing)}")
    shards: dict[str, dict[str, dict[int, torch.Tensor]]] = {"model": {}, "ema": {}}
    owner: dict[str, int] = {}
    partition: dict[str, int | None] = {}
    with_ema, ema_meta = 0, None
    for (t, p), f in files.items():
        state = load_file(f, meta=meta)
        if not isinstance(state, dict) or "model" not in state:
            raise CheckpointError(f"{f} has no 'model' entry; not a model shard")
        recorded = state.get("tp_partition") or {}
        for name, tensor in state["model"].items():
            if owner.setdefault(name, p) != p:
                if name.startswith(PIPELINE_REPLICATED_PREFIX):  # every stage's copy; the first stage's is kept
                    continue
                raise CheckpointError(f"{name} appears in pipeline stages {owner[name]} and {p}")
            shards["model"].setdefault(name, {})[t] = tensor
            partition[name] = recorded[name] if name in recorded else default_partition(name)
        if "ema" in state:
            with_ema += 1
            ema_meta = {"decay": state["ema"]["decay"], "num_updates": state["ema"]["num_updates"]}
            for name, tensor in state["ema"]["shadow"].items():
                if owner.get(name, p) != p:
                    continue
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
                        log(
                            f"warning: replicated {name} differs between tp ranks 0 and {r} (max |diff| "
                            f"{(other.float() - parts[0].float()).abs().max().item():.3g}); using rank 0"
                        )
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
            raise CheckpointError(
                f"checkpoint tensor of shape {tuple(full.shape)} cannot be resharded to {tp} x {tuple(param.shape)}"
            )
        rows = min(full.shape[0], want)
        padded = torch.zeros((want, *full.shape[1:]), dtype=full.dtype)
        padded[:rows] = full[:rows]
        full = padded
    return full.chunk(tp, dim=dim)[rank]


def load_resharded(
    path: Path, meta: dict[str, Any], named: dict[str, torch.Tensor], canonical: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict | None]:
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
            f"checkpoint.reshard=true to load the weights resharded with a fresh optimizer state"
        )
