"""Atomic file writes: readers see the old file or the new one, never a partial one.

Every file the project publishes (checkpoint metadata, manifests, caches, indexes, sampler folders' configs) goes
through :func:`atomic_write`: a temporary file in the same folder, then ``os.replace``. ``durable=True`` also
fsyncs the file and its folder, so the rename survives a power loss (checkpoints need it; caches do not).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | Path) -> None:
    """Make the folder's entries (created/renamed files) durable: a rename is only on disk once its folder is."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], durable: bool = False) -> Path:
    """Publish ``path`` with the bytes ``write(fh)`` writes. The temporary file is removed on any failure (the old
    file, if any, is untouched). Raises what ``write`` or the file system raises (OSError for a full disk)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates owner-only files; publish with the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = False) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), durable=durable)


def atomic_write_text(path: str | Path, text: str, durable: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode(), durable=durable)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
