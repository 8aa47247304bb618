"""Checkpoints: written by rank 0 atomically and verified on load, read by rank 0 and broadcast.

A checkpoint holds the model, the optimiser (momentum buffers), the K-FAC state (factors, inverses
and the interval scheduler, as ``KFAC.state_dict()`` returns them), the epoch, the global step, the
number of batches already done in that epoch, and every rank's RNG states (torch, CUDA, numpy, python)
and model buffers (BatchNorm running statistics) gathered to rank 0, so that a resumed run with the
same world size continues exactly as an uninterrupted one.

Layout of ``checkpoint.dir``:

- ``step_<7-digit step>.pt``: one file per checkpoint, written to a temporary file in the same folder,
  fsync'ed and renamed (a crash leaves the old files and at worst a stray ``.tmp-*``);
  the newest ``checkpoint.keep_last`` are kept (all with ``checkpoint.keep_all``);
- ``checkpoints.json``: the manifest, newest first: file, step, epoch, size and sha256 of each;
- ``last.pt``: a hard link to the newest (a copy where the file system has no hard links).

Loading never runs code: every file is checked against the manifest beside it (size, then sha256)
before it is opened, and opened with ``torch.load(weights_only=True)``, which builds tensors and plain
containers only (RNG states are stored as tensors and numbers for that). A file no manifest lists is
refused unless ``checkpoint.trust_unlisted`` vouches for it; a checkpoint of the first format (numpy
objects pickled in it) is refused with the command that converts it (``python -m launch.checkpoint
convert FILE``, run by a user who trusts the file).

On resume (``auto``), the newest checkpoint that passes these checks is used; a refused one is
reported and the one before it is tried. Checkpoints of steps at or after the first step a resumed
run saves (the abandoned continuation of an earlier run, or a file that failed to read) are moved to
``superseded/<time>/`` with their manifest entries; only a file whose size contradicts the manifest is
deleted.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import pickle
import re
import time
from collections.abc import Callable
from typing import Any

import torch

from launch.errors import CheckpointError, StorageError, storage_problem
from launch.store.atomic import atomic_save, atomic_write, link_last
from launch.store.rng import seed_every_rng
from launch.store.snapshot import StatePiece, checkpoint_contents, restore_checkpoint

FORMAT = 2  # 2: RNG states as tensors and numbers (loadable with weights_only=True)
MANIFEST = "checkpoints.json"
SUPERSEDED = "superseded"
LAST = "last.pt"
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
REQUIRED = ("format", "epoch", "step", "batch_in_epoch", "model", "optimizer", "kfac", "rng")

logger = logging.getLogger("launch.checkpoint")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def read_manifest_file(folder: str) -> dict[str, Any]:
    """``checkpoints.json`` of ``folder`` as a dict ({} when it is missing or unreadable)."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def read_manifest(folder: str) -> list[dict[str, Any]]:
    """The manifest's entries, newest first; [] when it is missing or unreadable."""
    entries = read_manifest_file(folder).get("checkpoints", [])
    return (
        [e for e in entries if isinstance(e, dict) and "file" in e and "step" in e]
        if isinstance(entries, list)
        else []
    )


def write_manifest(folder: str, entries: list[dict[str, Any]], last: str | None) -> None:
    """Replace ``checkpoints.json`` of ``folder`` atomically: ``entries`` newest first, ``last`` the newest's file."""
    text = json.dumps({"format": FORMAT, "last": last, "checkpoints": entries}, indent=1).encode()
    atomic_write(os.path.join(folder, MANIFEST), lambda fh: fh.write(text))


def _step_files(folder: str) -> dict[str, int]:
    out = {}
    for path in glob.glob(os.path.join(folder, "step_*.pt")):
        m = STEP_FILE.match(os.path.basename(path))
        if m:
            out[os.path.basename(path)] = int(m.group(1))
    return out


