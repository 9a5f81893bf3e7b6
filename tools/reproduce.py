"""``bd3-reproduce --preset tiny|paper --output DIR [--seeds 1 2] [--systems a,b] [--jobs N] [key=value ...]``

Reproduces the paper's comparison table (Arriola et al. 2025, Table: AR, MDLM and BD3-LMs at L'=16/8/4 on the same
data, steps and model size). Each system and seed is an ordinary run folder ``DIR/seed_S/SYSTEM/`` trained with
``python -m launcher.train`` (so it resumes when rerun), then evaluated with the project's own tools:

* ``tools/eval_ppl.py``: the test NELBO perplexity bound with K noise draws per sequence (``--samples-per-seq``; the
  exact NLL for AR), and for systems with a sampler the generative perplexity of fixed-length samples under the AR
  run of the same seed (``--gen-ppl-model``) with their token entropy;
* ``tools/convert.py`` + ``tools/sample.py`` (systems with a sampler): variable-length samples (stop at EOS or
  entropy collapse, as the reference) one at a time, giving median / max generated length, tokens/s and NFE.

Every step writes its result as JSON next to the run, atomically, with the exact command that produced it; a rerun
skips the steps whose command is unchanged, so a stopped reproduction continues where it stopped and a changed
setting redoes only what it affects. Runs go side by side (``--jobs``, each with ``--threads`` CPU threads).
The results land in ``DIR/results.json``, ``DIR/table.md`` (mean +- standard deviation over seeds, and whether the
paper's perplexity ordering appears) and ``DIR/table.png``.

On a cluster (the ``paper`` preset) train each run as its own distributed job: ``--list-runs`` prints the plan's
runs, one ``SYSTEM SEED`` per line in a fixed order (seeds, then systems as in :data:`SYSTEMS`), and ``--run-index N``
picks the N-th (from 0) of them, either to train it here (``--train-only --train-prefix "srun ... python"``) or for
an outside launcher: ``--launch-args`` prints its ``launcher.train`` arguments, one per line, and ``--mark-trained``
records it as trained once that launcher has taken it to its last step. ``slurm/reproduce_array.sh`` does this as a
Slurm job array, one task per run through ``slurm/launch.sh``, followed by one job with ``--eval-only`` (every run
must be trained; none is trained there) that evaluates and writes the table. A run counts as trained when its
``train.json`` records the same ``launcher.train`` arguments: the launcher in front of them (python, torchrun, srun)
decides where it ran, not what was trained.

The system list is data (:data:`SYSTEMS`): a new model family is one more entry. Metrics a system's mode has no
tool for (samples of ``ar`` and ``mdlm``: the sampler and ``tools/eval_ppl.py --gen-ppl-model`` draw from bd3
checkpoints) are reported as n/a, never estimated another way. Bad input ends with one ``error:`` line and exit code
2; a failed run ends with one ``error:`` line per failure naming its log, and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class System:
    """One row of the table: a model family at one block size, as ``launcher.train`` overrides."""

    name: str  # run folder name and key in results.json
    label: str  # table label
    mode: str  # model.mode
    block_size: int | None  # L'; None = the sequence length (MDLM)
    overrides: tuple[str, ...] = ()

    @property
    def samples(self) -> bool:
        """tools/sample.py and eval_ppl's generative perplexity can draw from it (bd3's block sampler, SEDD's
        analytic sampler); AR scores the samples, MDLM has no sampler here."""
        from bd3_megatron.modes import get_mode

        return get_mode(self.mode).samples

    def sample_length(self, cap: int, seq_len: int) -> int:
        """Tokens a variable-length sample may reach: ``cap`` for the block sampler (it slides past L), the context
        after the BOS token (L - 1) for samplers that denoise their whole context at once (SEDD)."""
        from bd3_megatron.modes import get_mode

        return cap if get_mode(self.mode).block_sampler else min(cap, seq_len - 1)


# the baselines train without BD3-LM's clip-window search and block resampling, as in the reference's AR/MDLM scripts
_BASELINE = ("diffusion.clip_search=false", "diffusion.resample=false")
SYSTEMS: tuple[System, ...] = (
    System("ar", "AR", "ar", 1, _BASELINE),
    System("mdlm", "MDLM", "mdlm", None, _BASELINE),
    System("bd3_l16", "BD3-LM L'=16", "bd3", 16),
    System("bd3_l8", "BD3-LM L'=8", "bd3", 8),
    System("bd3_l4", "BD3-LM L'=4", "bd3", 4),
    # the reference's SEDD baseline: time-conditioned (model.arch=bd3lms, set by both presets for every system)
    System("sedd", "SEDD", "sedd", None, _BASELINE),
)
# The paper's test-perplexity ordering, best first (OWT: AR 17.54, BD3 L'=4 <= 20.73, L'=8 <= 21.68, L'=16 <= 22.27,
# MDLM <= 22.98, SEDD <= 24.10); names absent from a run are skipped when it is checked.
PAPER_ORDER = ("ar", "bd3_l4", "bd3_l8", "bd3_l16", "mdlm", "sedd")


@dataclass(frozen=True)
class Preset:
    """Shapes, steps and evaluation sizes shared by every system of a reproduction."""

    config: str  # base YAML, relative to the repository root
    overrides: tuple[str, ...]
    seeds: tuple[int, ...] = (1,)
    draws: int = 4  # K noise draws per test sequence for the NELBO bound
    eval_rows: int = 0  # test rows scored (0 = the whole validation split)
    gen_samples: int = 8  # fixed-length samples for generative perplexity
    var_samples: int = 16  # variable-length samples for the length statistics
    var_length: int = 512  # cap on a variable-length sample (tokens)
    nucleus_p: float = 0.9  # top-p of the samples (the reference's 0.9 for BD3-LMs)
    jobs: int = 2  # runs side by side
    threads: int = 1  # CPU threads per run
    note: str = ""


PRESETS: dict[str, Preset] = {
    # 2-core CPU: 4x128 model, L=128, 800 steps of 8 sequences (the small-scale setting) on the embedded
    # corpus, two runs side by side with one thread each. Byte vocabulary (258 ids) instead of WordPiece (30,522):
    # at this size the WordPiece head is ~4/5 of the compute and its rare-token tail dominates the perplexities, so
    # bytes buy ~7x the steps per minute and figures that separate the systems; perplexities are per byte.
    # Every system uses the reference's DiT block (model.arch=bd3lms), which SEDD's time conditioning needs.
    "tiny": Preset(
        config="configs/tiny_cpu.yaml",
        overrides=(
            "data.tokenizer=bytes",
            "model.arch=bd3lms",
            "model.num_layers=4",
            "model.hidden_size=128",
            "model.num_heads=4",
            "model.seq_len=128",
            "train.max_steps=800",
            "train.micro_batch_size=8",
            "train.global_batch_size=8",
            "train.eval_interval=200",
            "train.eval_rows=128",
            "checkpoint.interval=200",
            "checkpoint.keep=1",
            "log.interval=50",
            "log.progress=false",
            "sample.after_train=false",
            "sample.length=null",  # tiny_cpu.yaml's 64 is no multiple of MDLM's L'=L=128
        ),
        seeds=(1, 2),
        draws=4,
        eval_rows=512,
        gen_samples=8,
        var_samples=16,
        var_length=512,
        jobs=2,
        threads=1,
        # Measured 2026-11-30 (commit 7d1e4e2, docs/results/reproduce_tiny.md) on the shared 2-core box with tests
        # beside it: training 3-6.5 min per run (BD3 reads 2L tokens), evaluation 10-56 s, sampling 0.5-1.5 min.
        note="12 runs x 800 steps: about 36 min on 2 cores (measured)",
    ),
    # The paper's OWT setting (12x768, L=1024, global batch 512, 1M steps from scratch at each L'); one seed; launch
    # each training through torchrun/srun with --train-prefix, or one system per Slurm array task with --systems.
    "paper": Preset(
        config="configs/owt_small_l4.yaml",
        overrides=("model.arch=bd3lms", "sample.after_train=false", "log.progress=false"),
        seeds=(1,),
        draws=1,
        eval_rows=0,
        gen_samples=300,
        var_samples=500,
        var_length=10240,
        jobs=1,
        threads=8,
        note="GPU scale: 169M parameters, 1M steps per system",
    ),
}


class UsageError(ValueError):
    """Bad input, reported as one ``error:`` line with exit code 2."""


@dataclass
class Run:
    system: System
    seed: int
    folder: Path

    @property
    def ckpt(self) -> Path:
        return self.folder / "checkpoints"

    @property
    def key(self) -> str:
        return f"{self.system.name} seed {self.seed}"


@dataclass
class Plan:
    preset: Preset
    output: Path
    runs: list[Run]
    user_overrides: list[str] = field(default_factory=list)
    train_prefix: list[str] = field(default_factory=lambda: [sys.executable])
    python: str = sys.executable
    max_steps: dict[str, int] = field(default_factory=dict)  # train.max_steps by run key


# ---------------------------------------------------------------------------------------------- planning


def _exact(mode: str) -> bool:
    """An autoregressive system (no diffusion): its figure is the exact NLL and it scores the others' samples."""
    from bd3_megatron.modes import get_mode

    return not get_mode(mode).diffusion


