"""The one switch between GPU (CUDA + NCCL) and CPU (gloo) execution.

Every device decision in the project goes through this module: :func:`select_runtime` for distributed jobs,
:func:`local_device` for single-process tools; other modules do not call ``torch.cuda`` (the megatron-core CPU shim
aside, which replaces it). On a machine without CUDA the shim is installed here, once.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    """Where tensors live and which collective backend connects the ranks."""

    device: torch.device
    backend: str  # "nccl" or "gloo"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self, dtype: torch.dtype | None):
        """Mixed-precision context for forward passes (no-op for fp32)."""
        if dtype is None or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.is_cuda else 0

    def default_dtype_name(self) -> str:
        return "bf16" if self.is_cuda else "fp32"

    def compute_dtype(self, precision: str) -> torch.dtype:
        """The forward's autocast dtype for ``train.precision`` (auto | bf16 | fp32): auto is bf16 on CUDA, fp32 on
        CPU (CPU bf16 matmuls are slower than fp32 on the machines we test on)."""
        if precision == "auto":
            precision = self.default_dtype_name()
        return torch.bfloat16 if precision == "bf16" else torch.float32


_RUNTIME: Runtime | None = None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def select_runtime(requested: str = "auto", local_rank: int | None = None) -> Runtime:
    """Pick device + backend. ``requested`` is ``auto`` | ``cuda`` | ``cpu``.

    ``auto`` uses CUDA when present. Asking for ``cuda`` on a machine without it is an error (ValueError, which the
    launcher reports as one ``error:`` line before any work), not a silent fallback.
    """
    global _RUNTIME
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"parallel.device must be one of auto|cuda|cpu, got {requested!r}")
    if requested == "cuda" and not cuda_available():
        raise ValueError("parallel.device=cuda but no CUDA device is visible; use parallel.device=cpu or auto")
    use_cuda = requested == "cuda" or (requested == "auto" and cuda_available())
    if use_cuda:
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        runtime = Runtime(torch.device("cuda", local_rank), "nccl")
    else:
        # DeepSpeed must not mistake a CUDA-built torch without a GPU for a GPU machine.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from bd3_megatron.parallel import cpu_shim

        cpu_shim.install()
        runtime = Runtime(torch.device("cpu"), "gloo")
    _RUNTIME = runtime
    return runtime


def current_runtime() -> Runtime:
    """The runtime chosen by :func:`select_runtime` (CPU if none was chosen yet)."""
    return _RUNTIME if _RUNTIME is not None else select_runtime("auto")


def device_redirect():
    """Context for megatron-core code paths that allocate on a literal ``device="cuda"`` (the pipeline schedules).

    On CUDA it does nothing; on CPU it maps those allocations to the CPU.
    """
    runtime = current_runtime()
    if runtime.is_cuda:
        return contextlib.nullcontext()
    from bd3_megatron.parallel import cpu_shim

    return cpu_shim.CudaAllocationsToCpu()


def local_device(requested: str = "auto") -> torch.device:
    """The device for a single-process tool (sampler, scorer, benchmarks): ``auto`` | ``cpu`` | ``cuda`` |
    ``cuda:N``. No process group and no megatron shim: the standalone BD3Net needs neither."""
    if requested == "auto":
        return torch.device("cuda") if cuda_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    if device.type == "cuda" and not cuda_available():
        raise ValueError(f"device {requested} was asked for but no CUDA device is visible; use --device cpu")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (timings); nothing to do on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    import platform

    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def accelerator_rng_state() -> torch.Tensor | None:
    """The CUDA generator state of this process (None without CUDA), for checkpoints."""
    return torch.cuda.get_rng_state() if cuda_available() else None


def set_accelerator_rng_state(state: torch.Tensor | None) -> None:
    if state is not None and cuda_available():
        torch.cuda.set_rng_state(state)
