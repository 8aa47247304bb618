"""Whole files or none: writes to a temporary file in the target's folder, fsync'ed and renamed over it."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import IO, Any, cast

import torch


class _HashingWriter:
    """A write-only file object that also computes the sha256 and size of what passes through."""

    def __init__(self, fh):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch.save reports a failed write as a RuntimeError

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def _fsync_dir(folder: str) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[Any], Any]) -> Any:
    """Call ``write(fh)`` on a temporary file in ``path``'s folder, fsync, rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide checkpoints from the group
        with os.fdopen(fd, "wb") as fh:
            result = write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    return result


def atomic_save(obj: Any, path: str) -> dict[str, Any]:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    Returns ``{"bytes": size, "sha256": hex digest}`` of the file written.
    """

    def write(fh):
        hashing = _HashingWriter(fh)
        try:
            torch.save(obj, cast(IO[bytes], hashing))  # torch.save needs only write() and flush()
        except RuntimeError:
            if hashing.error is not None:
                raise hashing.error from None  # disk full, quota: the system's reason, not torch's
            raise
        return {"bytes": hashing.size, "sha256": hashing.sha.hexdigest()}

    return atomic_write(path, write)


def link_last(target: str, last: str) -> None:
    """Point ``last`` at ``target`` atomically: a hard link renamed over it, else an atomic copy."""
    folder = os.path.dirname(os.path.abspath(last))
    tmp = os.path.join(folder, f".tmp-{os.path.basename(last)}.{os.getpid()}")
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(target, tmp)
        os.replace(tmp, last)
        _fsync_dir(folder)
    except OSError:
        if os.path.lexists(tmp):
            os.unlink(tmp)

        def copy(fh):
            with open(target, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 24)

        atomic_write(last, copy)
