"""Process-group setup: torch.distributed + megatron-core parallel_state, from torchrun/Slurm/plain environments.

Ranks come from the environment (torchrun: RANK/WORLD_SIZE/LOCAL_RANK; Slurm srun: SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID), so ``python -m launcher.train`` is the same command under every launcher. A plain single process
gets an in-memory store and needs no port.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from bd3_megatron.parallel.device import Runtime, select_runtime


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # single | torchrun | slurm


def launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Read rank information from torchrun or Slurm variables (torchrun's win when both are set)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return LaunchEnv(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")), "slurm"
        )
    return LaunchEnv(0, 1, 0, "single")


@dataclass(frozen=True)
class ParallelContext:
    runtime: Runtime
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints and writes metrics: data-parallel rank 0, TP rank 0, on the last stage."""
        return self.dp_rank == 0 and self.tp_rank == 0 and self.is_last_stage


def init_distributed(runtime: Runtime, env: LaunchEnv, timeout_s: float = 600.0) -> None:
    """Initialise the default process group (idempotent)."""
    if dist.is_initialized():
        return
    timeout = timedelta(seconds=timeout_s)
    # DeepSpeed reads these; Slurm and plain launches do not set them
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    if env.world_size == 1:
        dist.init_process_group(runtime.backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"multi-process launch without {', '.join(missing)}: start with torchrun, or under Slurm "
            f"export MASTER_ADDR/MASTER_PORT (slurm/*.sh do this)"
        )
    kwargs = {"device_id": runtime.device} if runtime.is_cuda else {}
    dist.init_process_group(
        runtime.backend, init_method="env://", rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs
    )


def initialize(tp: int, pp: int, seed: int, device: str = "auto", env: LaunchEnv | None = None) -> ParallelContext:
    """Select the device, start torch.distributed and megatron-core's TP/PP/DP groups, seed megatron's RNGs."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    env = env or launch_env()
    runtime = select_runtime(device, env.local_rank)
    if env.world_size % (tp * pp):
        raise ValueError(f"world size {env.world_size} is not divisible by tp*pp = {tp * pp}")
    init_distributed(runtime, env)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    # Dropout streams: shared by the tensor-parallel ranks of one replica (they must drop the same activations),
    # distinct across data-parallel replicas. Noise and initial weights never use these streams (they are keyed).
    torch.manual_seed(seed + 7919 * parallel_state.get_data_parallel_rank())
    model_parallel_cuda_manual_seed(seed)
    return ParallelContext(
        runtime=runtime,
        rank=env.rank,
        world_size=env.world_size,
        local_rank=env.local_rank,
        tp=tp,
        pp=pp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def shutdown() -> None:
    """Tear down megatron groups and the default group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
