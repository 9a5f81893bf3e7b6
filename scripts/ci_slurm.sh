#!/usr/bin/env bash
# CI Slurm stage: prove slurm/*.sh under a real Slurm (Debian's slurmctld/slurmd/munge on this one machine).
#  1. install the packages if missing (the only network traffic: apt), start a cluster of 2 emulated nodes;
#  2. sbatch slurm/tiny_cpu.sh across both nodes (CPU/gloo, a shrunk tiny model) and, while it runs:
#     a. send SIGUSR1 to the batch shell (what --signal=B:USR1@N does before the time limit): the ranks checkpoint
#        and exit 0, the script requeues itself, the requeued job must resume from that checkpoint;
#     b. `scontrol requeue` the job from outside: it must resume again from its newest checkpoint;
#     (a requeued job waits ~2 min (BeginTime) before Slurm restarts it: CI starts it at once with StartTime=now)
#     then check the finished run's metrics.jsonl and final checkpoint;
#  3. restart the cluster as 16 nodes x 8 (fake) GPUs: `sbatch --test-only` every GPU script, run each with DRY_RUN=1
#     (the script's own allocation checks + the srun line), and check a wrong tasks-per-node is refused; submit the
#     reproduction array (slurm/reproduce_array.sh submit: one task per run of bd3-reproduce --list-runs + the afterok
#     table job) with DRY_RUN=1 and check each task's run and srun line and the table job's command;
#  4. stop every daemon it started, by pid, also on failure (trap).
# Needs root and the project's .venv (scripts/setup_env.sh). Usage: bash scripts/ci_slurm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CLUSTER="$ROOT/scripts/slurm_local_cluster.sh"
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
t0=$SECONDS
say() { echo "[ci-slurm $((SECONDS - t0))s] $*"; }
fail() { say "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || { echo "error: scripts/ci_slurm.sh needs root (it installs and runs the Slurm daemons)" >&2; exit 2; }
[ -x "$PYTHON" ] || { echo "error: no Python at $PYTHON: run scripts/setup_env.sh first or set PYTHON" >&2; exit 2; }
WORK=$(mktemp -d /tmp/bd3-ci-slurm.XXXXXX)  # on the filesystem both emulated nodes share
JOB_OUT=$WORK/tiny.out

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$rc" != 0 ]; then
    say "stage failed (exit $rc); job output and daemon logs:"
    tail -n 60 "$JOB_OUT" 2>/dev/null || true
    tail -n 20 /var/log/slurm-local/*.log 2>/dev/null || true
  fi
  bash "$CLUSTER" stop || true
  rm -rf "$WORK"
  say "Slurm stage $([ "$rc" = 0 ] && echo passed || echo FAILED) in $((SECONDS - t0))s"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

job_state() { scontrol show job -o "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
latest_step() { sed -n 's/^step_0*\([0-9]\)/\1/p' "$WORK/run/checkpoints/latest" 2>/dev/null || true; }

# wait_for DESCRIPTION SECONDS COMMAND...: poll every 0.2 s until COMMAND succeeds; fail on timeout or a dead job.
wait_for() {
  local what=$1 limit=$2 start=$SECONDS st; shift 2
  until "$@"; do
    st=$(job_state "$JOB")
    case "$st" in FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL) fail "job $JOB is $st while waiting for $what";; esac
    (( SECONDS - start < limit )) || fail "no $what after ${limit}s (job $JOB is ${st:-gone})"
    sleep 0.2
  done
}
ckpt_at_least() { local s; s=$(latest_step); [ -n "$s" ] && (( s >= $1 )); }
output_has() { grep -q -- "$1" "$JOB_OUT" 2>/dev/null; }
output_count_is() { [ "$(grep -c -- "$1" "$JOB_OUT" 2>/dev/null)" -ge "$2" ]; }
running() { [ "$(job_state "$JOB")" = RUNNING ]; }

# ------------------------------------------------------------------ 1. install + 2-node cluster
bash "$CLUSTER" install
say "slurm installed"
SLURM_LOCAL_NODES=2 bash "$CLUSTER" start
say "2-node cluster up"

# ------------------------------------------------------------------ 2. tiny_cpu.sh: run, preempt, requeue, finish
# The run's settings live in a YAML that CONFIG points at (the script reads CONFIG again on every restart): first an
# open-ended max_steps so the job is surely still running when interrupted, then, while the job waits requeued, the
# final target a few steps past its checkpoint. The test's timing therefore does not depend on machine speed.
CI_CONFIG=$WORK/tiny_ci.yaml
write_config() {  # write_config MAX_STEPS: configs/tiny_cpu.yaml shrunk for CI
  "$PYTHON" - "$CI_CONFIG" "$1" "$WORK/cache" <<'EOF'
import sys, yaml
out, steps, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = yaml.safe_load(open("configs/tiny_cpu.yaml"))
cfg["model"].update(num_layers=2, hidden_size=64, num_heads=4, seq_len=32)
cfg["train"].update(micro_batch_size=4, global_batch_size=8, max_steps=steps, eval_interval=10, eval_rows=8)
cfg["optim"].update(warmup_steps=5, schedule="constant")
cfg["data"]["cache_dir"] = cache
cfg["checkpoint"].update(interval=5, keep=0)
cfg["log"]["interval"] = 5
cfg["sample"]["after_train"] = False
yaml.safe_dump(cfg, open(out, "w"))
EOF
}
# requeued and cleaned up: the job waits (Slurm's requeue delay) and both nodes are idle again, so every rank is gone
requeued() { [ "$(job_state "$JOB")" = PENDING ] && [ "$(sinfo -h -t idle -o %D)" = 2 ]; }
# Skip the ~2 min BeginTime delay of a requeued job. slurmd refuses a launch whose credential is not newer than the
# job's revocation (the requeue kill) at one-second resolution, so the restart must not start in the same second.
release() { sleep 2; scontrol update JobId="$JOB" StartTime=now; }

write_config 100000
JOB=$(CONFIG=$CI_CONFIG RUN_DIR=$WORK/run sbatch --parsable -o "$JOB_OUT" slurm/tiny_cpu.sh)
JOB=${JOB%%;*}
say "submitted job $JOB: slurm/tiny_cpu.sh on 2 nodes"
wait_for "checkpoint at step 5" 240 ckpt_at_least 5
scancel --batch --signal=USR1 "$JOB"
say "checkpoint step $(latest_step) exists; sent SIGUSR1 to the batch shell (as --signal=B:USR1 does)"
wait_for "'preempted:' line" 120 output_has "preempted: stop signal received"
n1=$(sed -n 's/.*preempted: stop signal received: checkpoint saved at step \([0-9]*\).*/\1/p' "$JOB_OUT" | head -n 1)
wait_for "requeue by the script" 60 output_has "requeueing job $JOB"
wait_for "requeued job" 120 requeued
release
wait_for "restart 1" 120 output_has "(restart 1)"
wait_for "resume of restart 1" 240 output_has "resumed from .* at step $n1\b"
say "preempted at step $n1, requeued by the script, resumed at step $n1"
wait_for "a checkpoint past step $n1" 240 ckpt_at_least $((n1 + 5))
scontrol requeue "$JOB"
wait_for "requeued job" 120 requeued
n2=$(latest_step)
final=$((n2 + 15))
write_config "$final"
release
say "scontrol requeue: newest checkpoint step $n2; the restart trains to step $final"
wait_for "restart 2" 120 output_has "(restart 2)"
wait_for "resume of restart 2" 240 output_has "resumed from .* at step $n2\b"
until [ "$(job_state "$JOB")" = COMPLETED ]; do
  st=$(job_state "$JOB")
  case "$st" in FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL) fail "job $JOB ended $st";; esac
  (( SECONDS - t0 < 1200 )) || fail "job $JOB not COMPLETED (state $st)"
  sleep 0.5