def _set_aside(folder: str, files: dict[str, int], known: list[dict[str, Any]], step: int) -> None:
    """Move checkpoints of steps >= ``step`` to ``superseded/<time>/`` (with their manifest entries, so
    that each stays verifiable); a file whose size contradicts its manifest entry is deleted instead."""
    entries = {e["file"]: e for e in known}
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = os.path.join(folder, SUPERSEDED, stamp)
    moved, deleted = [], []
    for name in sorted(files, key=lambda name: files[name]):
        path, entry = os.path.join(folder, name), entries.get(name)
        if entry is not None and "bytes" in entry and os.path.getsize(path) != entry["bytes"]:
            os.unlink(path)
            deleted.append(name)
            continue
        os.makedirs(target, exist_ok=True)
        os.replace(path, os.path.join(target, name))
        moved.append(entry or {"file": name, "step": files[name]})
    if moved:
        write_manifest(target, sorted(moved, key=lambda e: -e["step"]), None)
        logger.warning(
            "checkpoints of steps %s (at or after step %d, which this run now saves) moved to %s",
            ", ".join(str(e["step"]) for e in moved),
            step,
            target,
        )
    if deleted:
        logger.warning(
            "checkpoint files deleted as their size differs from the manifest's: %s", ", ".join(deleted)
        )


def write_checkpoint(folder: str, ckpt: dict[str, Any], *, keep_last: int, keep_all: bool) -> str:
    """Write ``ckpt`` as ``step_<7-digit step>.pt``, update the manifest and ``last.pt``, prune old files.

    Only files of earlier steps are pruned (the oldest beyond ``keep_last``; none with ``keep_all``);
    files of this step or later are set aside (:func:`_set_aside`), never deleted unseen.
    """
    step = int(ckpt["step"])
    name = f"step_{step:07d}.pt"
    # Rank 0 of the one job holding the run folder's lock is the only writer, one checkpoint at a
    # time: a temporary file here is left from a crash.
    for stale in glob.glob(os.path.join(folder, ".tmp-*")):
        try:
            os.unlink(stale)
        except OSError:
            pass
    os.makedirs(folder, exist_ok=True)
    known = read_manifest(folder)
    on_disk = _step_files(folder)
    later = {f: s for f, s in on_disk.items() if s >= step}
    if later:
        _set_aside(folder, later, known, step)
        on_disk = {f: s for f, s in on_disk.items() if s < step}
    path = os.path.join(folder, name)
    info = atomic_save(ckpt, path)
    entry = {
        "file": name,
        "step": step,
        "epoch": ckpt["epoch"],
        "batch_in_epoch": ckpt["batch_in_epoch"],
        **info,
        "time": time.time(),
    }
    # Older checkpoints, newest first: the manifest's, then files it does not know (a crash between
    # writing a file and the manifest: listed without a checksum, so refused unless trusted).
    listed = {e["file"] for e in known}
    older = [e for e in known if e["file"] in on_disk]
    older += [{"file": f, "step": s} for f, s in on_disk.items() if f not in listed]
    older.sort(key=lambda e: -e["step"])
    kept = [entry] + (older if keep_all else older[: max(keep_last - 1, 0)])
    try:
        write_manifest(folder, kept, name)
        link_last(path, os.path.join(folder, LAST))
    except BaseException:
        os.unlink(path)  # never listed: the manifest and last.pt still name the previous one
        raise
    keep_files = {e["file"] for e in kept}
    for f in on_disk:
        if f not in keep_files:
            try:
                os.unlink(os.path.join(folder, f))
            except OSError:
                pass
    return path


