"""bd3-reproduce (tools/reproduce.py): planning, bad input, the table's statistics, and one real end-to-end
reproduction with a micro preset (AR + BD3 L'=4, a few steps each) that is then rerun and partly redone."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import reproduce as rp

ROOT = Path(__file__).resolve().parents[1]


def plan_for(tmp_path, *argv: str) -> rp.Plan:
    return rp.make_plan(rp.parse_args(["--output", str(tmp_path / "out"), *argv]))


# ---------------------------------------------------------------------------------------------- planning
def test_every_system_gets_its_mode_block_size_seed_and_folders(tmp_path):
    plan = plan_for(tmp_path, "--seeds", "3,5", "train.max_steps=7")
    assert [r.key for r in plan.runs[: len(rp.SYSTEMS)]] == [f"{s.name} seed 3" for s in rp.SYSTEMS]
    assert len(plan.runs) == 2 * len(rp.SYSTEMS)
    by = {r.key: r for r in plan.runs}
    mdlm = rp.train_command(plan, by["mdlm seed 5"], 128)
    assert mdlm[1:3] == ["-m", "launcher.train"]
    assert "model.mode=mdlm" in mdlm and "model.block_size=128" in mdlm and "train.seed=5" in mdlm
    assert f"checkpoint.dir={tmp_path / 'out' / 'seed_5' / 'mdlm' / 'checkpoints'}" in mdlm
    assert mdlm[-1] == "train.max_steps=7"  # the user's overrides come last, so they win
    ar = rp.train_command(plan, by["ar seed 3"], 128)
    assert "model.mode=ar" in ar and "model.block_size=1" in ar and "diffusion.clip_search=false" in ar
    assert "model.block_size=16" in rp.train_command(plan, by["bd3_l16 seed 3"], 128)
    sedd = rp.train_command(plan, by["sedd seed 3"], 128)
    assert "model.mode=sedd" in sedd and "model.block_size=128" in sedd and "model.arch=bd3lms" in sedd
    assert "data.tokenizer=bytes" in sedd  # the tiny preset's vocabulary, shared by every system
    # every config is valid and keeps the preset's steps; generative perplexity goes to the seed's AR run
    steps = rp.check_configs(plan, 128)
    assert set(steps.values()) == {7} and len(steps) == len(plan.runs)
    ev = rp.eval_command(plan, by["bd3_l4 seed 5"], tmp_path / "e.json")
    assert ev[ev.index("--gen-ppl-model") + 1] == str(by["ar seed 5"].ckpt)
    assert ev[ev.index("--samples-per-seq") + 1] == "4"
    ar_ev = rp.eval_command(plan, by["ar seed 5"], tmp_path / "e.json")
    assert "--gen-ppl-model" not in ar_ev and ar_ev[ar_ev.index("--samples-per-seq") + 1] == "1"
    assert "--gen-ppl-model" not in rp.eval_command(plan, by["mdlm seed 5"], tmp_path / "e.json")
    assert "--gen-ppl-model" in rp.eval_command(plan, by["sedd seed 5"], tmp_path / "e.json")
    # variable-length samples: the block sampler slides past L; SEDD stays inside its context after the BOS token
    assert by["bd3_l4 seed 3"].system.sample_length(512, 128) == 512
    assert by["sedd seed 3"].system.sample_length(512, 128) == 127
    assert by["sedd seed 3"].system.samples and not by["mdlm seed 3"].system.samples
    # without an AR run there is no scorer
    solo = plan_for(tmp_path, "--systems", "bd3_l4")
    assert "--gen-ppl-model" not in rp.eval_command(solo, solo.runs[0], tmp_path / "e.json")


def test_a_config_a_system_cannot_train_is_refused_before_anything_runs(tmp_path):
    plan = plan_for(tmp_path, "model.seq_len=40")  # divisible by 4 and 8, not by 16
    with pytest.raises(rp.UsageError, match="system bd3_l16: model.seq_len"):
        rp.check_configs(plan, 40)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "huge"], "unknown preset 'huge'; choose one of tiny, paper"),
        (["--systems", "ar,xyz"], "unknown system(s) xyz; choose from ar, mdlm, bd3_l16, bd3_l8, bd3_l4, sedd"),
        (["--draws", "0"], "--draws must be >= 1, got 0"),
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--seeds", "1,x"], "--seeds must be comma-separated integers"),
        (["--seeds", "1,1"], "--seeds lists a seed twice"),
        (["train.max_steps"], "override 'train.max_steps' must be section.key=value"),
        (["model.seq_len=40"], "system bd3_l16: model.seq_len (40) must be divisible by model.block_size (16)"),
        (["model.nope=1"], "model.nope"),
        (
            ["--run-index", "99", "--launch-args"],
            f"--run-index 99 is out of range: this plan has {2 * len(rp.SYSTEMS)} runs",
        ),
        (["--run-index", "-1", "--list-runs"], "--run-index -1 is out of range"),
        (["--run-index", "0"], "--run-index picks one run: use it with --train-only"),
        (["--mark-trained"], "--mark-trained needs --run-index N"),
        (["--train-only", "--eval-only"], "--eval-only and --train-only exclude each other"),
    ],
)
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert rp.main(["--output", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("keep me")
    assert rp.main(["--output", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "f").read_text() == "keep me"


def test_list_runs_and_run_index_map_every_run_exactly_once_in_a_stable_order(tmp_path, capsys):
    base = ["--output", str(tmp_path / "out"), "--seeds", "2,1"]
    assert rp.main([*base, "--list-runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{s.name} {seed}" for seed in (2, 1) for s in rp.SYSTEMS]  # seeds as given, then SYSTEMS
    assert rp.main([*base, "--list-runs"]) == 0 and capsys.readouterr().out.splitlines() == lines
    for index, line in enumerate(lines):
        name, seed = line.split()
        assert rp.main([*base, "--run-index", str(index), "--list-runs"]) == 0
        assert capsys.readouterr().out.splitlines() == [line]
        assert rp.main([*base, "--run-index", str(index), "--launch-args", "train.max_steps=9"]) == 0
        argv = capsys.readouterr().out.splitlines()
        assert argv[:2] == ["--config", str(ROOT / "configs/tiny_cpu.yaml")]
        assert argv[-1] == "train.max_steps=9" and f"train.seed={seed}" in argv
        assert f"checkpoint.dir={tmp_path / 'out' / f'seed_{seed}' / name / 'checkpoints'}" in argv
        system = next(s for s in rp.SYSTEMS if s.name == name)
        assert f"model.mode={system.mode}" in argv
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_a_run_trained_by_an_outside_launcher_is_recorded_and_then_skipped(tmp_path):
    argv = ["--systems", "ar,bd3_l4", "train.max_steps=7"]
    plan = plan_for(tmp_path, "--run-index", "1", "--mark-trained", *argv)
    plan.max_steps = rp.check_configs(plan, 128)
    (run,) = plan.runs
    assert run.key == "bd3_l4 seed 1"
    with pytest.raises(rp.UsageError, match="at step None, not the last step 7: not trained yet"):
        rp.mark_trained(plan, run, 128)
    run.ckpt.mkdir(parents=True)
    (run.ckpt / "latest").write_text("step_00000006\n")  # e.g. preempted one step before the end
    with pytest.raises(rp.UsageError, match="at step 6, not the last step 7"):
        rp.mark_trained(plan, run, 128)
    (run.ckpt / "latest").write_text("step_00000007\n")
    plan.train_prefix = ["srun", "--ntasks=128", "/venv/bin/python"]
    rp.mark_trained(plan, run, 128)
    rec = json.loads((run.folder / "train.json").read_text())
    assert rec["command"] == rp.train_command(plan, run, 128) and rec["step"] == 7 and rec["seconds"] is None
    # a later call with another launcher skips it; one with other settings does not, and --eval-only refuses it
    table = plan_for(tmp_path, "--eval-only", *argv)
    table.max_steps = rp.check_configs(table, 128)
    said = []
    rp.train(table, table.runs[1], 128, said.append, eval_only=True)
    assert said == ["[train] bd3_l4 seed 1: done before, skipped"]
    other = plan_for(tmp_path, "--eval-only", *argv, "optim.lr=1e-4")
    assert not rp.is_trained(other, other.runs[1], 128)
    with pytest.raises(rp.StepFailed, match="bd3_l4 seed 1: not trained with these settings"):
        rp.train(other, other.runs[1], 128, said.append, eval_only=True)
    with pytest.raises(rp.StepFailed, match="ar seed 1: not trained"):
        rp.train(table, table.runs[0], 128, said.append, eval_only=True)


def test_eval_only_with_an_untrained_run_is_one_error_line_and_exit_1(tmp_path, capsys):
    assert rp.main(["--output", str(tmp_path / "out"), "--systems", "ar", "--seeds", "1", "--eval-only"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ar seed 1: not trained with these settings"), err
    assert not (tmp_path / "out" / "seed_1").exists()


def test_latest_step_reads_the_tracker(tmp_path):
    assert rp.latest_step(tmp_path) is None
    (tmp_path / "latest").write_text("step_00000395\n")
    assert rp.latest_step(tmp_path) == 395
    (tmp_path / "latest").write_text("garbage\n")
    assert rp.latest_step(tmp_path) is None


# ---------------------------------------------------------------------------------------------- statistics
def test_sampling_stats_by_hand():
    recs = [
        {"length": 10, "seconds": 1.0, "nfe": 4, "entropy": 2.0, "stop": "eos"},
        {"length": 30, "seconds": 2.0, "nfe": 8, "entropy": 3.0, "stop": "length"},
        {"length": 20, "seconds": 1.0, "nfe": 6, "entropy": 4.0, "stop": "eos"},
    ]
    s = rp.sampling_stats(recs)
    assert s["median_length"] == 20 and s["max_length"] == 30 and s["tokens_per_s"] == pytest.approx(60 / 4)
    assert s["nfe"] == pytest.approx(6) and s["entropy"] == pytest.approx(3) and s["stops"] == {"eos": 2, "length": 1}
    with pytest.raises(rp.StepFailed):
        rp.sampling_stats([])


def _agg(ppls: dict[str, list[float]]):
    return rp.aggregate({name: {i: {"ppl": v} for i, v in enumerate(vals)} for name, vals in ppls.items()})


def test_aggregate_and_the_ordering_verdict():
    agg = _agg({"ar": [10.0, 12.0], "bd3_l4": [20.0, 22.0], "mdlm": [40.0, 44.0]})
    assert agg["ar"]["ppl"] == {"mean": 11.0, "sd": pytest.approx(statistics.stdev([10, 12])), "n": 2}
    text = rp.ordering_verdict(agg)
    assert "the paper's ordering appears" in text and "within the seed spread" not in text
    flipped = rp.ordering_verdict(_agg({"ar": [10.0, 11.0], "bd3_l4": [30.0, 31.0], "mdlm": [20.0, 21.0]}))
    assert "does NOT appear: reversed bd3_l4 vs mdlm" in flipped
    close = rp.ordering_verdict(_agg({"ar": [10.0, 14.0], "bd3_l4": [12.0, 16.0]}))
    assert "appears" in close and "within the seed spread (2 seed(s)): ar vs bd3_l4" in close
    assert "no ordering" in rp.ordering_verdict(_agg({"ar": [1.0]}))


def test_markdown_table_marks_exact_bounds_spread_and_missing_metrics():
    per = {
        "ar": {1: {"ppl": 10.0}, 2: {"ppl": 12.0}},
        "bd3_l4": {1: {"ppl": 20.0, "gen_ppl": 50.0, "nfe": 32}, 2: {"ppl": 22.0, "gen_ppl": 54.0, "nfe": 32}},
    }
    systems = [s for s in rp.SYSTEMS if s.name in per]
    table = rp.markdown_table(systems, rp.aggregate(per), "header")
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in table.splitlines()[4:]}
    assert rows["AR"][:3] == ["1", f"= 11.00 ± {statistics.stdev([10, 12]):.2f}", "n/a"]
    assert rows["BD3-LM L'=4"][:3] == ["4", "≤ 21.00 ± 1.41", "52.0 ± 2.8"] and rows["BD3-LM L'=4"][-1] == "32 ± 0"
    assert table.startswith("header\n\n| System | L' | Test PPL |")


# ---------------------------------------------------------------------------------------------- end to end
MICRO = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.seq_len=32",
    "train.max_steps=2",
    "train.micro_batch_size=4",
    "train.eval_interval=2",
    "train.eval_rows=8",
    "checkpoint.interval=0",
    "optim.warmup_steps=1",
    "optim.ema=0",
    "log.interval=1",
]


def reproduce(out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "tools/reproduce.py", "--output", str(out), "--seeds", "1", "--systems", "ar,bd3_l4,sedd"]
    argv += ["--draws", "2", "--eval-rows", "8", "--gen-samples", "2", "--var-samples", "2", "--var-length", "16"]
    return subprocess.run([*argv, *extra, *MICRO], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_micro_reproduction_writes_the_table_and_resumes(tmp_path):
    out = tmp_path / "repro"
    proc = reproduce(out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    ar = results["runs"]["ar"]["1"]
    bd3 = results["runs"]["bd3_l4"]["1"]
    ev = json.loads((out / "seed_1" / "bd3_l4" / "eval.json").read_text())["result"]
    assert bd3["ppl"] == pytest.approx(math.exp(ev["nelbo"])) and len(ev["nelbo_draws"]) == 2 and ev["step"] == 2
    assert ar["draws"] == 1 and "gen_ppl" not in ar and "median_length" not in ar
    assert bd3["gen_ppl"] > 1 and bd3["entropy"] > 0
    samples = [json.loads(ln) for ln in (out / "seed_1" / "bd3_l4" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and bd3["max_length"] == max(s["length"] for s in samples) <= 16
    assert bd3["nfe"] == pytest.approx(statistics.mean(s["nfe"] for s in samples))
    table = (out / "table.md").read_text()
    assert "| AR | 1 | = " in table and "| BD3-LM L'=4 | 4 | ≤ " in table and "| SEDD | L | ≤ " in table
    assert "paper (best first): ar < bd3_l4 < sedd" in table
    sedd = results["runs"]["sedd"]["1"]
    assert sedd["gen_ppl"] > 1 and sedd["max_length"] <= 16 and sedd["nfe"] == 33  # L + 1 network calls
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun redoes nothing: every step's command is unchanged
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    t0 = time.time()
    again = reproduce(out)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 3
    assert "[eval]" not in again.stdout and "[sample]" not in again.stdout and time.time() - t0 < 30
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name not in ("results.json",))

    # a changed sampling setting redoes the sampling only
    more = reproduce(out, "--var-samples", "3")
    assert more.returncode == 0, more.stderr[-2000:]
    assert "[sample] bd3_l4 seed 1" in more.stdout and "[eval]" not in more.stdout
    assert len((out / "seed_1" / "bd3_l4" / "samples.jsonl").read_text().splitlines()) == 3
    eval_json = out / "seed_1" / "bd3_l4" / "eval.json"
    assert eval_json.stat().st_mtime_ns == stamps[eval_json]


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_running_training_and_a_rerun_continues(tmp_path):
    import os
    import signal

    out = tmp_path / "repro"
    argv = [sys.executable, "tools/reproduce.py", "--output", str(out), "--seeds", "1", "--systems", "ar", *MICRO]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [*argv, "train.max_steps=100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    log = out / "seed_1" / "ar" / "train.log"
    deadline = time.time() + 240
    while not (log.is_file() and "step 3/" in log.read_text(errors="replace")):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the driver
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    step = rp.latest_step(out / "seed_1" / "ar" / "checkpoints")
    assert step is not None and step >= 3
    assert f"training stopped at step {step} of 100000" in stderr and "stopped: every finished step is kept" in stderr
    assert not (out / "seed_1" / "ar" / "train.json").exists()
    # the rerun resumes that checkpoint (here: asked to end at its step, so it finishes at once)
    done = subprocess.run(
        [*argv, "--train-only", f"train.max_steps={step}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "seed_1" / "ar" / "train.json").read_text())["step"] == step
    text = log.read_text(errors="replace")
    assert "resumed from" in text and f"at step {step}" in text.split("resumed from")[-1]
