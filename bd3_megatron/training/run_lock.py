"""One run per checkpoint folder: an exclusive ``flock`` on ``checkpoint.dir/.run.lock`` for the whole run.

Held by global rank 0 alone: every run has exactly one rank 0, so one lock per run is enough to keep two runs apart,
whatever their node counts, and the folder is locked once however many ranks share a host. ``flock`` is coherent
across nodes on the shared file systems checkpoints live on (NFSv4, GPFS, Lustre mounted with ``-o flock``); where
it is not supported the run stops with an error naming ``checkpoint.lock=false``.

The kernel drops a flock when its process dies, however it dies (SIGKILL, OOM, node reboot on NFSv4 after the lease),
so a lock is never left held by a dead run. The file's text names the holder (host, pid, start time) for the refusal
message; a clean exit deletes the file, so a file found without a holder is the trace of a run that crashed: it is
reported as a stale lock and taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from bd3_megatron.checkpoint.sharded import CheckpointError, check_dir_writable

LOCK_NAME = ".run.lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLockError(RuntimeError):
    """The folder is locked by another run, or cannot be locked; the message is one line naming the holder."""


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {started}"


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace")
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """``with RunLock(dir, log): ...`` or ``acquire()`` / ``release()``.

    ``acquire`` raises RunLockError when another live process holds the lock (message: its host, pid and start
    time) or the file system cannot lock; ``log`` receives one line when a stale lock file is taken over."""

    def __init__(self, directory: str | Path, log=print):
        self.path = Path(directory) / LOCK_NAME
        self.log = log
        self.fd: int | None = None

    def acquire(self) -> None:
        try:  # the one start-up check of checkpoint.dir: a file in the way, a read-only mount, no permission
            check_dir_writable(self.path.parent)
        except CheckpointError as exc:
            raise RunLockError(str(exc)) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise RunLockError(
                    f"cannot create the run lock {self.path} ({exc.strerror}); checkpoint.dir must "
                    f"be a writable directory"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd) if exc.errno in (errno.EWOULDBLOCK, errno.EACCES) else None
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    who = _describe(holder) if holder else "a process that has not written its name yet"
                    raise RunLockError(
                        f"checkpoint.dir {self.path.parent} is in use by another run ({who}); stop "
                        f"that run or give this one another checkpoint.dir"
                    ) from None
                if exc.errno in _UNSUPPORTED:
                    raise RunLockError(
                        f"the file system of checkpoint.dir {self.path.parent} does not support "
                        f"flock ({exc.strerror}); mount it with flock support (Lustre: -o flock) or "
                        f"set checkpoint.lock=false and make sure one run uses it"
                    ) from None
                raise
            # the previous holder may have deleted the file between our open and our flock (a clean exit unlinks
            # it): then we locked an orphaned inode and must retry on the current file
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_holder(fd)
        if stale:
            self.log(
                f"taking over a stale run lock of {self.path.parent} (left by {_describe(stale)}, which no longer runs)"
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """Delete the file while still holding the lock (so no run can see it free but present), then unlock."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run(directory: str | Path | None, rank: int, enabled: bool = True, log=print) -> RunLock | None:
    """Collective (every rank calls it after the process group starts): global rank 0 takes the lock, and every
    rank raises RunLockError with rank 0's message if it failed, so the whole job stops at once with one reason.
    Returns the held lock on rank 0, None elsewhere or when there is nothing to lock."""
    import torch.distributed as dist

    if directory is None or not enabled:
        return None
    lock, failure = None, None
    if rank == 0:
        lock = RunLock(directory, log)
        try:
            lock.acquire()
        except RunLockError as exc:
            lock, failure = None, str(exc)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure is not None:
        raise RunLockError(failure)
    return lock