def resolved_config(plan: Plan):
    """The training config every system shares (base YAML + preset + the user's overrides); ConfigError if bad."""
    from bd3_megatron.config import load_config

    return load_config(str(ROOT / plan.preset.config), [*plan.preset.overrides, *plan.user_overrides])


def make_plan(args: argparse.Namespace) -> Plan:
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    changes: dict[str, Any] = {}
    for name in ("draws", "eval_rows", "gen_samples", "var_samples", "var_length", "jobs", "threads"):
        value = getattr(args, name)
        if value is not None:
            least = 0 if name == "eval_rows" else 1
            if value < least:
                raise UsageError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
            changes[name] = value
    if args.seeds is not None:
        try:
            seeds = tuple(int(x) for x in args.seeds.split(","))
        except ValueError:
            raise UsageError(f"--seeds must be comma-separated integers, e.g. 1,2; got {args.seeds!r}") from None
        if len(set(seeds)) != len(seeds):
            raise UsageError(f"--seeds lists a seed twice: {args.seeds}")
        changes["seeds"] = seeds
    preset = replace(preset, **changes)
    by_name = {s.name: s for s in SYSTEMS}
    names = [n.strip() for n in args.systems.split(",") if n.strip()] if args.systems else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise UsageError(f"unknown system(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(by_name)}")
    for item in args.overrides:
        if "=" not in item:
            raise UsageError(f"override {item!r} must be section.key=value (e.g. train.max_steps=100)")
    output = Path(args.output).resolve()
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; give a folder (it is created if missing)")
    runs = [Run(by_name[n], seed, output / f"seed_{seed}" / n) for seed in preset.seeds for n in names]
    if args.run_index is not None:
        if not (args.train_only or args.launch_args or args.mark_trained or args.list_runs):
            raise UsageError(
                "--run-index picks one run: use it with --train-only, --launch-args, --mark-trained or --list-runs"
            )
        if not 0 <= args.run_index < len(runs):
            raise UsageError(
                f"--run-index {args.run_index} is out of range: this plan has {len(runs)} runs, 0-{len(runs) - 1} "
                "(--list-runs prints them)"
            )
        runs = [runs[args.run_index]]
    elif args.launch_args or args.mark_trained:
        raise UsageError(f"--{'launch-args' if args.launch_args else 'mark-trained'} needs --run-index N")
    if args.eval_only and args.train_only:
        raise UsageError("--eval-only and --train-only exclude each other")
    prefix = shlex.split(args.train_prefix) if args.train_prefix else [sys.executable]
    return Plan(preset, output, runs, list(args.overrides), prefix)


