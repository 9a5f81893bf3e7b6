"""Static and dry-run checks of slurm/*.sh that run everywhere (no Slurm needed).

The real proof is scripts/ci_slurm.sh on a local Slurm cluster; these catch the cheap mistakes first: syntax,
directives that do not match the recipe's parallel layout, undocumented environment variables, scripts whose shared
launch block drifted apart, and launcher arguments the config schema rejects.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bd3_megatron.config import load_config, validate_layout

ROOT = Path(__file__).resolve().parents[1]
GPU_SCRIPTS = {  # script -> (config, total GPUs, default micro batch)
    "slurm/owt_l4_128gpu.sh": ("configs/owt_small_l4.yaml", 128, 4),
    "slurm/owt_pretrain_l1024_128gpu.sh": ("configs/owt_pretrain_l1024.yaml", 128, 4),
    "slurm/lm1b_l4_32gpu.sh": ("configs/lm1b_l4.yaml", 32, 16),
}
ALL_SCRIPTS = [*GPU_SCRIPTS, "slurm/tiny_cpu.sh"]
ARRAY = "slurm/reproduce_array.sh"  # bd3-reproduce's paper preset as a job array: one task per run, then the table
LAUNCH = ROOT / "slurm/launch.sh"


def directives(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].partition("=")
            out[key.removeprefix("--")] = value
    return out


def header(text: str) -> str:
    """The comment block before the first command: where every setting must be documented."""
    return text[: text.index("\nset -euo pipefail")]


def run_script(script: str, env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "MASTER_"))}
    return subprocess.run(
        ["bash", str(ROOT / script), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        cwd="/",
        timeout=timeout,
    )


def fake_allocation(nodes: int, per_node: int, gpus: int | None) -> dict[str, str]:
    """The variables Slurm sets in a batch job (names and formats as in Slurm 22.05)."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_CPUS_PER_TASK": "8",
        "SLURM_JOB_NODELIST": f"gpu[001-{nodes:03d}]",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "MASTER_ADDR": "gpu001",
        "DRY_RUN": "1",
    }
    if gpus is not None:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    return env


def launcher_argv(stdout: str) -> list[str]:
    line = next(ln for ln in stdout.splitlines() if " -m launcher.train " in ln)
    words = shlex.split(line.split("] ", 1)[1])
    return words[words.index("launcher.train") + 1 :]


def config_from_argv(argv: list[str]):
    assert argv[0] == "--config"
    return load_config(ROOT / argv[1], argv[2:])


@pytest.mark.parametrize(
    "script", [*ALL_SCRIPTS, ARRAY, "slurm/launch.sh", "scripts/ci_slurm.sh", "scripts/slurm_local_cluster.sh"]
)
def test_bash_syntax(script):
    res = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", [*ALL_SCRIPTS, ARRAY])
def test_preemption_directives(script):
    d = directives((ROOT / script).read_text())
    assert "requeue" in d and d.get("open-mode") == "append"
    m = re.fullmatch(r"B:USR1@(\d+)", d.get("signal", ""))
    assert m and int(m.group(1)) >= 60, f"{script}: needs --signal=B:USR1@N (the batch shell forwards it)"


@pytest.mark.parametrize("script", list(GPU_SCRIPTS))
def test_gpu_directives_match_recipe_layout(script):
    config, gpus_total, micro = GPU_SCRIPTS[script]
    d = directives((ROOT / script).read_text())
    nodes, per_node, gpus = int(d["nodes"]), int(d["ntasks-per-node"]), int(d["gpus-per-node"])
    assert per_node == gpus, "one task per GPU"
    assert nodes * gpus == gpus_total
    cfg = load_config(ROOT / config, [f"train.micro_batch_size={micro}"])
    dp = validate_layout(cfg, nodes * gpus)
    assert cfg.train.global_batch_size == 512 == micro * dp  # the paper's batch, no accumulation needed


@pytest.mark.parametrize("script", [*ALL_SCRIPTS, ARRAY])
def test_every_environment_setting_is_documented(script):
    own = (ROOT / script).read_text()
    text = own + LAUNCH.read_text()  # what the script reads itself and through the shared launch
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):[-+]", text)) - {"SLURM_SUBMIT_DIR"}
    read = {v for v in read if not v.startswith("SLURM_")}
    assert {"DATA_PATH", "RUN_DIR", "CKPT_DIR", "WANDB_PROJECT", "CONTAINER", "VENV", "PYTHON"} <= read
    assert "CONFIG" in read or script == ARRAY  # the array's config comes from bd3-reproduce (CONFIG is refused)
    undocumented = sorted(v for v in read if v not in header(own))
    assert not undocumented, f"{script} reads {undocumented} but its header does not document them"
    if script in [*GPU_SCRIPTS, ARRAY]:
        for nccl in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
            assert nccl in header(own)
        assert "SBATCH_PARTITION" in header(own) and "SBATCH_ACCOUNT" in header(own)


