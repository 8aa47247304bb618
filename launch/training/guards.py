"""Fault handling of a run: exit codes, rank agreement, the watchdog, skipped steps, fault injection.

Exit codes of ``launch.train`` (docs/RELIABILITY.md):

- 0: success.
- 1: an unexpected error (a bug): Python's traceback.
- 2: bad input: configuration, data, checkpoint, or ranks that disagree on the configuration or the
  code. One line on stderr, the same on every rank.
- 3: the job cannot continue: another rank died or stopped answering (Horovod shut down), or this
  rank made no progress for ``train.watchdog_s`` seconds. Resubmitting (``checkpoint.resume: auto``)
  continues from the last checkpoint.
- 4: training diverged: ``train.max_bad_steps`` consecutive steps with a non-finite loss or gradient.
- 5: the run folder cannot be written any more (disk full, quota exceeded, read-only file system):
  one line naming the file or folder; the previous checkpoint is intact. Resubmit with
  ``checkpoint.resume: auto`` once there is room.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from launch.config.load import Config

# 0 and 1 are Python's own: a normal end, an uncaught exception.
EXIT_INPUT, EXIT_ABORTED, EXIT_DIVERGED, EXIT_STORAGE = 2, 3, 4, 5

logger = logging.getLogger("launch")


class RunStop(Exception):
    """Stop the run with ``code`` and the one-line ``message`` (raised on every rank alike)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def storage_problem(exc: OSError, what: str) -> str:
    """One line: what could not be written, the system's reason and its errno name."""
    code = errno.errorcode.get(exc.errno or 0, "")
    reason = exc.strerror or str(exc)
    return f"error: {what}: {reason}" + (f" ({code})" if code else "")


def setup_logging(rank: int) -> None:
    """Warnings of the launcher and of kfac_hvd (numerics events) on stderr, tagged with the rank."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(levelname)s: rank {rank}: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------------
# Ranks must agree: the resolved configuration and the code
# --------------------------------------------------------------------------------------------------
def fingerprint(value: Any) -> str:
    """sha256 of a JSON-able value, independent of dict order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def config_fingerprint(cfg: Config) -> str:
    return fingerprint(cfg.to_dict())


def _versions() -> dict[str, str]:
    out = {"python": ".".join(platform.python_version_tuple()[:2]), "torch": torch.__version__}
    for name in ("torchvision", "horovod", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = "absent"
    return out


def code_files() -> dict[str, str]:
    """sha256 (16 hex digits) of every .py file of the kfac_hvd and launch packages this process imports."""
    import kfac_hvd
    import launch

    files = {}
    for pkg in (kfac_hvd, launch):
        assert pkg.__file__ is not None  # regular packages, with an __init__.py
        root = os.path.dirname(os.path.abspath(pkg.__file__))
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    rel = pkg.__name__ + "/" + os.path.relpath(path, root).replace(os.sep, "/")
                    with open(path, "rb") as fh:
                        files[rel] = hashlib.sha256(fh.read()).hexdigest()[:16]
    return files


def code_fingerprint() -> tuple[str, dict[str, Any]]:
    """(digest, detail): the sources of kfac_hvd and launch plus the versions of the libraries."""
    detail = {"files": code_files(), "versions": _versions()}
    return hashlib.sha256(json.dumps(detail, sort_keys=True).encode()).hexdigest(), detail


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}


def check_agreement(
    hvd: Any,
    cfg: Config,
    layout: list[dict],
    code_detail: dict[str, Any],
    data_identity: dict[str, Any] | None = None,
) -> None:
    """Raise RunStop(2) on every rank when the ranks' config, code or data fingerprints differ.

    ``layout`` is the allgathered per-rank record (with ``config``, ``code`` and ``data`` digests), so
    every rank takes the same decision; the details are exchanged only when something differs.
    """
    ref = layout[0]
    cfg_bad = [r["rank"] for r in layout if r["config"] != ref["config"]]
    code_bad = [r["rank"] for r in layout if r["code"] != ref["code"]]
    data_bad = [r["rank"] for r in layout if r.get("data") != ref.get("data")]
    if not cfg_bad and not code_bad and not data_bad:
        return
    detail = hvd.allgather_object({"config": _flat(cfg), "data": data_identity, **code_detail})
    parts, key = [], None
    if cfg_bad:
        other = cfg_bad[0]
        mine, theirs = detail[0]["config"], detail[other]["config"]
        keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        key = keys[0] if keys else None
        shown = ", ".join(
            f"{k}: {theirs.get(k)!r} on rank {other}, {mine.get(k)!r} on rank 0" for k in keys[:3]
        )
        more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
        parts.append(
            f"ranks disagree on the resolved configuration (ranks differing from rank 0: "
            f"{_ranks(cfg_bad)}): {shown}{more}"
        )
    if code_bad:
        other = code_bad[0]
        mine, theirs = detail[0], detail[other]
        files = sorted(
            f
            for f in set(mine["files"]) | set(theirs["files"])
            if mine["files"].get(f) != theirs["files"].get(f)
        )
        versions = [
            f"{k} {theirs['versions'].get(k)} on rank {other}, {v} on rank 0"
            for k, v in mine["versions"].items()
            if theirs["versions"].get(k) != v
        ]
        what = ", ".join(files[:4]) + (f" (+{len(files) - 4} more)" if len(files) > 4 else "")
        parts.append(
            f"ranks run different code (ranks differing from rank 0: {_ranks(code_bad)}): "
            + "; ".join(x for x in ([f"files {what}"] if files else []) + versions)
        )
    if data_bad:
        other = data_bad[0]
        mine, theirs = detail[0].get("data") or {}, detail[other].get("data") or {}
        fields = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        shown = ", ".join(
            f"{k}: {theirs.get(k)!r} on rank {other}, {mine.get(k)!r} on rank 0" for k in fields
        )
        data_key = {
            "imagenet": "data.train_dir" if any(f.startswith("train") for f in fields) else "data.val_dir",
            "fashion_mnist": "data.fashion_mnist_dir",
        }.get(cfg.data.dataset, "data.dataset")
        key = key or data_key
        parts.append(f"ranks see different data (ranks differing from rank 0: {_ranks(data_bad)}): {shown}")
    where = f"{cfg.source(key)}: {key}" if key else cfg.path
    raise RunStop(EXIT_INPUT, f"config error: {where}: " + "; ".join(parts))


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (f" (+{len(ranks) - 8} more)" if len(ranks) > 8 else "")


