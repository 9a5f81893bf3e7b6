"""Checkpoint integrity (issue 14): content hashes, finite tensors, metadata that disagrees with its folder, the
choice of checkpoint to resume from, pruning, ENOSPC on a real full filesystem, unwritable checkpoint folders."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from bd3_megatron.checkpoint import sharded as ckpt

ONE = ckpt.Layout(tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0, rank=0)


def save(root: Path, step: int, numel: int = 64, **kw) -> Path:
    model = {"model": {"w": torch.arange(numel, dtype=torch.float32)}, "tp_partition": {"w": None}}
    return ckpt.save_checkpoint(
        root, step, ONE, model_state=model, optim_state={"step": step}, metadata={"config": {}}, **kw
    )


def flip_middle_bytes(path: Path) -> None:
    """Overwrite 8 bytes in the middle of the file: same size, different content."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(255 - b for b in data[mid : mid + 8])
    path.write_bytes(bytes(data))


def test_every_file_hash_is_recorded_and_checked(tmp_path):
    path = save(tmp_path, 2)
    meta = ckpt.read_metadata(path)
    assert set(meta["files"]) == {"model_tp00_pp00.pt", "optim_tp00_pp00_dp000.pt", "rng_rank00000.pt"}
    for name, entry in meta["files"].items():  # an independent hash of the bytes on disk
        assert entry == {
            "bytes": (path / name).stat().st_size,
            "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest(),
        }
    assert torch.equal(ckpt.load_file(path / "model_tp00_pp00.pt", meta=meta)["model"]["w"], torch.arange(64.0))
    model_file = path / "model_tp00_pp00.pt"
    flip_middle_bytes(model_file)
    ckpt.read_metadata(path)  # same size: only the content hash can tell
    with pytest.raises(ckpt.CheckpointDamaged, match="does not match the sha256 recorded"):
        ckpt.load_file(model_file, meta=meta)


def test_non_finite_tensors_are_refused_at_load(tmp_path):
    f = tmp_path / "optim.pt"
    torch.save({"engine": {"optimizer": {"state": {0: {"exp_avg": torch.tensor([1.0, float("inf")])}}}}}, f)
    with pytest.raises(ckpt.CheckpointDamaged, match=r"non-finite values in engine\.optimizer\.state\.0\.exp_avg"):
        ckpt.load_file(f)
    torch.save({"rng": torch.ByteTensor([0, 255]), "w": torch.ones(2)}, f)  # integer tensors are not checked
    assert ckpt.load_file(f)["w"].sum() == 2


def test_metadata_that_disagrees_with_its_folder_is_damaged(tmp_path):
    path = save(tmp_path, 4)
    meta_file = path / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, step=8)))  # the probe: "step" edited by hand
    with pytest.raises(ckpt.CheckpointDamaged, match="does not match its recorded digest"):
        ckpt.read_metadata(path)
    edited = dict(meta, step=8)
    edited["metadata_sha256"] = ckpt.metadata_digest(edited)  # even a consistent edit disagrees with the folder
    meta_file.write_text(json.dumps(edited))
    with pytest.raises(ckpt.CheckpointDamaged, match="says step 8 but the folder is step_00000004"):
        ckpt.read_metadata(path)


def test_refusal_of_a_pickle_does_not_advise_weights_only_false(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    f = tmp_path / "model.pt"
    torch.save({"model": Payload()}, f)
    with pytest.raises(ckpt.CheckpointDamaged) as err:
        ckpt.load_file(f)
    msg = str(err.value)
    assert "system" in msg and "may not contain" in msg and str(f) in msg
    assert "weights_only" not in msg and "will likely succeed" not in msg and "\n" not in msg


def test_resume_candidates_never_restart_silently(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step)
    names = lambda paths: [p.name for p in paths]  # noqa: E731
    assert names(ckpt.resume_candidates("auto", tmp_path)[0]) == ["step_00000006", "step_00000004", "step_00000002"]
    (tmp_path / "latest").write_text("step_00000004\n")  # the newest published: never a newer stray folder
    assert names(ckpt.resume_candidates("auto", tmp_path)[0]) == ["step_00000004", "step_00000002"]
    (tmp_path / "latest").unlink()
    (tmp_path / "step_00000008.tmp").mkdir()  # an unfinished save is never a candidate
    got, notes = ckpt.resume_candidates("auto", tmp_path)
    assert names(got) == ["step_00000006", "step_00000004", "step_00000002"] and "latest is missing" in notes[0]
    (tmp_path / "latest").write_text("step_00000010\n")
    got, notes = ckpt.resume_candidates("auto", tmp_path)
    assert names(got)[0] == "step_00000006" and "names 'step_00000010'" in notes[0]
    assert names(ckpt.resume_candidates(str(tmp_path), None)[0])[0] == "step_00000006"  # a root given explicitly
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ckpt.resume_candidates("auto", empty) == ([], [])
    (empty / "latest").write_text("step_00000002\n")
    with pytest.raises(ckpt.CheckpointError, match="holds no step folder"):
        ckpt.resume_candidates("auto", empty)


def test_pruning_keeps_what_the_run_did_not_verify(tmp_path):
    for step in (2, 4, 8):  # a previous trajectory; this run resumed from step 4 (step 8 was damaged, say)
        save(tmp_path, step)
    verified = {"step_00000004"}
    for step in (5, 6, 7):
        verified.add(save(tmp_path, step, keep=2, verified=verified, resumed_step=4).name)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["step_00000006", "step_00000007", "step_00000008"]  # 8 is newer than the resumed step: kept
    save(tmp_path, 8, keep=2, verified=verified, resumed_step=4)  # re-saving step 8 keeps the old one aside
    assert (tmp_path / "step_00000008.replaced/metadata.json").exists()
    # a fresh run (nothing resumed) never prunes below `keep` checkpoints it wrote itself
    fresh = tmp_path / "fresh"
    save(fresh, 100)
    save(fresh, 1, keep=2, verified=set(), resumed_step=None)
    assert (fresh / "step_00000100").is_dir() and (fresh / "step_00000001").is_dir()


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_during_a_save_keeps_the_last_checkpoint(tmp_path):
    with tmpfs(tmp_path / "small", "size=512k") as root:
        first = save(root, 3, numel=1000)  # ~4 KB
        with pytest.raises(ckpt.CheckpointSaveError) as err:
            save(root, 6, numel=1_000_000, intact_step=3)  # 4 MB does not fit
        assert str(err.value) == f"no space left on device while saving step 6 to {root}; step 3 is intact"
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003"]  # partial folder removed
        assert (root / "latest").read_text().strip() == "step_00000003"
        meta = ckpt.read_metadata(first)
        assert ckpt.load_file(first / "model_tp00_pp00.pt", meta=meta)["model"]["w"].numel() == 1000


def test_unusable_checkpoint_dir_is_refused_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="exists and is not a directory"):
        ckpt.check_dir_writable(blocker)
    with pytest.raises(ckpt.CheckpointError, match="not writable"):
        ckpt.check_dir_writable(blocker / "sub")  # cannot be created under a file
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        with pytest.raises(ckpt.CheckpointError, match=r"not writable \(Read-only file system\)"):
            ckpt.check_dir_writable(ro)
    ckpt.check_dir_writable(tmp_path / "new/nested")  # created when missing
    assert (tmp_path / "new/nested").is_dir() and not list((tmp_path / "new/nested").iterdir())
