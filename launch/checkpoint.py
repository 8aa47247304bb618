"""Checkpoints: written by rank 0 atomically, read by rank 0 and broadcast to every rank.

A checkpoint holds the model, the optimiser (momentum buffers), the K-FAC state (factors, inverses
and the interval scheduler, as ``KFAC.state_dict()`` returns them), the epoch, the global step, the
number of batches already done in that epoch, and every rank's RNG states (torch, CUDA, numpy, python)
gathered to rank 0, so that a resumed run with the same world size draws the same random numbers as
an uninterrupted one.
"""
from __future__ import annotations

import io
import os
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

FORMAT = 1


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):
            pass


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_checkpoint(hvd, path: str, *, model, optimizer, kfac, epoch: int, step: int,
                    batch_in_epoch: int, config: Dict[str, Any], keep_copy: Optional[str] = None,
                    extra: Optional[Dict[str, Any]] = None) -> None:
    """Collective: every rank contributes its RNG state; rank 0 writes ``path``."""
    states = hvd.allgather_object(rng_state())
    if hvd.rank() != 0:
        return
    ckpt = {
        "format": FORMAT,
        "epoch": epoch,
        "step": step,
        "batch_in_epoch": batch_in_epoch,
        "world_size": hvd.size(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "kfac": kfac.state_dict() if kfac is not None else None,
        "rng": states,
        "config": config,
        "extra": extra or {},
    }
    atomic_save(ckpt, path)
    if keep_copy:
        atomic_save(ckpt, keep_copy)


def load_checkpoint(hvd, path: str) -> Dict[str, Any]:
    """Collective: rank 0 reads ``path`` and broadcasts its content to every rank.

    Rank 0's errors (missing or unreadable file) are broadcast too, so every rank raises together.
    """
    payload, error = None, None
    if hvd.rank() == 0:
        try:
            with open(path, "rb") as fh:
                payload = fh.read()
        except OSError as exc:
            error = f"cannot read checkpoint {path}: {exc.strerror}"
    error = hvd.broadcast_object(error, root_rank=0, name="ckpt.error")
    if error:
        raise RuntimeError(error)
    if hvd.size() > 1:
        payload = broadcast_bytes(hvd, payload)
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


def broadcast_bytes(hvd, payload: Optional[bytes], chunk: int = 1 << 27) -> bytes:
    """Rank 0's ``payload`` on every rank, sent in chunks of ``chunk`` bytes.

    A ResNet-50 K-FAC checkpoint is about 2 GB (factors, previous factors and inverses of 107
    layers); single messages that large overflow MPI's int32 counts, so it travels in pieces.
    """
    root = hvd.rank() == 0
    n = hvd.broadcast_object(len(payload) if root else None, root_rank=0, name="ckpt.size")
    buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if root
           else torch.empty(n, dtype=torch.uint8))
    for i, start in enumerate(range(0, n, chunk)):
        part = buf[start:start + chunk]
        received = hvd.broadcast(part, root_rank=0, name=f"ckpt.chunk.{i}")
        if not root:
            part.copy_(received)
    return payload if root else buf.numpy().tobytes()


def restore(ckpt: Dict[str, Any], hvd, *, model, optimizer, kfac, seed: int) -> None:
    """Load model/optimiser/K-FAC state and this rank's RNG state from a broadcast checkpoint."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if kfac is not None:
        if ckpt.get("kfac") is None:
            raise RuntimeError("the checkpoint was written by an SGD run; it has no K-FAC state")
        kfac.load_state_dict(ckpt["kfac"])
    states = ckpt.get("rng") or []
    if ckpt.get("world_size") == hvd.size() and len(states) == hvd.size():
        set_rng_state(states[hvd.rank()])
    else:
        # Another world size: fresh, distinct streams per rank, derived from the step.
        s = seed + 7919 * hvd.rank() + 104729 * int(ckpt.get("step", 0))
        torch.manual_seed(s)
        np.random.seed(s % 2 ** 32)
        random.seed(s)


def resolve_resume(resume: Optional[str], ckpt_dir: str) -> Optional[str]:
    """'auto' -> <dir>/last.pt when it exists (else None); a path -> itself."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(ckpt_dir, "last.pt")
        return path if os.path.isfile(path) else None
    return resume