def test_every_recipe_sources_the_shared_launch():
    for script in ALL_SCRIPTS:
        text = (ROOT / script).read_text()
        assert text.rstrip().endswith('source "$launch_sh"') and "srun" not in text.split("set -euo pipefail")[1]


def test_new_configs_load_with_paper_values():
    pre = load_config(ROOT / "configs/owt_pretrain_l1024.yaml")
    assert pre.model.seq_len == pre.model.block_size == 1024 and pre.data.tokenizer == "gpt2"
    assert (pre.model.num_layers, pre.model.hidden_size) == (12, 768) and pre.train.precision == "bf16"
    lm1b = load_config(ROOT / "configs/lm1b_l4.yaml")
    assert (lm1b.model.seq_len, lm1b.model.block_size, lm1b.data.tokenizer) == (128, 4, "bert-base-uncased")
    assert lm1b.train.max_steps * lm1b.train.global_batch_size * lm1b.model.seq_len >= 65e9


def test_outside_slurm_is_a_clear_error():
    res = run_script("slurm/tiny_cpu.sh", {})
    assert res.returncode == 2 and res.stderr.startswith("error: not inside a Slurm job"), res.stderr


@pytest.mark.parametrize("script", list(GPU_SCRIPTS))
def test_dry_run_builds_a_valid_launch(script, tmp_path):
    config, gpus_total, micro = GPU_SCRIPTS[script]
    nodes = gpus_total // 8
    env = {
        **fake_allocation(nodes, 8, 8),
        "RUN_DIR": str(tmp_path / "run"),
        "DATA_PATH": str(tmp_path / "data"),
        "WANDB_PROJECT": "bd3",
    }
    res = run_script(script, env, "optim.lr=1e-4")
    assert res.returncode == 0, res.stderr
    assert f"{nodes} nodes x 8 tasks" in res.stdout and "master gpu001:" in res.stdout
    assert f"srun --kill-on-bad-exit=1 --ntasks={gpus_total} --ntasks-per-node=8 --cpus-per-task=8 " in res.stdout
    cfg = config_from_argv(launcher_argv(res.stdout))
    assert validate_layout(cfg, gpus_total) * micro == cfg.train.global_batch_size
    assert cfg.log.dir == str(tmp_path / "run") and cfg.checkpoint.dir == str(tmp_path / "run" / "checkpoints")
    assert cfg.data.path == str(tmp_path / "data") and cfg.log.wandb and cfg.log.wandb_project == "bd3"
    assert cfg.optim.lr == pytest.approx(1e-4)  # sbatch arguments after the script are overrides
    assert cfg.parallel.device == "auto"


@pytest.mark.parametrize(
    "per_node,gpus,message",
    [
        (4, 8, "4 tasks per node but 8 GPUs per node"),
        (8, None, "no GPUs in this allocation"),
    ],
)
def test_gpu_allocation_mismatch_is_refused(per_node, gpus, message):
    res = run_script("slurm/owt_l4_128gpu.sh", fake_allocation(16, per_node, gpus))
    assert res.returncode == 2 and res.stderr.startswith("error: ") and message in res.stderr, res.stderr
    assert "srun" not in res.stdout


def test_tiny_cpu_dry_run_forces_cpu(tmp_path):
    env = {**fake_allocation(2, 1, None), "SLURM_CPUS_PER_TASK": "1"}
    res = run_script("slurm/tiny_cpu.sh", env)
    assert res.returncode == 0, res.stderr
    cfg = config_from_argv(launcher_argv(res.stdout))
    assert cfg.parallel.device == "cpu" and cfg.data.tokenizer == "bert-base-uncased"
    assert validate_layout(cfg, 2) == 2


