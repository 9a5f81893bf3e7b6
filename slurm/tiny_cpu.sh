#!/usr/bin/env bash
#SBATCH --job-name=bd3-tiny-cpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# The embedded default (configs/tiny_cpu.yaml: tiny BD3-LM on the bundled SOTU corpus) on CPU with gloo, 2 nodes x 1
# task: the same structure as the GPU scripts, small enough for CI (scripts/ci_slurm.sh runs it on a local cluster).
# Submit from the repository root:
#     sbatch slurm/tiny_cpu.sh [section.key=value ...]      # extra arguments are config overrides
#
# Launch model: one srun task per process, each runs `python -m launcher.train` with parallel.device=cpu; ranks come
# from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, the rendezvous is MASTER_ADDR = first host of
# `scontrol show hostnames $SLURM_JOB_NODELIST` and MASTER_PORT.
#
# Preemption and time limit: 60 s before the limit Slurm sends SIGUSR1 to this script; it forwards the signal to the
# ranks, which finish the current step, save a checkpoint and exit 0; the script then runs `scontrol requeue` and the
# requeued job resumes from the newest complete checkpoint (checkpoint.resume=auto). SIGTERM (scancel, preemption)
# is forwarded the same way. The log file is appended to across requeues.
#
# Site settings: sbatch's own variables override the directives above without editing this file, e.g.
#     SBATCH_PARTITION=cpu SBATCH_ACCOUNT=myproj sbatch slurm/tiny_cpu.sh
# (any directive can also be given on the sbatch command line: sbatch --nodes=1 --ntasks-per-node=2 slurm/tiny_cpu.sh).
# Environment variables read by this script (all optional):
#   BD3_ROOT       repository checkout to run from (default: the directory sbatch was called from)
#   VENV, PYTHON   Python environment (default: $BD3_ROOT/.venv, $VENV/bin/python; see scripts/setup_env.sh)
#   CONFIG         recipe (default: configs/tiny_cpu.yaml)
#   DATA_PATH      training data (-> data.path; default from the config: the embedded SOTU corpus)
#   RUN_DIR        log directory with metrics.jsonl (-> log.dir; default from the config: runs/tiny_cpu)
#   CKPT_DIR       checkpoint directory on a shared filesystem (-> checkpoint.dir; default $RUN_DIR/checkpoints)
#   INIT_FROM      start from another run's weights, e.g. the L'=1024 pretrain (-> checkpoint.init_from);
#                  ignored once CKPT_DIR holds this run's own checkpoint, so requeues resume
#   MICRO_BATCH    sequences per rank per micro-step (default 4: 4 x 2 ranks = the config's global batch 8)
#   WANDB_PROJECT  turn on Weights & Biases logging into this project (-> log.wandb=true, log.wandb_project);
#                  WANDB_ENTITY, WANDB_API_KEY, WANDB_MODE (=offline on nodes without internet) pass through
#   CONTAINER      container image for srun's pyxis plugin (--container-image); CONTAINER_MOUNTS (--container-mounts)
#   SRUN_ARGS      extra srun arguments (e.g. "--cpu-bind=cores")
#   MASTER_PORT    rendezvous port (default 20000 + job id mod 10000)
#   DRY_RUN=1      check the allocation and print the srun command without running it
#   OMP_NUM_THREADS  CPU threads per rank (default: --cpus-per-task)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING  (default 1; only matters on GPUs)
set -euo pipefail
CONFIG=${CONFIG:-configs/tiny_cpu.yaml}
REQUIRE_GPUS=0
RECIPE=(parallel.device=cpu "train.micro_batch_size=${MICRO_BATCH:-4}")

# ---- the shared launch (slurm/launch.sh). sbatch runs a copy of this file, so it is found from the submit dir ----
[ -n "${SLURM_JOB_ID:-}" ] || { echo "error: not inside a Slurm job: submit with sbatch $0" >&2; exit 2; }
launch_sh=${BD3_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/launch.sh
[ -f "$launch_sh" ] || { echo "error: $launch_sh not found: sbatch from the repository root or set BD3_ROOT" >&2; exit 2; }
source "$launch_sh"
