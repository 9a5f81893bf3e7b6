#!/usr/bin/env bash
#SBATCH --job-name=bd3-repro
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
#
# The paper's comparison table (bd3-reproduce, tools/reproduce.py, preset `paper`: AR, MDLM, BD3-LM L'=16/8/4 on
# OpenWebText, 169M, L=1024, 1M steps each, configs/owt_small_l4.yaml) as a Slurm job array: one array task per
# (system, seed) run, trained like slurm/owt_l4_128gpu.sh on 16 nodes x 8 GPUs, then one job that evaluates every run,
# samples and writes REPRO_DIR/table.md, table.png and results.json. Submit from the repository root:
#     bash slurm/reproduce_array.sh submit [section.key=value ...]    # extra arguments are overrides for every run
# which calls sbatch twice: `--array=0-(N-1) slurm/reproduce_array.sh train ...` with N = the number of lines of
# `bd3-reproduce --preset paper --list-runs` (the array index is that list's line: bd3-reproduce owns the mapping),
# and `--dependency=afterok:<array> --kill-on-invalid-dep=yes ... slurm/reproduce_array.sh table ...` on 1 node with
# 1 GPU, 8 CPUs, 64 GB, 48 h; both write their logs to REPRO_DIR/slurm/. The two steps can also be submitted by hand
# with the same arguments and environment (`sbatch --array=0-4 slurm/reproduce_array.sh train ...`).
#
# train (one array task): `bd3-reproduce --run-index $SLURM_ARRAY_TASK_ID --launch-args` gives the run's config and
# launcher.train overrides (mode, block size, seed, REPRO_DIR/seed_S/SYSTEM/{checkpoints,log}); slurm/launch.sh then
# runs one `python -m launcher.train` task per GPU with srun exactly as the other GPU scripts do (ranks from
# SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, MASTER_ADDR = first host of the allocation). When training ends at its
# last step, `bd3-reproduce --mark-trained` records the run as trained (train.json), so the table job skips it.
# table: `bd3-reproduce --preset paper --eval-only` on the run folders: every run must be trained (it trains none);
# it evaluates (NELBO with K draws, generative perplexity under the seed's AR run), samples and writes the table;
# each finished step is kept, so a rerun or requeue continues where it stopped.
#
# Preemption and time limit: 300 s before the limit Slurm sends SIGUSR1 to the batch shell. In a train task it goes to
# the ranks, which finish the current step, save a checkpoint and exit 0, and the task requeues itself (same array
# index, resumes from the newest complete checkpoint, checkpoint.resume=auto); in the table job bd3-reproduce stops
# its current step and the job requeues itself. SIGTERM (scancel, preemption) is handled the same way. The table job
# starts only once every array task has completed (afterok): a requeued task delays it, a failed one cancels it.
#
# Site settings: sbatch's own variables apply to both jobs without editing this file, e.g.
#     SBATCH_PARTITION=gpu SBATCH_ACCOUNT=myproj SBATCH_QOS=normal bash slurm/reproduce_array.sh submit
# (also SBATCH_TIMELIMIT, SBATCH_CONSTRAINT, SBATCH_RESERVATION); TABLE_SBATCH_ARGS adds sbatch options to the table
# job only (they come last, so they win: e.g. "--time=72:00:00 --gpus-per-node=a100:1").
# Environment variables read by this script (all optional; submit passes them on to both jobs):
#   REPRO_DIR      root of the reproduction on a shared filesystem: one run folder per system and seed, the table
#                  (-> bd3-reproduce --output; default $BD3_ROOT/runs/reproduce_paper; relative: to $BD3_ROOT)
#   SEEDS          comma-separated training seeds (-> --seeds; default the preset's: 1)
#   SYSTEMS        comma-separated subset of the systems (-> --systems; default all of them)
#   ARRAY_LIMIT    at most this many array tasks at a time (--array=0-(N-1)%ARRAY_LIMIT; default no limit)
#   TABLE_SBATCH_ARGS  extra sbatch options for the table job (see above)
#   BD3_ROOT       repository checkout to run from (default: the directory sbatch was called from)
#   VENV, PYTHON   Python environment (default: $BD3_ROOT/.venv, $VENV/bin/python; see scripts/setup_env.sh); the
#                  batch host runs it for bd3-reproduce, so it must exist there even with CONTAINER; PYTHONPATH is
#                  kept behind $BD3_ROOT, so this checkout's code is the one imported
#   DATA_PATH      training data: prepared shards, raw text or a bucket URL (-> data.path of every run)
#   MICRO_BATCH    sequences per GPU per micro-step (default 4: 4 x 128 GPUs = global batch 512)
#   WANDB_PROJECT  Weights & Biases logging into this project for every run (-> log.wandb=true, log.wandb_project);
#                  WANDB_ENTITY, WANDB_API_KEY, WANDB_MODE (=offline on nodes without internet) pass through
#   CONTAINER      container image for srun's pyxis plugin (--container-image); CONTAINER_MOUNTS (--container-mounts)
#   SRUN_ARGS      extra srun arguments (e.g. "--cpu-bind=cores --mpi=none")
#   MASTER_PORT    rendezvous port (default 20000 + job id mod 10000)
#   DRY_RUN=1      each job checks its allocation and prints its command (the srun line, the bd3-reproduce line)
#                  without running it; with submit, both jobs are submitted and do only that
#   OMP_NUM_THREADS  CPU threads per rank (default: --cpus-per-task)
#   RUN_DIR, CKPT_DIR, INIT_FROM, CONFIG: refused (error) in train and table: bd3-reproduce sets each run's config
#                  and folders, and every system trains from scratch as in the paper
# NCCL (passed through to every rank when set): NCCL_SOCKET_IFNAME (e.g. ib0 or eth0: the interface the bootstrap uses),
# NCCL_IB_HCA (e.g. mlx5), NCCL_IB_DISABLE=1 (no InfiniBand), NCCL_DEBUG=INFO (topology and transport at start-up),
# NCCL_P2P_LEVEL / NCCL_NET_GDR_LEVEL (GPUDirect); TORCH_NCCL_ASYNC_ERROR_HANDLING defaults to 1 so a hung collective
# aborts the job instead of burning the allocation.
set -euo pipefail
log() { echo "[$(date +%H:%M:%S) bd3-slurm] $*"; }
die() { echo "error: $*" >&2; exit 2; }
script=$(realpath "$0")  # submit hands this file to sbatch after the cd below
mode=${1:-}
case "$mode" in
  submit|train|table) shift ;;
  *) die "first argument must be submit, train or table (got '${mode}'): bash $0 submit [section.key=value ...]" ;;
