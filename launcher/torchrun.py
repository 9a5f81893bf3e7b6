"""``python -m launcher.torchrun [torchrun options] -m launcher.train [train args]``: torchrun with the preemption
contract of srun (a stop signal ends the job with a checkpoint and exit code 0, so it can be requeued).

Why a wrapper: torchrun (torch 2.14's elastic agent) turns a handled SIGTERM into a SignalException, forwards the
signal to the workers, SIGKILLs any still running after ``--shutdown-timeout`` (30 s: shorter than a large save) and
then exits 1 whatever the workers returned; SIGUSR1 is not handled at all unless ``--signals-to-handle`` names it,
and then ends the same way. So this wrapper keeps SIGTERM and SIGUSR1 away from torchrun (it starts torchrun with
both ignored and without them in ``--signals-to-handle``) and sends SIGUSR1 to the workers itself: they checkpoint
at the next step boundary and exit 0, torchrun sees a successful run and exits 0, and so does this wrapper.

The wrapper repeats SIGUSR1 to the workers every few seconds until they exit: a worker that is still importing has
not installed its handler yet (and inherits torchrun's "ignore"), so a single signal could be lost. Under Slurm,
where every process of the step receives SIGTERM, the workers also get it directly; either way is the same request.
Other signals (SIGINT, SIGHUP, SIGQUIT) keep torchrun's behaviour: stop the workers without a checkpoint.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RESEND_S = 2.0


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith(("--signals-to-handle", "--signals_to_handle")) for a in argv):
        print("error: launcher.torchrun sets --signals-to-handle itself (SIGTERM and SIGUSR1 are forwarded as a "
              "checkpoint-and-stop request); drop the option", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--signals-to-handle", "SIGINT,SIGHUP,SIGQUIT", *argv]
    requested: list[int] = []
    signal.signal(signal.SIGTERM, lambda s, f: requested.append(s))
    signal.signal(signal.SIGUSR1, lambda s, f: requested.append(s))

    def ignore_stop_signals() -> None:  # in the torchrun child before exec: an ignored signal stays ignored
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    agent = subprocess.Popen(cmd, preexec_fn=ignore_stop_signals)
    announced, last_sent = False, 0.0
    while True:
        try:
            rc = agent.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        if requested and time.monotonic() - last_sent >= RESEND_S:
            if not announced:
                print(f"[launcher.torchrun] received {signal.Signals(requested[0]).name}: asking the workers to save "
                      f"a checkpoint and stop", flush=True)
                announced = True
            for pid in _workers(agent.pid):
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
            last_sent = time.monotonic()
    return rc


if __name__ == "__main__":
    sys.exit(main())
