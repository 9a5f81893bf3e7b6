"""Make megatron-core 0.16.1 run on CPU (gloo), for tests and the CPU demo.

megatron-core hard-codes CUDA in three ways: ``torch.cuda.current_device()`` as an allocation device, a CUDA RNG
state tracker for tensor-parallel dropout, and literal ``device="cuda"`` in the pipeline schedules. This module
redirects each to the CPU. It is installed only by :func:`bd3_megatron.parallel.device.select_runtime` when the run
is on CPU; GPU runs never touch it.
"""

from __future__ import annotations

import torch

_INSTALLED = False


def _cpu_rng_state_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's tracker with named CPU generator states instead of CUDA ones."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

    return CpuRNGStatesTracker


def install() -> None:
    """Idempotently patch megatron-core for CPU execution. Never call on a CUDA machine."""
    global _INSTALLED
    if _INSTALLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_shim.install() called on a machine with CUDA; use the GPU path instead")
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: None  # CPU seeding is done with torch.manual_seed
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mrandom._CUDA_RNG_STATE_TRACKER = _cpu_rng_state_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _INSTALLED = True


class CudaAllocationsToCpu(torch.overrides.TorchFunctionMode):
    """Rewrite ``device="cuda"`` keyword arguments of torch factory calls to the CPU while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)