esac
if [ "$mode" != submit ]; then
  [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with bash $0 submit"
  ROOT=${BD3_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
else
  ROOT=${BD3_ROOT:-$PWD}
fi
[ -f "$ROOT/launcher/train.py" ] ||
  die "$ROOT is not a bd3-megatron checkout: run from the repository root or set BD3_ROOT"
cd "$ROOT"
PYTHON=${PYTHON:-${VENV:-$ROOT/.venv}/bin/python}
[ -x "$PYTHON" ] || die "no Python at $PYTHON: run scripts/setup_env.sh or set VENV/PYTHON"
REPRO_DIR=$(realpath -m "${REPRO_DIR:-$ROOT/runs/reproduce_paper}")  # a relative one: under BD3_ROOT
export REPRO_DIR  # submit: the same folder for both jobs
for var in RUN_DIR CKPT_DIR INIT_FROM CONFIG; do
  [ -z "${!var:-}" ] ||
    die "$var is set: bd3-reproduce sets each run's config and folders under REPRO_DIR ($REPRO_DIR); unset it"
done

# bd3-reproduce's options and overrides: the same in every mode, so the table job sees the runs the tasks trained
repro=(--preset paper --output "$REPRO_DIR")
[ -z "${SEEDS:-}" ] || repro+=(--seeds "$SEEDS")
[ -z "${SYSTEMS:-}" ] || repro+=(--systems "$SYSTEMS")
overrides=("train.micro_batch_size=${MICRO_BATCH:-4}")
[ -z "${DATA_PATH:-}" ] || overrides+=("data.path=$DATA_PATH")
[ -z "${WANDB_PROJECT:-}" ] || overrides+=(log.wandb=true "log.wandb_project=$WANDB_PROJECT")
overrides+=("$@")
reproduce() {
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m tools.reproduce "${repro[@]}" "$@" "${overrides[@]}"
}

if [ "$mode" = submit ]; then
  command -v sbatch >/dev/null || die "sbatch not found: submit from a Slurm login node"
  runs=$(reproduce --list-runs)  # bad settings end here, with bd3-reproduce's error line
  n=$(wc -l <<< "$runs")
  log "$n runs: $(tr '\n' ',' <<< "$runs" | sed 's/,$//; s/,/, /g')"
  mkdir -p "$REPRO_DIR/slurm"  # the jobs' logs, next to the runs
  array=$(sbatch --parsable --array="0-$((n - 1))${ARRAY_LIMIT:+%$ARRAY_LIMIT}" \
    --output="$REPRO_DIR/slurm/%x-%A_%a.out" "$script" train "$@")
  array=${array%%;*}
  read -r -a table_extra <<< "${TABLE_SBATCH_ARGS:-}"
  table=$(sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes --job-name=bd3-repro-table \
    --output="$REPRO_DIR/slurm/%x-%j.out" --nodes=1 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=8 \
    --mem=64G --time=48:00:00 "${table_extra[@]}" "$script" table "$@")
  table=${table%%;*}
  log "submitted array job $array (tasks 0-$((n - 1)), one per line above) and table job $table (after every task)"
  echo "$array $table"
  exit 0
fi

if [ "$mode" = table ]; then
  (( ${SLURM_NTASKS:-1} == 1 )) || die "the table job is one process: submit it with --ntasks-per-node=1 --nodes=1"
  gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
  [ -n "${gpus##*:}" ] || die "no GPU in this allocation: the evaluation needs one (--gpus-per-node=1)"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): table of $REPRO_DIR on $SLURM_JOB_NODELIST"
  log "$PYTHON -m tools.reproduce ${repro[*]} --eval-only ${overrides[*]}"
  [ "${DRY_RUN:-0}" = 1 ] && { log "dry run: not evaluating"; exit 0; }
  stop_requested=0
  pid=""
  forward_stop() {  # bd3-reproduce ends its current step's process and exits; finished steps are kept
    stop_requested=1
    log "received $1: stopping bd3-reproduce"
    [ -z "$pid" ] || kill -TERM "$pid" 2>/dev/null || true
  }
  trap 'forward_stop USR1' USR1
  trap 'forward_stop TERM' TERM
  reproduce --eval-only &
  pid=$!
  set +e
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done  # a trapped signal interrupts wait
  wait "$pid"
  rc=$?
  set -e
  if (( stop_requested )); then
    log "requeueing job $SLURM_JOB_ID (bd3-reproduce continues from its finished steps)"
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed: resubmit the table job to continue"
    exit 0
  fi
  log "bd3-reproduce ended with exit code $rc"
  exit "$rc"
fi

# ---- train: one array task = one run of bd3-reproduce's list, launched like every GPU script
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] ||
  die "train runs as an array task: submit with bash $0 submit (or sbatch --array=...)"