# --------------------------------------------------------------------------------------------------
# Watchdog: a rank that makes no progress exits instead of hanging the job
# --------------------------------------------------------------------------------------------------
class Watchdog:
    """A daemon thread that ends the process (exit code 3) when ``beat`` is not called for ``timeout`` s.

    The training loop beats on every step, evaluation batch and checkpoint, so the timeout bounds a
    rank blocked in a collective whose peer has stopped (or a rank that deadlocked itself); the
    launcher (horovodrun, mpirun) then ends the other ranks.
    """

    def __init__(self, timeout: float | None, rank: int):
        self.timeout, self.rank = timeout, rank
        self.last, self.what = time.monotonic(), "start-up"
        self._stop = threading.Event()
        self._thread = None
        if timeout:
            self._thread = threading.Thread(
                target=self._watch, args=(timeout,), name="launch-watchdog", daemon=True
            )
            self._thread.start()

    def beat(self, what: str) -> None:
        self.last, self.what = time.monotonic(), what

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, timeout: float) -> None:
        poll = min(5.0, max(0.05, timeout / 10))
        while not self._stop.wait(poll):
            idle = time.monotonic() - self.last
            if idle > timeout:
                msg = (
                    f"error: rank {self.rank}: no progress for {idle:.0f} s (train.watchdog_s = "
                    f"{timeout:g}) since {self.what}; a rank died, hung or stopped answering. "
                    f"Exiting with code {EXIT_ABORTED} so the job ends instead of hanging.\n"
                )
                try:
                    os.write(2, msg.encode())
                finally:
                    os._exit(EXIT_ABORTED)


# --------------------------------------------------------------------------------------------------
# Non-finite steps
# --------------------------------------------------------------------------------------------------
class BufferGuard:
    """Copies of the model's buffers (BatchNorm running statistics) from before the forward pass.

    A batch with NaN inputs poisons the running statistics during the forward pass already; a skipped
    step puts them back.
    """

    def __init__(self, model: torch.nn.Module):
        self.groups: dict[tuple[Any, Any], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for buf in model.buffers():
            live, saved = self.groups.setdefault((buf.device, buf.dtype), ([], []))
            live.append(buf)
            saved.append(buf.detach().clone())

    @torch.no_grad()
    def save(self) -> None:
        for live, saved in self.groups.values():
            _copy(saved, live)

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in self.groups.values():
            _copy(live, saved)


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src):
            d.copy_(s)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when every element of every tensor is finite (one device synchronisation)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


# --------------------------------------------------------------------------------------------------
# Fault injection (the ``debug`` section): rehearse what a real fault does to a job
# --------------------------------------------------------------------------------------------------
class Faults:
    def __init__(self, dcfg: Any, rank: int, size: int) -> None:
        self.rank, self.on = rank, dcfg.fault_rank == rank
        self.nan_step, self.kill_step, self.hang_step = dcfg.nan_step, dcfg.kill_step, dcfg.hang_step
        self.overflow_step = dcfg.overflow_step
        armed = [k for k in ("nan_step", "kill_step", "hang_step", "overflow_step") if dcfg[k] is not None]
        if armed and dcfg.fault_rank >= size:
            logger.warning(
                "debug.fault_rank is %d but there are %d rank(s): no fault is injected", dcfg.fault_rank, size
            )
        elif armed and self.on:
            logger.warning(
                "fault injection armed on this rank: %s", ", ".join(f"debug.{k}={dcfg[k]}" for k in armed)
            )

    def poison(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """The input batch of ``step`` (1-based), with one NaN pixel at debug.nan_step."""
        if self.on and step == self.nan_step:
            logger.warning("debug.nan_step: NaN in the input batch of step %d", step)
            x = x.clone()
            x.view(-1)[0] = float("nan")
        return x

    def overflow(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss that backward starts from: at debug.overflow_step, times Inf, so every gradient of this
        rank is non-finite while the loss itself (the value the step reports) stays finite, as when fp16
        gradients overflow under too large a loss scale."""
        if self.on and step == self.overflow_step:
            logger.warning("debug.overflow_step: infinite gradients from the finite loss of step %d", step)
            return loss * float("inf")
        return loss

    def hang(self, step: int) -> None:
        if self.on and step == self.hang_step:
            logger.warning("debug.hang_step: this rank stops making progress at step %d", step)
            for h in logging.getLogger().handlers:
                h.flush()
            while True:
                time.sleep(3600)

    def kill(self, step: int) -> None:
        if self.on and step == self.kill_step:
            print(
                f"debug.kill_step: rank {self.rank} sends itself SIGKILL after step {step}",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