def run_overrides(plan: Plan, run: Run, seq_len: int) -> list[str]:
    """The ``launcher.train`` overrides of one run: preset, system, seed and folders, then the user's overrides."""
    sysm = run.system
    block = seq_len if sysm.block_size is None else sysm.block_size
    return [
        *plan.preset.overrides,
        f"model.mode={sysm.mode}",
        f"model.block_size={block}",
        *sysm.overrides,
        f"train.seed={run.seed}",
        f"checkpoint.dir={run.ckpt}",
        f"log.dir={run.folder / 'log'}",
        f"data.cache_dir={plan.output / 'cache'}",
        *plan.user_overrides,
    ]


def launch_args(plan: Plan, run: Run, seq_len: int) -> list[str]:
    """The ``launcher.train`` arguments of one run: ``--config`` with the base YAML, then :func:`run_overrides`."""
    return ["--config", str(ROOT / plan.preset.config), *run_overrides(plan, run, seq_len)]


def train_command(plan: Plan, run: Run, seq_len: int) -> list[str]:
    """``launcher.train`` for one run: the launcher prefix, ``-m launcher.train``, then :func:`launch_args`."""
    return [*plan.train_prefix, "-m", "launcher.train", *launch_args(plan, run, seq_len)]


def _launcher_part(command: list[str]) -> list[str] | None:
    """The arguments after ``-m launcher.train`` in a recorded training command (None if it has none)."""
    for i in range(len(command) - 1):
        if command[i : i + 2] == ["-m", "launcher.train"]:
            return command[i + 2 :]
    return None