launch_out=$(reproduce --run-index "$SLURM_ARRAY_TASK_ID" --launch-args)
mapfile -t run_args <<< "$launch_out"
[ "${run_args[0]}" = --config ] || die "unexpected bd3-reproduce --launch-args output: ${run_args[*]}"
run=$(reproduce --run-index "$SLURM_ARRAY_TASK_ID" --list-runs)
log "array task $SLURM_ARRAY_TASK_ID of job ${SLURM_ARRAY_JOB_ID:-?}: system ${run% *}, seed ${run#* }"
CONFIG=${run_args[1]}
REQUIRE_GPUS=1
RECIPE=("${run_args[@]:2}")
unset DATA_PATH WANDB_PROJECT  # already overrides in RECIPE; launch.sh would add them a second time
after_training() {  # called by launch.sh when training ended at its last step (exit 0, no stop request)
  [ "${args[*]}" = "${run_args[*]}" ] || die "launch.sh ran other arguments than bd3-reproduce gave: ${args[*]}"
  local prefix=("${launch[@]:0:$(( ${#launch[@]} - ${#args[@]} - 2 ))}")  # the srun line before -m launcher.train
  reproduce --run-index "$SLURM_ARRAY_TASK_ID" --mark-trained --train-prefix "$(printf '%q ' "${prefix[@]}")"
}
set --  # the overrides are in RECIPE; launch.sh appends its own arguments to the launcher's

# ---- the shared launch (slurm/launch.sh). sbatch runs a copy of this file, so it is found from the submit dir ----
launch_sh=$ROOT/slurm/launch.sh
[ -f "$launch_sh" ] || { echo "error: $launch_sh not found: sbatch from the repository root or set BD3_ROOT" >&2; exit 2; }
source "$launch_sh"