done
say "job $JOB COMPLETED"
grep -q "2 nodes x 1 tasks on node\[01-02\], master node01:" "$JOB_OUT" || fail "job did not span node[01-02] with master node01"
"$PYTHON" - "$WORK/run" "$final" <<'EOF' || fail "metrics/checkpoint check"
import json, math, pathlib, sys
run, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
assert sum(r["step"] == 0 for r in rows) == 1, "step 0 logged more than once: a run restarted from scratch"
assert rows[-1]["step"] == steps, f"last logged step {rows[-1]['step']} != {steps}"
evals = [r for r in rows if r.get("val_nelbo") is not None]
assert evals and all(math.isfinite(r["val_nelbo"]) for r in evals), "no finite val_nelbo"
assert evals[-1]["val_nelbo"] < evals[0]["val_nelbo"], "validation NELBO did not improve"
ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
meta = json.loads((ckpt / "metadata.json").read_text())
assert meta["step"] == steps, f"final checkpoint at step {meta['step']}"
assert (meta["layout"]["tp"], meta["layout"]["pp"], meta["layout"]["dp"]) == (1, 1, 2), meta["layout"]
print(f"metrics: {len(rows)} rows, val_nelbo {evals[0]['val_nelbo']:.3f} -> {evals[-1]['val_nelbo']:.3f}; "
      f"checkpoint {ckpt.name} (dp=2)")
EOF
say "tiny_cpu.sh passed: 2 nodes, preempted at step $n1 and resumed there, requeued and resumed at step $n2, finished at step $final"