def save_checkpoint(
    hvd: Any,
    folder: str,
    pieces: list[StatePiece],
    *,
    step: int,
    config: dict[str, Any],
    keep_last: int = 2,
    keep_all: bool = False,
) -> str | None:
    """Collective: every rank contributes its own pieces (RNG streams, buffers); rank 0 writes the run's
    state (``pieces``, :mod:`launch.store.snapshot`) with the config it was run with. Returns the path.

    Rank 0's outcome is broadcast, so a write that fails (:class:`StorageError`) stops every rank alike.
    """
    contents = checkpoint_contents(pieces, hvd)
    path, problem = None, None
    if contents is not None:
        ckpt = {"format": FORMAT, "world_size": hvd.size(), **contents, "config": config}
        try:
            path = write_checkpoint(folder, ckpt, keep_last=keep_last, keep_all=keep_all)
        except OSError as exc:
            problem = storage_problem(exc, f"cannot write the checkpoint of step {step} in {folder}")
            previous = read_manifest(folder)
            problem += (
                f"; the previous checkpoint {previous[0]['file']} (step {previous[0]['step']}) is intact"
                if previous
                else "; no earlier checkpoint exists"
            )
    problem = hvd.broadcast_object(problem, root_rank=0, name="ckpt.written")
    if problem:
        raise StorageError(problem)
    return path


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def resume_candidates(resume: str | None, ckpt_dir: str) -> list[str]:
    """Files to try in order: an explicit file alone; for 'auto', every checkpoint in ``ckpt_dir``
    newest first (``last.pt`` last, when it is not one of them: a folder of an older layout)."""
    if not resume:
        return []
    if resume != "auto":
        return [resume]
    steps = dict(_step_files(ckpt_dir))
    for e in read_manifest(ckpt_dir):
        steps.setdefault(e["file"], e["step"])
    paths = [
        os.path.join(ckpt_dir, f)
        for f, _ in sorted(steps.items(), key=lambda kv: -kv[1])
        if os.path.isfile(os.path.join(ckpt_dir, f))
    ]
    last = os.path.join(ckpt_dir, LAST)
    if os.path.isfile(last) and not any(_same(last, p) for p in paths):
        paths.append(last)
    return paths


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _manifest_entry(path: str) -> dict[str, Any] | None:
    """The entry of ``checkpoints.json`` beside ``path`` that describes it (``last.pt``: the manifest's
    ``last``), or None."""
    folder = os.path.dirname(os.path.abspath(path))
    manifest = read_manifest_file(folder)
    name = os.path.basename(path)
    if name == LAST and manifest.get("last"):
        name = manifest["last"]
    for e in read_manifest(folder):
        if name == e["file"] or _same(path, os.path.join(folder, e["file"])):
            return e
    return None


def verify(path: str, payload: bytes) -> str | None:
    """Why ``payload`` (the bytes of ``path``) differs from its manifest entry (size, sha256), or None."""
    entry = _manifest_entry(path)
    if entry is not None and "sha256" in entry:
        if len(payload) != entry.get("bytes"):
            return f"truncated or extended: {len(payload)} bytes, the manifest says {entry.get('bytes')}"
        if hashlib.sha256(payload).hexdigest() != entry["sha256"]:
            return "corrupt: sha256 differs from the manifest's"
    return None


def _load_bytes(payload: bytes) -> dict[str, Any]:
    """Tensors and plain containers only: a pickle that would build any other object (and so could run
    code) raises instead."""
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def _unlisted(path: str) -> str:
    manifest = os.path.join(os.path.dirname(os.path.abspath(path)), MANIFEST)
    return (
        f"does not load: {manifest} does not list it (no size and sha256 to verify it against), so it is "
        f"not a checkpoint of this launcher until someone vouches for it: set checkpoint.trust_unlisted=true, "
        f"or run python -m launch.checkpoint convert {path}"
    )


def _refused_pickle(path: str, exc: Exception) -> str:
    found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
    name = found.group(1) if found else ""
    if name.startswith("numpy"):
        return (
            f"written in the first checkpoint format (numpy objects pickled in it), which is not loaded "
            f"unverified; if you trust the file, convert it once: python -m launch.checkpoint convert {path}"
        )
    what = f" ({name})" if name else ""
    return (
        f"refused: it would build objects{what} that no checkpoint of this launcher holds; it is not loaded"
    )