def is_trained(plan: Plan, run: Run, seq_len: int) -> bool:
    """Whether ``train.json`` records this run trained to its last step with exactly these ``launcher.train``
    arguments, by whichever launcher (the project's layouts train the same model: tests/test_distributed_*)."""
    try:
        rec = json.loads((run.folder / "train.json").read_text())
    except (OSError, ValueError):
        return False
    command = rec.get("command")
    return isinstance(command, list) and _launcher_part(command) == launch_args(plan, run, seq_len)


def check_configs(plan: Plan, seq_len: int) -> dict[str, int]:
    """Every run's training config, validated before anything starts (UsageError naming the system); returns
    each run's train.max_steps by run key."""
    from bd3_megatron.config import ConfigError, load_config

    steps = {}
    for run in plan.runs:
        try:
            cfg = load_config(str(ROOT / plan.preset.config), run_overrides(plan, run, seq_len))
        except ConfigError as exc:
            raise UsageError(f"system {run.system.name}: {exc}") from None
        if cfg.checkpoint.dir is None:
            raise UsageError("checkpoint.dir must stay set: each run resumes from its own checkpoints")
        steps[run.key] = cfg.train.max_steps
    return steps


def latest_step(ckpt: Path) -> int | None:
    """The step of the checkpoint ``ckpt/latest`` names (None without one)."""
    try:
        name = (ckpt / "latest").read_text().strip()
    except OSError:
        return None
    return int(name.removeprefix("step_")) if name.startswith("step_") and name[5:].isdigit() else None


def ar_run(plan: Plan, run: Run) -> Run | None:
    return next((r for r in plan.runs if r.seed == run.seed and _exact(r.system.mode)), None)


def eval_command(plan: Plan, run: Run, output: Path) -> list[str]:
    p = plan.preset
    cmd = [
        plan.python,
        str(ROOT / "tools/eval_ppl.py"),
        "--checkpoint",
        str(run.ckpt),
        "--samples-per-seq",
        str(1 if _exact(run.system.mode) else p.draws),  # the AR figure is exact: one draw is all there is
        "--max-rows",
        str(p.eval_rows),
        "--output",
        str(output),
    ]
    ar = ar_run(plan, run)
    if run.system.samples and ar is not None:
        cmd += ["--gen-ppl-model", str(ar.ckpt), "--num-samples", str(p.gen_samples)]
        cmd += ["--nucleus-p", str(p.nucleus_p), "--seed", str(run.seed)]
    return cmd


# ---------------------------------------------------------------------------------------------- steps
class StepFailed(RuntimeError):
    pass


def _write_json(path: Path, obj: Any) -> None:
    """Atomically: temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _done(marker: Path, command: list[str], inputs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The recorded result of a step if it ran to completion with exactly this command on the same inputs (the
    checkpoint steps it read)."""
    try:
        rec = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("command") == command and rec.get("inputs") == inputs else None


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if not _cuda_visible():
        env.setdefault("DS_ACCELERATOR", "cpu")  # a CUDA-built torch can fool DeepSpeed's detection
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a requirement
        return False


class _Children:
    """The steps' subprocesses, so a stop request reaches them (SIGTERM: training checkpoints and exits) and no new
    step starts after it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: set[subprocess.Popen] = set()
        self.stopping = False

    def stop(self, signum=None, frame=None) -> None:
        with self.lock:
            self.stopping = True
            for proc in self.live:
                if proc.poll() is None:
                    proc.terminate()


CHILDREN = _Children()


def _call(command: list[str], log: Path, threads: int, what: str) -> None:
    """Run ``command`` with its output appended to ``log``; StepFailed with the last error line if it fails.

    The child runs in its own session, so a terminal's Ctrl-C reaches only this driver, which turns it into SIGTERM
    for the children (``launcher.train`` then saves a checkpoint at the next step boundary instead of dying)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"\n$ {shlex.join(command)}\n")
        fh.flush()
        with CHILDREN.lock:
            if CHILDREN.stopping:
                raise StepFailed(f"{what} not started: stop requested")
            proc = subprocess.Popen(
                command, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=_env(threads), start_new_session=True
            )
            CHILDREN.live.add(proc)
        try:
            proc.wait()
        finally:
            with CHILDREN.lock:
                CHILDREN.live.discard(proc)
    if proc.returncode != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
        raise StepFailed(f"{what} failed (exit {proc.returncode}): {last.removeprefix('error: ')}; log {log}")