# ------------------------------------------------------------------ 3. 16 nodes x 8 GPUs: directives + allocation checks
export SLURM_LOCAL_NODES=16 SLURM_LOCAL_GPUS=8 SLURM_LOCAL_CPUS=64 SLURM_LOCAL_MEM_MB=4096 SLURM_LOCAL_PARTITION=gpu
bash "$CLUSTER" start
say "16x8-GPU cluster up"
export SBATCH_PARTITION=gpu SBATCH_ACCOUNT=ci   # the documented way to set site values without editing a script
for script in slurm/owt_l4_128gpu.sh slurm/owt_pretrain_l1024_128gpu.sh slurm/lm1b_l4_32gpu.sh; do
  out=$(sbatch --test-only "$script" 2>&1) || fail "sbatch --test-only $script: $out"
  echo "$out" | grep -q "in partition gpu" || fail "sbatch --test-only $script: $out"
  JOB_OUT=$WORK/dry.out
  JOB=$(DRY_RUN=1 sbatch --parsable -o "$JOB_OUT" "$script"); JOB=${JOB%%;*}
  bash "$CLUSTER" wait "$JOB" || fail "DRY_RUN=1 $script"
  nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$script")
  grep -q "$nodes nodes x 8 tasks on node\[01-$(printf %02d "$nodes")\], master node01:" "$JOB_OUT" ||
    fail "$script: unexpected allocation: $(cat "$JOB_OUT")"
  grep -q "srun --kill-on-bad-exit=1 --ntasks=$((nodes * 8)) --ntasks-per-node=8 --cpus-per-task=8 " "$JOB_OUT" ||
    fail "$script: unexpected srun line: $(cat "$JOB_OUT")"
  say "$script: --test-only ok ($(echo "$out" | sed -n 's/.*using \([0-9]*\) processors.*/\1 CPUs/p')), dry run ok"
done
JOB_OUT=$WORK/bad.out
JOB=$(DRY_RUN=1 sbatch --parsable --ntasks-per-node=4 -o "$JOB_OUT" slurm/owt_l4_128gpu.sh); JOB=${JOB%%;*}
if bash "$CLUSTER" wait "$JOB" 2>/dev/null; then fail "4 tasks per node on 8-GPU nodes was accepted"; fi
grep -q "error: 4 tasks per node but 8 GPUs per node" "$JOB_OUT" || fail "wrong refusal: $(cat "$JOB_OUT")"
say "4 tasks on 8-GPU nodes refused with one error line"

# the reproduction array: the submit path itself (sbatch twice: the array, then the table job after it), every job
# a dry run; task I must launch line I of bd3-reproduce --list-runs on 16 x 8 GPUs, the table job must run last
script=slurm/reproduce_array.sh
out=$(sbatch --test-only --array=0-4 "$script" train 2>&1) || fail "sbatch --test-only $script: $out"
echo "$out" | grep -q "in partition gpu" || fail "sbatch --test-only $script: $out"
REPRO=$WORK/repro
ids=$(DRY_RUN=1 REPRO_DIR=$REPRO TABLE_SBATCH_ARGS=--mem=1G bash "$script" submit | tail -n 1) || fail "$script submit"
read -r array table <<< "$ids"
JOB_OUT=$REPRO/slurm/bd3-repro-table-$table.out
bash "$CLUSTER" wait "$table" || fail "$script: table job $table did not complete: $(tail -n 5 "$REPRO"/slurm/*.out)"
mapfile -t runs < <(PYTHONPATH=$ROOT "$PYTHON" -m tools.reproduce --preset paper --output "$REPRO" --list-runs)
(( ${#runs[@]} >= 5 )) || fail "bd3-reproduce --list-runs gave ${#runs[@]} runs"
for i in "${!runs[@]}"; do
  name=${runs[i]% *} seed=${runs[i]#* } task_out=$REPRO/slurm/bd3-repro-${array}_$i.out
  grep -q "array task $i of job $array: system $name, seed $seed" "$task_out" || fail "task $i: $(cat "$task_out")"
  grep -q "16 nodes x 8 tasks on node\[01-16\], master node01:" "$task_out" || fail "task $i: $(cat "$task_out")"
  srun_line="srun --kill-on-bad-exit=1 --ntasks=128 --ntasks-per-node=8 --cpus-per-task=8 .*"
  grep -q "$srun_line checkpoint.dir=$REPRO/seed_$seed/$name/checkpoints " "$task_out" ||
    fail "task $i: unexpected srun line: $(cat "$task_out")"
done
grep -q "tools.reproduce --preset paper --output $REPRO --eval-only train.micro_batch_size=4" "$JOB_OUT" ||
  fail "table job: $(cat "$JOB_OUT")"
say "$script: --test-only ok, submit ok: ${#runs[@]} array tasks (one per run of --list-runs) then the table job"
