"""Issue 14: one run per checkpoint folder, resume compatibility, preemption under torchrun (real runs of the tiny
config, as in test_train_e2e)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bd3_megatron.training.run_lock import LOCK_NAME, RunLock, RunLockError
from tests.test_train_e2e import ROOT, _free_port, run, tiny_args

pytestmark = pytest.mark.slow
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))


def start_until(args: list[str], needle: str, timeout: float = 300.0) -> tuple[subprocess.Popen, list[str]]:
    """Start a run and return once a line containing ``needle`` was printed (the process keeps running)."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return proc, lines
        assert time.time() < deadline, "".join(lines)[-3000:]
    raise AssertionError(f"run ended before {needle!r}:\n{''.join(lines)[-3000:]}")


def last_error(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_run_lock_in_process(tmp_path):
    """The lock itself: a second holder is refused naming the first; a clean release deletes the file; a file left
    by a process that no longer holds the lock is taken over with one log line naming it."""
    first = RunLock(tmp_path)
    first.acquire()
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunLockError, match=rf"in use by another run \(host {socket.gethostname()}, pid {os.getpid()}"):
        RunLock(tmp_path).acquire()  # a second open file description: flock refuses it even in the same process
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node7", "pid": 4242, "started": 0}))  # a crashed run
    logs: list[str] = []
    with RunLock(tmp_path, log=logs.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(logs) == 1 and "stale run lock" in logs[0] and "host node7, pid 4242" in logs[0]
    (tmp_path / "file").write_text("")
    with pytest.raises(RunLockError, match="exists and is not a directory; point checkpoint.dir at a folder"):
        RunLock(tmp_path / "file").acquire()


def test_second_run_on_the_same_checkpoint_dir_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, data_cache):
    common = ("train.eval_interval=0", "checkpoint.interval=0", "sample.after_train=false")
    first, _ = start_until(tiny_args(tmp_path, data_cache, "train.max_steps=400", *common), "step 2/400")
    try:
        # another log.dir, so only the checkpoint folder is shared
        second = run(tiny_args(tmp_path, data_cache, "train.max_steps=2", *common, f"log.dir={tmp_path / 'log2'}"))
        assert second.returncode == 2, second.stderr[-2000:]
        line = last_error(second)
        assert line.startswith(
            f"error: checkpoint.dir {tmp_path / 'ckpt'} is in use by another run (host "
            f"{socket.gethostname()}, pid {first.pid}, started "
        ), line
        assert not (tmp_path / "log2" / "metrics.jsonl").exists()  # refused before any work
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (tmp_path / "ckpt" / LOCK_NAME).exists()  # SIGKILL left the file; the kernel dropped the flock
    third = run(tiny_args(tmp_path, data_cache, "train.max_steps=1", *common))
    assert third.returncode == 0, third.stderr[-2000:]
    assert (
        f"taking over a stale run lock of {tmp_path / 'ckpt'} (left by host {socket.gethostname()}, pid "
        f"{first.pid}," in third.stdout
    )
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()  # released (deleted) on a clean exit


def test_resume_refuses_changed_shapes_meaning_seed_and_data_unless_allowed(tmp_path, data_cache):
    common = ("train.eval_interval=0", "sample.after_train=false")
    assert run(tiny_args(tmp_path, data_cache, "train.max_steps=2", *common)).returncode == 0
    ckpt = tmp_path / "ckpt" / "step_00000002"
    refused = [
        # shape: today a size-mismatch traceback
        (
            ["model.ffn_hidden_size=128"],
            "was trained with model.ffn_hidden_size=256 but this run has "
            "model.ffn_hidden_size=128; resume with model.ffn_hidden_size=256",
        ),
        # meaning: today bd3 weights silently continued as an AR model
        (["model.mode=ar"], "was trained with model.mode=bd3 but this run has model.mode=ar"),
        (["train.seed=2"], "train.seed=1 but this run has train.seed=2: noise and data order would not continue"),
        (
            ["data.val_docs=9"],
            "was trained on other data than this run's (data.path 'embedded:sotu' -> 'embedded:sotu': train_docs",
        ),
        (["parallel.zero_stage=1"], "was saved with parallel.zero_stage=0 but this run has parallel.zero_stage=1"),
    ]
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    for extra, message in refused:
        proc = run(tiny_args(tmp_path, data_cache, "train.max_steps=3", *common, *extra))
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        line = last_error(proc)
        assert line.startswith(f"error: {ckpt} ") and message in line, (extra, line)
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before  # nothing written
    seed = run(
        tiny_args(
            tmp_path, data_cache, "train.max_steps=3", *common, "train.seed=2", "checkpoint.allow_changes=[train.seed]"
        )
    )
    assert seed.returncode == 0, seed.stderr[-2000:]
    assert "note: train.seed 1 -> 2 (checkpoint.allow_changes)" in seed.stdout and "at step 2" in seed.stdout
    data = run(
        tiny_args(
            tmp_path,
            data_cache,
            "train.max_steps=4",
            *common,
            "train.seed=2",
            "data.val_docs=9",
            "checkpoint.allow_changes=[train.seed, data.path]",
        )
    )
    assert data.returncode == 0, data.stderr[-2000:]
    assert "note: training data changed" in data.stdout and "at step 3" in data.stdout
    zero = run(
        tiny_args(
            tmp_path,
            data_cache,
            "train.max_steps=5",
            *common,
            "train.seed=2",
            "data.val_docs=9",
            "parallel.zero_stage=1",
            "checkpoint.reshard=true",
        )
    )
    assert zero.returncode == 0, zero.stderr[-2000:]
    assert "at step 4 (weights and EMA loaded, fresh optimizer state: ZeRO stage 0 -> 1)" in zero.stdout


def test_torchrun_wrapper_turns_sigterm_and_sigusr1_into_checkpoint_and_exit_0(tmp_path, data_cache):
    """2-process torchrun (dp=2, ZeRO-1) under launcher.torchrun: SIGTERM, then on the resumed run SIGUSR1, to the
    launcher each end with a checkpoint and exit 0, and the next launch resumes from it (requeue-safe)."""

    def launch(max_steps: int) -> list[str]:
        args = tiny_args(
            tmp_path,
            data_cache,
            f"train.max_steps={max_steps}",
            "train.eval_interval=0",
            "checkpoint.interval=0",
            "sample.after_train=false",
            "parallel.zero_stage=1",
        )
        return [
            sys.executable,
            "-m",
            "launcher.torchrun",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            *args[1:],
        ]

    latest = tmp_path / "ckpt" / "latest"
    saved = 0
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        proc, lines = start_until(launch(400), f"step {saved + 2}/400", timeout=400)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=300)
        text = "".join(lines) + rest
        assert proc.returncode == 0, text[-3000:]
        assert f"received {sig.name}: asking the workers to save" in text and "preempted: stop signal" in text
        assert saved == 0 or f"at step {saved}" in text
        now = int(latest.read_text().strip().split("_")[1])
        assert now >= saved + 2, text[-3000:]
        saved = now
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()