def train(plan: Plan, run: Run, seq_len: int, say: Callable[[str], None], eval_only: bool = False) -> None:
    """Train one run with ``plan.train_prefix`` unless :func:`is_trained` says it is; with ``eval_only`` an untrained
    run is a StepFailed instead."""
    command = train_command(plan, run, seq_len)
    marker = run.folder / "train.json"
    if is_trained(plan, run, seq_len):
        say(f"[train] {run.key}: done before, skipped")
        return
    if eval_only:
        raise StepFailed(
            f"{run.key}: not trained with these settings (no matching {marker}); --eval-only trains nothing"
        )
    t0 = time.time()
    _call(command, run.folder / "train.log", plan.preset.threads, f"{run.key}: training")
    step, want = latest_step(run.ckpt), plan.max_steps[run.key]
    if step != want:  # e.g. preempted: launcher.train saves, exits 0 and expects a requeue
        raise StepFailed(
            f"{run.key}: training stopped at step {step} of {want} (log {run.folder / 'train.log'}); "
            "rerun bd3-reproduce to resume it"
        )
    _write_json(marker, {"command": command, "seconds": time.time() - t0, "step": step})
    say(f"[train] {run.key}: {time.time() - t0:.0f} s")


def mark_trained(plan: Plan, run: Run, seq_len: int) -> None:
    """Record a run that an outside launcher (e.g. ``slurm/launch.sh``) trained with :func:`launch_args`, so later
    calls skip it: UsageError unless its newest checkpoint is at the run's last step. The recorded command is
    ``plan.train_prefix`` (the caller's launcher) with those arguments; no wall time is known (``seconds`` null)."""
    step, want = latest_step(run.ckpt), plan.max_steps[run.key]
    if step != want:
        raise UsageError(
            f"{run.key}: newest checkpoint in {run.ckpt} is at step {step}, not the last step {want}: not trained yet"
        )
    _write_json(
        run.folder / "train.json", {"command": train_command(plan, run, seq_len), "seconds": None, "step": step}
    )


def evaluate(plan: Plan, run: Run, say: Callable[[str], None]) -> None:
    """NELBO bound (+ generative perplexity), then variable-length sampling statistics."""
    marker = run.folder / "eval.json"
    tmp = run.folder / "eval.out.json"
    command = eval_command(plan, run, tmp)
    ar = ar_run(plan, run)
    # a retrained run (more steps) or a retrained scorer makes the recorded figures stale
    inputs = {
        "step": latest_step(run.ckpt),
        "scorer_step": latest_step(ar.ckpt) if "--gen-ppl-model" in command else None,
    }
    if not _done(marker, command, inputs):
        t0 = time.time()
        tmp.unlink(missing_ok=True)
        _call(command, run.folder / "eval.log", plan.preset.threads, f"{run.key}: evaluation")
        result = json.loads(tmp.read_text())
        result.pop("samples", None)  # the texts stay out of the table's inputs; eval.log has them
        _write_json(marker, {"command": command, "inputs": inputs, "result": result, "seconds": time.time() - t0})
        tmp.unlink(missing_ok=True)
        say(f"[eval] {run.key}: NELBO {result['nelbo']:.4f} nats/token, {time.time() - t0:.0f} s")
    if not run.system.samples:
        return
    step = json.loads(marker.read_text())["result"]["step"]
    sampler = run.folder / f"sampler_step_{step}"
    if not (sampler / "config.json").is_file() or not (sampler / "model.safetensors").is_file():
        partial = run.folder / f".sampler_step_{step}.partial"
        if partial.exists():
            import shutil

            shutil.rmtree(partial)
        convert = [plan.python, str(ROOT / "tools/convert.py"), "--input", str(run.ckpt), "--step", str(step)]
        convert += ["--output", str(partial), "--quiet"]
        _call(convert, run.folder / "sample.log", plan.preset.threads, f"{run.key}: conversion")
        os.replace(partial, sampler)
    p = plan.preset
    jsonl = run.folder / "samples.jsonl"
    command = [
        plan.python,
        str(ROOT / "tools/sample.py"),
        "--checkpoint",
        str(sampler),
        "--num-samples",
        str(p.var_samples),
        "--length",
        str(run.system.sample_length(p.var_length, resolved_config(plan).model.seq_len)),
        "--nucleus-p",
        str(p.nucleus_p),
        "--seed",
        str(run.seed),
        "--batch-size",
        "1",  # one sample at a time: its own wall time gives tokens/s (the reference samples with batch 1 too)
        "--threads",
        str(p.threads),
        "--quiet",
        "--no-progress",
        "--output",
        str(jsonl.with_suffix(".partial")),
    ]
    marker = run.folder / "sampling.json"
    if _done(marker, command):
        return
    _call(command, run.folder / "sample.log", p.threads, f"{run.key}: sampling")
    records = [json.loads(ln) for ln in jsonl.with_suffix(".partial").read_text().splitlines() if ln.strip()]
    os.replace(jsonl.with_suffix(".partial"), jsonl)
    stats = sampling_stats(records)
    _write_json(marker, {"command": command, "result": stats})
    say(f"[sample] {run.key}: median length {stats['median_length']:.0f}, {stats['tokens_per_s']:.1f} tok/s")


