"""``python -m launcher.torchrun [torchrun options] -m launcher.train [train args]``: torchrun with the preemption
contract of srun (a stop signal ends the job with a checkpoint and exit code 0, so it can be requeued).

Why a wrapper: torchrun (torch 2.14's elastic agent) turns a handled SIGTERM into a SignalException, forwards the
signal to the workers, SIGKILLs any still running after ``--shutdown-timeout`` (30 s: shorter than a large save) and
then exits 1 whatever the workers returned; SIGUSR1 is not handled at all unless ``--signals-to-handle`` names it,
and then ends the same way. So this wrapper keeps SIGTERM and SIGUSR1 away from torchrun (it starts torchrun with
both ignored and without them in ``--signals-to-handle``) and sends SIGUSR1 to the workers itself: they checkpoint
at the next step boundary and exit 0, torchrun sees a successful run and exits 0, and so does this wrapper.

Each worker gets SIGUSR1 exactly once, as soon as it has a handler for it (its SigCgt mask in /proc says so): a
worker still importing would otherwise lose the signal (or die of it), and a second signal could reach a worker
in interpreter shutdown, after Python restored the default action, and kill it. Under Slurm,
where every process of the step receives SIGTERM, the workers also get it directly; either way is the same request.
Other signals (SIGINT, SIGHUP, SIGQUIT) keep torchrun's behaviour: stop the workers without a checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _workers(agent_pid: int) -> list[int]:
    """The training processes of this node: torchrun's children that carry a LOCAL_RANK."""
    import psutil

    out = []
    try:
        children = psutil.Process(agent_pid).children()
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            if "LOCAL_RANK" in child.environ():
                out.append(child.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (Linux: the SigCgt mask of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            mask = next(int(line.split()[1], 16) for line in fh if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (sig - 1) & 1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith(("--signals-to-handle", "--signals_to_handle")) for a in argv):
        print(
            "error: launcher.torchrun sets --signals-to-handle itself (SIGTERM and SIGUSR1 are forwarded as a "
            "checkpoint-and-stop request); drop the option",
            file=sys.stderr,
        )
        return 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--signals-to-handle", "SIGINT,SIGHUP,SIGQUIT", *argv]
    requested: list[int] = []
    signal.signal(signal.SIGTERM, lambda s, f: requested.append(s))
    signal.signal(signal.SIGUSR1, lambda s, f: requested.append(s))

    def ignore_stop_signals() -> None:  # in the torchrun child before exec: an ignored signal stays ignored
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    agent = subprocess.Popen(cmd, preexec_fn=ignore_stop_signals)
    signalled: set[int] = set()
    announced = False
    while True:
        try:
            return agent.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        if not requested:
            continue
        if not announced:
            announced = True
            print(
                f"[launcher.torchrun] received {signal.Signals(requested[0]).name}: asking the workers to save a "
                f"checkpoint and stop",
                flush=True,
            )
        for pid in _workers(agent.pid):
            if pid not in signalled and _catches(pid, signal.SIGUSR1):
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
                signalled.add(pid)


if __name__ == "__main__":
    sys.exit(main())
