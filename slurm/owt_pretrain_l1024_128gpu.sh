#!/usr/bin/env bash
#SBATCH --job-name=bd3-owt-pretrain
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# The paper's base model for OpenWebText: BD3-LM small (169M) with block size L'=L=1024, i.e. the MDLM-equivalent
# masked diffusion pretrain (configs/owt_pretrain_l1024.yaml: global batch 512 = 4 sequences/GPU x 128 GPUs,
# AdamW 3e-4, 2500 warmup steps, constant LR, clip 1, bf16, EMA 0.9999, 850K steps), on 16 nodes x 8 GPUs.
# Submit from the repository root:
#     sbatch slurm/owt_pretrain_l1024_128gpu.sh [section.key=value ...]      # extra arguments are config overrides
#
# Launch model: one srun task per GPU (8 per node), each runs `python -m launcher.train`; ranks come from
# SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (local rank = GPU index), the rendezvous is MASTER_ADDR = first host of
# `scontrol show hostnames $SLURM_JOB_NODELIST` and MASTER_PORT. No torchrun: srun delivers the stop signal to every
# rank itself.
#
# Preemption and time limit: 300 s before the limit Slurm sends SIGUSR1 to this script; it forwards the signal to the
# ranks, which finish the current step, save a checkpoint and exit 0; the script then runs `scontrol requeue` and the
# requeued job resumes from the newest complete checkpoint (checkpoint.resume=auto). SIGTERM (scancel, preemption)
# is forwarded the same way. The log file is appended to across requeues.
#
# Site settings: sbatch's own variables override the directives above without editing this file, e.g.
#     SBATCH_PARTITION=gpu SBATCH_ACCOUNT=myproj SBATCH_QOS=normal SBATCH_TIMELIMIT=48:00:00 sbatch slurm/owt_pretrain_l1024_128gpu.sh
# (also SBATCH_CONSTRAINT, SBATCH_RESERVATION; any directive can be given on the sbatch command line instead:
# sbatch --nodes=4 ... then set MICRO_BATCH so that global batch = MICRO_BATCH x GPUs x accumulation).
# Environment variables read by this script (all optional):
#   BD3_ROOT       repository checkout to run from (default: the directory sbatch was called from)
#   VENV, PYTHON   Python environment (default: $BD3_ROOT/.venv, $VENV/bin/python; see scripts/setup_env.sh)
#   CONFIG         recipe (default: configs/owt_pretrain_l1024.yaml)
#   DATA_PATH      training data: prepared shards, a folder of .txt, or .jsonl[.gz]  (-> data.path)
#   RUN_DIR        log directory with metrics.jsonl (-> log.dir; default from the config: runs/owt_pretrain_l1024)
#   CKPT_DIR       checkpoint directory on a shared filesystem (-> checkpoint.dir; default $RUN_DIR/checkpoints)
#   INIT_FROM      start from another run's weights, e.g. the L'=1024 pretrain (-> checkpoint.init_from);
#                  ignored once CKPT_DIR holds this run's own checkpoint, so requeues resume
#   MICRO_BATCH    sequences per GPU per micro-step (default 4: 4 x 128 GPUs = global batch 512)
#   WANDB_PROJECT  turn on Weights & Biases logging into this project (-> log.wandb=true, log.wandb_project);
#                  WANDB_ENTITY, WANDB_API_KEY, WANDB_MODE (=offline on nodes without internet) pass through
#   CONTAINER      container image for srun's pyxis plugin (--container-image); CONTAINER_MOUNTS (--container-mounts)
#   SRUN_ARGS      extra srun arguments (e.g. "--cpu-bind=cores --mpi=none")
#   MASTER_PORT    rendezvous port (default 20000 + job id mod 10000)
#   DRY_RUN=1      check the allocation and print the srun command without running it
#   OMP_NUM_THREADS  CPU threads per rank (default: --cpus-per-task)
# NCCL (passed through to every rank when set): NCCL_SOCKET_IFNAME (e.g. ib0 or eth0: the interface the bootstrap uses),
# NCCL_IB_HCA (e.g. mlx5), NCCL_IB_DISABLE=1 (no InfiniBand), NCCL_DEBUG=INFO (topology and transport at start-up),
# NCCL_P2P_LEVEL / NCCL_NET_GDR_LEVEL (GPUDirect); TORCH_NCCL_ASYNC_ERROR_HANDLING defaults to 1 so a hung collective
# aborts the job instead of burning the allocation.
set -euo pipefail
CONFIG=${CONFIG:-configs/owt_pretrain_l1024.yaml}
REQUIRE_GPUS=1
RECIPE=("train.micro_batch_size=${MICRO_BATCH:-4}")

# ---- common launch block: identical in every slurm/*.sh (tests/test_slurm_scripts.py checks) ----
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
exit "$rc"