def sampling_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Length, speed, NFE and entropy statistics of tools/sample.py JSONL records (one per sample)."""
    if not records:
        raise StepFailed("sampling wrote no samples")
    lengths = [int(r["length"]) for r in records]
    seconds = sum(float(r["seconds"]) for r in records)
    return {
        "num_samples": len(records),
        "median_length": statistics.median(lengths),
        "max_length": max(lengths),
        "tokens_per_s": sum(lengths) / max(seconds, 1e-9),
        "nfe": statistics.mean(int(r["nfe"]) for r in records),
        "entropy": statistics.mean(float(r["entropy"]) for r in records),
        "stops": {s: sum(1 for r in records if r["stop"] == s) for s in sorted({r["stop"] for r in records})},
    }


# ---------------------------------------------------------------------------------------------- report
METRICS = (  # key in the per-run record, column title, format
    ("ppl", "Test PPL", "{:.2f}"),
    ("gen_ppl", "Gen. PPL (AR)", "{:.1f}"),
    ("entropy", "Entropy", "{:.2f}"),
    ("median_length", "Median len", "{:.0f}"),
    ("max_length", "Max len", "{:.0f}"),
    ("tokens_per_s", "Tokens/s", "{:.1f}"),
    ("nfe", "NFE", "{:.0f}"),
)


def run_record(run: Run) -> dict[str, Any]:
    """The figures of one finished run (missing metrics absent)."""
    ev = json.loads((run.folder / "eval.json").read_text())["result"]
    rec: dict[str, Any] = {"nelbo": ev["nelbo"], "ppl": ev["ppl"], "step": ev["step"], "val_rows": ev["val_rows"]}
    rec["draws"] = ev["samples_per_seq"]
    trained = json.loads((run.folder / "train.json").read_text())
    if trained["seconds"] is not None:  # None: trained by an outside launcher (--mark-trained)
        rec["train_s"] = trained["seconds"]  # wall time of the last (possibly resumed) training call
    if "gen_ppl" in ev:
        rec.update(gen_ppl=ev["gen_ppl"], entropy=ev["entropy"])
    sampling = run.folder / "sampling.json"
    if run.system.samples and sampling.is_file():
        s = json.loads(sampling.read_text())["result"]
        rec.update({k: s[k] for k in ("median_length", "max_length", "tokens_per_s", "nfe")})
        rec["var_entropy"] = s["entropy"]
    return rec


def summarise(values: list[float]) -> dict[str, float]:
    """mean and sample standard deviation (0 for one value) of one metric over seeds."""
    return {
        "mean": statistics.mean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def aggregate(per_run: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{system: {metric: {mean, sd, n}}} over the seeds that have the metric."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, seeds in per_run.items():
        keys = sorted({k for rec in seeds.values() for k, v in rec.items() if isinstance(v, int | float)})
        out[name] = {k: summarise([rec[k] for rec in seeds.values() if k in rec]) for k in keys}
    return out


def ordering_verdict(agg: dict[str, dict[str, dict[str, float]]]) -> str:
    """Whether the paper's test-perplexity ordering holds between the systems present, and whether each step of it
    is larger than the seed spread (the two standard deviations added)."""
    present = [n for n in PAPER_ORDER if n in agg and "ppl" in agg[n]]
    if len(present) < 2:
        return "fewer than two systems: no ordering to compare"
    ours = sorted(present, key=lambda n: agg[n]["ppl"]["mean"])
    lines = [f"paper (best first): {' < '.join(present)}", f"here (mean):        {' < '.join(ours)}"]
    flips, unresolved = [], []
    for a, b in zip(present, present[1:], strict=False):
        ma, mb = agg[a]["ppl"], agg[b]["ppl"]
        gap = mb["mean"] - ma["mean"]
        if gap <= 0:
            flips.append(f"{a} vs {b}")
        if abs(gap) <= ma["sd"] + mb["sd"]:
            unresolved.append(f"{a} vs {b}")
    if not flips:
        lines.append("the paper's ordering appears at this scale")
    else:
        lines.append(f"the paper's ordering does NOT appear: reversed {', '.join(flips)}")
    if unresolved:
        seeds = min(agg[n]["ppl"]["n"] for n in present)
        lines.append(f"within the seed spread ({seeds} seed(s)): {', '.join(unresolved)}")
    return "\n".join(lines)


def markdown_table(systems: list[System], agg, header: str) -> str:
    cols = ["System", "L'", *[title for _, title, _ in METRICS]]
    rows = [f"| {' | '.join(cols)} |", f"|{'---|' * len(cols)}"]
    for sysm in systems:
        if sysm.name not in agg:
            continue
        cells = [sysm.label, "L" if sysm.block_size is None else str(sysm.block_size)]
        for key, _, fmt in METRICS:
            m = agg[sysm.name].get(key)
            if m is None:
                cells.append("n/a")
                continue
            text = fmt.format(m["mean"])
            if m["n"] > 1:
                text += " ± " + fmt.format(m["sd"])
            if key == "ppl":
                text = ("= " if _exact(sysm.mode) else "≤ ") + text
            cells.append(text)
        rows.append(f"| {' | '.join(cells)} |")
    return header + "\n\n" + "\n".join(rows) + "\n"


def plot(systems: list[System], agg, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in systems if s.name in agg]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in (
        (axes[0], "ppl", "test perplexity (bound; AR exact)"),
        (axes[1], "gen_ppl", "gen. PPL under the AR run"),
    ):
        have = [s for s in shown if key in agg[s.name]]
        xs = range(len(have))
        ax.bar(
            xs,
            [agg[s.name][key]["mean"] for s in have],
            yerr=[agg[s.name][key]["sd"] for s in have],
            color=["#777777" if _exact(s.mode) else "#4c72b0" for s in have],
            capsize=4,
        )
        ax.set_xticks(list(xs), [s.label for s in have], rotation=20, ha="right")
        ax.set_title(title + ("" if have else ": no system has it"))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def report(plan: Plan, preset_name: str) -> dict[str, Any]:
    systems = list(dict.fromkeys(r.system for r in plan.runs))
    per_run: dict[str, dict[int, dict[str, Any]]] = {}
    for run in plan.runs:
        per_run.setdefault(run.system.name, {})[run.seed] = run_record(run)
    agg = aggregate(per_run)
    verdict = ordering_verdict(agg)
    seeds = sorted({r.seed for r in plan.runs})
    p = plan.preset
    c = resolved_config(plan)
    extra = f" with overrides {' '.join(plan.user_overrides)}" if plan.user_overrides else ""
    header = (
        f"Preset `{preset_name}`{extra}: {c.model.num_layers}x{c.model.hidden_size} model, L={c.model.seq_len}, "
        f"{c.train.max_steps} steps of {c.train.global_batch_size} sequences on {c.data.path} ({c.data.tokenizer}); "
        f"seeds {', '.join(map(str, seeds))}, mean ± standard deviation over seeds. Test PPL: exp of the NELBO "
        f"with K={p.draws} noise draws per sequence (exact NLL for AR); Gen. PPL: {p.gen_samples} fixed-length "
        f"samples (top-p {p.nucleus_p}) scored by the AR run of the same seed, Entropy: their mean token entropy "
        f"(nats); lengths, Tokens/s and NFE: {p.var_samples} variable-length samples (cap {p.var_length} tokens) "
        "drawn one at a time. n/a: no tool samples that model family yet."
    )
    text = markdown_table(systems, agg, header) + "\n```\n" + verdict + "\n```\n"
    results = {"preset": preset_name, "seeds": seeds, "runs": per_run, "summary": agg, "ordering": verdict}
    _write_json(plan.output / "results.json", results)
    fd, tmp = tempfile.mkstemp(dir=plan.output, prefix="table.md.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, plan.output / "table.md")
    plot(systems, agg, plan.output / "table.png")
    return results


# ---------------------------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bd3-reproduce", description=__doc__.split("\n\n")[1])
    p.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--output", required=True, help="root folder of the reproduction (one run folder per system/seed)")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds, e.g. 1,2 (default: the preset's)")
    p.add_argument("--systems", default=None, help=f"comma-separated subset of {','.join(s.name for s in SYSTEMS)}")
    p.add_argument("--jobs", type=int, default=None, help="runs side by side (default: the preset's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: the preset's)")
    p.add_argument("--draws", type=int, default=None, help="K noise draws per test sequence")
    p.add_argument("--eval-rows", type=int, default=None, help="test rows scored (0 = all)")
    p.add_argument("--gen-samples", type=int, default=None, help="samples for generative perplexity")
    p.add_argument("--var-samples", type=int, default=None, help="variable-length samples")
    p.add_argument("--var-length", type=int, default=None, help="cap on a variable-length sample (tokens)")
    p.add_argument(
        "--train-prefix",
        default=None,
        help="launcher for training, before '-m launcher.train' (default: this python; e.g. 'torchrun "
        "--nproc_per_node 8')",
    )
    p.add_argument("--train-only", action="store_true", help="train the runs, evaluate nothing")
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="train nothing: every run must be trained already (e.g. by a Slurm array); evaluate and write the table",
    )
    p.add_argument(
        "--run-index",
        type=int,
        default=None,
        help="only the N-th run (from 0) of --list-runs; with --train-only, --launch-args, --mark-trained, --list-runs",
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument("--list-runs", action="store_true", help="print one 'SYSTEM SEED' line per run and exit")
    action.add_argument(
        "--launch-args", action="store_true", help="print the launcher.train arguments of --run-index, one per line"
    )
    action.add_argument(
        "--mark-trained",
        action="store_true",
        help="record --run-index as trained (an outside launcher took it to its last step) and exit",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value training overrides for every system")
    return p.parse_intermixed_args(argv)


def _pool(jobs: int, tasks: list[tuple[str, Callable[[], None]]]) -> list[str]:
    """Run the tasks ``jobs`` at a time; the error lines of the ones that failed."""
    errors: list[str] = []

    def one(item: tuple[str, Callable[[], None]]) -> None:
        key, fn = item
        if CHILDREN.stopping:
            return  # not started; the closing "stopped:" line says so
        try:
            fn()
        except (StepFailed, OSError, ValueError, KeyError) as exc:
            errors.append(f"{key}: {exc}" if not str(exc).startswith(key) else str(exc))

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        list(ex.map(one, tasks))
    return errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = make_plan(args)
        from bd3_megatron.config import ConfigError

        try:
            seq_len = resolved_config(plan).model.seq_len
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        plan.max_steps = check_configs(plan, seq_len)
        if args.list_runs:
            print("\n".join(f"{r.system.name} {r.seed}" for r in plan.runs))
            return 0
        if args.launch_args:
            print("\n".join(launch_args(plan, plan.runs[0], seq_len)))
            return 0
        if args.mark_trained:
            mark_trained(plan, plan.runs[0], seq_len)
            print(f"[train] {plan.runs[0].key}: recorded as trained at step {plan.max_steps[plan.runs[0].key]}")
            return 0
        plan.output.mkdir(parents=True, exist_ok=True)
    except (UsageError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            print(text, flush=True)

    say(
        f"bd3-reproduce: preset {args.preset} ({plan.preset.note}), {len(plan.runs)} runs "
        f"({', '.join(dict.fromkeys(r.system.name for r in plan.runs))} x seeds "
        f"{', '.join(map(str, plan.preset.seeds))}), {plan.preset.jobs} at a time, output {plan.output}"
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, CHILDREN.stop)
    errors = _pool(
        plan.preset.jobs, [(r.key, lambda r=r: train(plan, r, seq_len, say, args.eval_only)) for r in plan.runs]
    )
    if not errors and not args.train_only:
        # generative perplexity needs the AR run of the seed: evaluation starts once every run is trained
        errors = _pool(plan.preset.jobs, [(r.key, lambda r=r: evaluate(plan, r, say)) for r in plan.runs])
    if errors:
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        if CHILDREN.stopping:
            print("stopped: every finished step is kept; rerun the same command to continue", file=sys.stderr)
        return 1
    if args.train_only:
        return 0
    results = report(plan, args.preset)
    say((plan.output / "table.md").read_text())
    say(f"wrote {plan.output / 'table.md'}, {plan.output / 'table.png'}, {plan.output / 'results.json'}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
