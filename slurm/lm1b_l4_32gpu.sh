#!/usr/bin/env bash
#SBATCH --job-name=bd3-lm1b-l4
#SBATCH --nodes=4
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
# The paper's LM1B recipe: BD3-LM small (12x768) with the bert-base-uncased vocabulary, L=128, block size L'=4
# (configs/lm1b_l4.yaml: global batch 512 = 16 sequences/GPU x 32 GPUs, AdamW 3e-4, 2500 warmup steps, constant LR,
# clip 1, bf16, EMA 0.9999, 1M steps = 65B tokens), on 4 nodes x 8 GPUs. Submit from the repository root:
#     sbatch slurm/lm1b_l4_32gpu.sh [section.key=value ...]      # extra arguments are config overrides
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
#     SBATCH_PARTITION=gpu SBATCH_ACCOUNT=myproj SBATCH_QOS=normal SBATCH_TIMELIMIT=48:00:00 sbatch slurm/lm1b_l4_32gpu.sh
# (also SBATCH_CONSTRAINT, SBATCH_RESERVATION; any directive can be given on the sbatch command line instead:
# sbatch --nodes=2 ... then set MICRO_BATCH so that global batch = MICRO_BATCH x GPUs x accumulation).
# Environment variables read by this script (all optional):
#   BD3_ROOT       repository checkout to run from (default: the directory sbatch was called from)
#   VENV, PYTHON   Python environment (default: $BD3_ROOT/.venv, $VENV/bin/python; see scripts/setup_env.sh)
#   CONFIG         recipe (default: configs/lm1b_l4.yaml)
#   DATA_PATH      training data: prepared shards, a folder of .txt, or .jsonl[.gz]  (-> data.path)
#                  or a bucket URL of prepared MDS shards (s3://bucket/owt, gs://...): streamed into a node-local
#                  cache; pass data.stream_cache=/local/disk data.cache_limit=200gb data.shuffle_window=64 as
#                  overrides, S3_ENDPOINT_URL and AWS_* pass through to the ranks (README: streaming from a bucket)
#   RUN_DIR        log directory with metrics.jsonl (-> log.dir; default from the config: runs/lm1b_l4)
#   CKPT_DIR       checkpoint directory on a shared filesystem (-> checkpoint.dir; default $RUN_DIR/checkpoints)
#   INIT_FROM      start from another run's weights, e.g. the L'=1024 pretrain (-> checkpoint.init_from);
#                  ignored once CKPT_DIR holds this run's own checkpoint, so requeues resume
#   MICRO_BATCH    sequences per GPU per micro-step (default 16: 16 x 32 GPUs = global batch 512)
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
CONFIG=${CONFIG:-configs/lm1b_l4.yaml}
REQUIRE_GPUS=1
RECIPE=("train.micro_batch_size=${MICRO_BATCH:-16}")

# ---- the shared launch (slurm/launch.sh). sbatch runs a copy of this file, so it is found from the submit dir ----
[ -n "${SLURM_JOB_ID:-}" ] || { echo "error: not inside a Slurm job: submit with sbatch $0" >&2; exit 2; }
launch_sh=${BD3_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/launch.sh
[ -f "$launch_sh" ] || { echo "error: $launch_sh not found: sbatch from the repository root or set BD3_ROOT" >&2; exit 2; }
source "$launch_sh"
