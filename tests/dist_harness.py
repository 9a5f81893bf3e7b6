"""Run a function on N ranks forked from a clean, pre-imported server process (gloo on 127.0.0.1).

megatron-core + deepspeed take ~12 s to import; a ``forkserver`` that pre-imports them forks each rank in well under
a second. Every test gets a fresh port and fresh process groups; a rank that hangs is killed at the timeout, so one
broken collective fails one test instead of hanging CI.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback

import torch

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(
            [
                "torch",
                "megatron.core",
                "deepspeed",
                "bd3_megatron.parallel.state",
                "bd3_megatron.training.trainer",
                "tests.dist_workers",
            ]
        )
    return _CTX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, args, queue):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
    )
    try:
        # tensors go through the queue as bytes: torch's fd-sharing pickles would need this process alive
        buf = io.BytesIO()
        torch.save(fn(rank, world, *args), buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything, including SystemExit, to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout: float = 180.0) -> list:
    """fn(rank, world, *args) on ``world`` processes; returns the results ordered by rank."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(value), weights_only=True)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    except Exception as exc:  # queue.Empty on timeout
        errors.append(f"timed out after {timeout}s waiting for ranks ({type(exc).__name__}); got {sorted(results)}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