# ---------------------------------------------------------------------------------------------- the reproduction array
def run_array(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """slurm/reproduce_array.sh with this test's Python (it runs bd3-reproduce on the batch host)."""
    return run_script(ARRAY, {"PYTHON": sys.executable, **env}, *args, timeout=180)


def list_runs(repro: Path, seeds: str) -> list[str]:
    argv = [sys.executable, "-m", "tools.reproduce", "--preset", "paper", "--output", str(repro), "--seeds", seeds]
    res = subprocess.run([*argv, "--list-runs"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_array_task_dry_run_trains_its_run_of_the_list(tmp_path):
    """Array index I trains line I of bd3-reproduce --list-runs through slurm/launch.sh on 16 x 8 GPUs, with the run's
    mode, block size, seed and folders, the environment's settings and the overrides given after the script."""
    from tools import reproduce as rp

    repro = tmp_path / "repro"
    runs = list_runs(repro, "1,2")
    assert len(runs) == 2 * len(rp.SYSTEMS) == len(set(runs))
    for index in (0, 3, len(runs) - 1):  # AR of seed 1, BD3 L'=8 of seed 1, the last system of seed 2
        name, seed = runs[index].split()
        env = {
            **fake_allocation(16, 8, 8),
            "SLURM_ARRAY_JOB_ID": "4240",
            "SLURM_ARRAY_TASK_ID": str(index),
            "REPRO_DIR": str(repro),
            "SEEDS": "1,2",
            "DATA_PATH": str(tmp_path / "data"),
        }
        res = run_array(env, "train", "optim.lr=1e-4")
        assert res.returncode == 0, res.stderr
        assert f"array task {index} of job 4240: system {name}, seed {seed}" in res.stdout
        assert "srun --kill-on-bad-exit=1 --ntasks=128 --ntasks-per-node=8 --cpus-per-task=8 " in res.stdout
        assert "dry run: not launching" in res.stdout and not (repro / f"seed_{seed}").exists()
        cfg = config_from_argv(launcher_argv(res.stdout))
        system = next(s for s in rp.SYSTEMS if s.name == name)
        assert cfg.model.mode == system.mode and cfg.train.seed == int(seed)
        assert cfg.model.block_size == (system.block_size or cfg.model.seq_len)
        assert cfg.checkpoint.dir == str(repro / f"seed_{seed}" / name / "checkpoints")
        assert cfg.log.dir == str(repro / f"seed_{seed}" / name / "log")
        assert cfg.data.path == str(tmp_path / "data") and cfg.optim.lr == pytest.approx(1e-4)
        assert validate_layout(cfg, 128) * cfg.train.micro_batch_size == cfg.train.global_batch_size == 512


def test_array_task_with_an_index_past_the_list_is_one_error_line(tmp_path):
    from tools.reproduce import SYSTEMS

    n = len(SYSTEMS)  # the paper preset: one seed
    env = {**fake_allocation(16, 8, 8), "SLURM_ARRAY_TASK_ID": str(n), "REPRO_DIR": str(tmp_path / "repro")}
    res = run_array(env, "train")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: --run-index {n} is out of range: this plan has {n} runs, 0-{n - 1}"), lines
    assert "srun" not in res.stdout


@pytest.mark.parametrize(
    "args, env, message",
    [
        ([], {}, "first argument must be submit, train or table"),
        (["train"], {"SLURM_ARRAY_TASK_ID": None}, "train runs as an array task"),
        (["train"], {"RUN_DIR": "/x"}, "RUN_DIR is set: bd3-reproduce sets each run's config and folders"),
        (["table"], {"SLURM_GPUS_ON_NODE": None}, "no GPU in this allocation"),
        (["table"], {"SLURM_NTASKS": "8"}, "the table job is one process"),
        (["train"], {"SLURM_JOB_ID": None}, "not inside a Slurm job"),
    ],
)
def test_array_refusals_are_one_error_line(tmp_path, args, env, message):
    full = {**fake_allocation(1, 1, 1), "SLURM_ARRAY_TASK_ID": "0", "REPRO_DIR": str(tmp_path / "repro"), **env}
    res = run_array({k: v for k, v in full.items() if v is not None}, *args)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "srun" not in res.stdout


def test_table_job_dry_run_evaluates_the_same_runs_and_trains_none(tmp_path):
    repro = tmp_path / "repro"
    env = {**fake_allocation(1, 1, 1), "REPRO_DIR": str(repro), "SEEDS": "1,2", "SYSTEMS": "ar,bd3_l4"}
    res = run_array(env, "table", "optim.lr=1e-4")
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if "-m tools.reproduce " in ln)
    words = shlex.split(line.split("] ", 1)[1])
    assert words[words.index("tools.reproduce") + 1 :] == [
        *("--preset", "paper", "--output", str(repro), "--seeds", "1,2", "--systems", "ar,bd3_l4", "--eval-only"),
        *("train.micro_batch_size=4", "optim.lr=1e-4"),  # the array tasks' overrides: the runs they trained
    ]
    assert "dry run: not evaluating" in res.stdout and not repro.exists()
