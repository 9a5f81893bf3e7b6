#!/usr/bin/env bash
# The launch shared by every slurm/*.sh recipe: sourced by them after they set CONFIG, REQUIRE_GPUS and RECIPE.
# Checks the allocation, sets the rendezvous, builds the launcher arguments from the environment variables that
# each recipe documents in its header, runs one `python -m launcher.train` task per GPU with srun, and turns a stop
# signal into checkpoint + requeue. Not a batch script itself.
log() { echo "[$(date +%H:%M:%S) bd3-slurm] $*"; }
die() { echo "error: $*" >&2; exit 2; }
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with sbatch $0"
ROOT=${BD3_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$ROOT/launcher/train.py" ] || die "$ROOT is not a bd3-megatron checkout: sbatch from the repository root or set BD3_ROOT"
cd "$ROOT"
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-$VENV/bin/python}
[ -n "${CONTAINER:-}" ] || [ -x "$PYTHON" ] || die "no Python at $PYTHON: run scripts/setup_env.sh or set VENV/PYTHON"
[ -f "$CONFIG" ] || die "config $CONFIG not found (set CONFIG relative to $ROOT)"
nodes=${SLURM_JOB_NUM_NODES:?}
ntasks=${SLURM_NTASKS:?}
(( ntasks % nodes == 0 )) || die "$ntasks tasks do not spread evenly over $nodes nodes: use --ntasks-per-node"
per_node=$(( ntasks / nodes ))
if [ "$REQUIRE_GPUS" = 1 ]; then
  gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
  gpus=${gpus##*:}  # "a100:8" -> 8
  [ -n "$gpus" ] || die "no GPUs in this allocation: request them with --gpus-per-node"
  (( per_node == gpus )) || die "$per_node tasks per node but $gpus GPUs per node: one task per GPU is required (--ntasks-per-node=$gpus)"
fi
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
args=(--config "$CONFIG" "${RECIPE[@]}")
if [ -n "${RUN_DIR:-}" ]; then args+=("log.dir=$RUN_DIR" "checkpoint.dir=${CKPT_DIR:-$RUN_DIR/checkpoints}")
elif [ -n "${CKPT_DIR:-}" ]; then args+=("checkpoint.dir=$CKPT_DIR"); fi
[ -z "${DATA_PATH:-}" ] || args+=("data.path=$DATA_PATH")
[ -z "${INIT_FROM:-}" ] || args+=("checkpoint.init_from=$INIT_FROM")
[ -z "${WANDB_PROJECT:-}" ] || args+=(log.wandb=true "log.wandb_project=$WANDB_PROJECT")
args+=("$@")
launch=(srun --kill-on-bad-exit=1 --ntasks="$ntasks" --ntasks-per-node="$per_node")
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || launch+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
[ -z "${CONTAINER:-}" ] || launch+=(--container-image="$CONTAINER" --container-workdir="$ROOT")
[ -z "${CONTAINER_MOUNTS:-}" ] || launch+=(--container-mounts="$CONTAINER_MOUNTS")
read -r -a extra <<< "${SRUN_ARGS:-}"
launch+=("${extra[@]}" "$PYTHON" -m launcher.train "${args[@]}")
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nodes nodes x $per_node tasks on $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"
log "${launch[*]}"
[ "${DRY_RUN:-0}" = 1 ] && { log "dry run: not launching"; exit 0; }

stop_requested=0
srun_pid=""
forward_stop() {  # the ranks checkpoint at the next step boundary and exit 0 (see launcher/train.py)
  stop_requested=1
  log "received $1: asking every rank to save a checkpoint and stop"
  [ -z "$srun_pid" ] || kill -USR1 "$srun_pid" 2>/dev/null || true
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM
"${launch[@]}" &
srun_pid=$!
set +e
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done  # a trapped signal interrupts wait
wait "$srun_pid"
rc=$?
set -e
if (( stop_requested && rc == 0 )); then
  log "checkpoint saved; requeueing job $SLURM_JOB_ID (it resumes from the newest checkpoint)"
  scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed: resubmit the same command to resume"
  exit 0
fi
log "training ended with exit code $rc"
# a recipe's own step after a run that ended at its last step (reproduce_array.sh records the run as trained)
if (( rc == 0 )) && declare -F after_training >/dev/null; then after_training; fi
exit "$rc"