def _read_verified(
    path: str, trust_unlisted: bool = False
) -> tuple[bytes | None, dict[str, Any] | None, str | None]:
    """(bytes, state, None), or (None, None, why not): verified against the manifest before it is opened."""
    entry = _manifest_entry(path)
    if (entry is None or "sha256" not in entry) and not trust_unlisted:
        return None, None, _unlisted(path)
    try:
        if entry is not None and "bytes" in entry and os.path.getsize(path) != entry["bytes"]:
            return (
                None,
                None,
                (f"truncated or extended: {os.path.getsize(path)} bytes, the manifest says {entry['bytes']}"),
            )
        with open(path, "rb") as fh:
            payload = fh.read()
    except OSError as exc:
        return None, None, f"cannot read: {exc.strerror or exc}"
    problem = verify(path, payload)
    if problem:
        return None, None, problem
    try:
        state = _load_bytes(payload)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            return None, None, _refused_pickle(path, exc)
        return None, None, f"does not load ({(str(exc).splitlines() or ['?'])[0][:160]})"
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, None, f"does not load ({text[:160]})"
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
        return None, None, f"not a checkpoint of this launcher (lacks {', '.join(missing[:4])})"
    return payload, state, None


def load_checkpoint(
    hvd: Any, candidates: list[str], trust_unlisted: bool = False, beat: Callable[[str], None] | None = None
) -> tuple[str, dict[str, Any]]:
    """Collective: rank 0 picks the first usable file of ``candidates`` and broadcasts its content.

    Every rejected file is reported (a warning on rank 0). Rank 0's verdict is broadcast, so when no
    file is usable every rank raises :class:`CheckpointError` with the same message. ``beat`` (the
    watchdog's) is called before each file is read and each piece is broadcast.
    """
    beat = beat or (lambda what: None)
    chosen, payload, state, error = None, None, None, None
    if hvd.rank() == 0:
        problems = []
        for i, path in enumerate(candidates):
            beat(f"reading the checkpoint {path}")
            payload, state, problem = _read_verified(path, trust_unlisted)
            if problem is None:
                chosen = path
                break
            problems.append(f"{path}: {problem}")
            if i + 1 < len(candidates):
                logger.warning("checkpoint %s is unusable (%s); trying %s", path, problem, candidates[i + 1])
        if chosen is None:
            error = "no usable checkpoint: " + "; ".join(problems) if problems else "no checkpoint found"
    chosen, error = hvd.broadcast_object((chosen, error), root_rank=0, name="ckpt.choice")
    if error:
        raise CheckpointError(error)
    if hvd.size() > 1:
        payload = broadcast_bytes(hvd, payload, beat=beat)
        if hvd.rank() != 0:
            state = _load_bytes(payload)
    assert state is not None  # read on rank 0, received by the others; else CheckpointError above
    return chosen, state


def broadcast_bytes(
    hvd: Any, payload: bytes | None, chunk: int = 1 << 27, beat: Callable[[str], None] | None = None
) -> bytes:
    """Rank 0's ``payload`` on every rank, sent in chunks of ``chunk`` bytes.

    A ResNet-50 K-FAC checkpoint is about 2 GB (factors, previous factors and inverses of 107
    layers); single messages that large overflow MPI's int32 counts, so it travels in pieces.
    """
    root = hvd.rank() == 0
    mine = payload if payload is not None else b""  # only rank 0's is read
    n = hvd.broadcast_object(len(mine) if root else None, root_rank=0, name="ckpt.size")
    buf = torch.frombuffer(bytearray(mine), dtype=torch.uint8) if root else torch.empty(n, dtype=torch.uint8)
    for i, start in enumerate(range(0, n, chunk)):
        if beat is not None:
            beat(f"receiving the checkpoint (byte {start} of {n})")
        part = buf[start : start + chunk]
        received = hvd.broadcast(part, root_rank=0, name=f"ckpt.chunk.{i}")
        if not root:
            part.copy_(received)
    return mine if root else buf.numpy().tobytes()


def restore(ckpt: dict[str, Any], hvd: Any, pieces: list[StatePiece], *, seed: int) -> None:
    """Put back the run's state (``pieces``) from a checkpoint, this rank's own RNG streams and buffers
    when it was written by as many ranks.

    Raises ValueError (the same on every rank) when the checkpoint does not fit this run.
    """
    left = restore_checkpoint(pieces, ckpt, hvd.rank(), hvd.size())
    if "rng" in left:
        # Another world size: fresh, distinct streams per rank, derived from the step.
        seed_every_rng(seed + 7919 * hvd.rank() + 104729 * int(ckpt.get("step", 0)))
