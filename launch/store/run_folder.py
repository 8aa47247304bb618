"""The run folder: one job at a time (a lock), no silent overwrite, and a resume that matches its run.

Rank 0 claims the folder before it writes anything (:func:`claim`): it takes an exclusive
``fcntl.flock`` on ``<log.dir>/.lock`` (and on ``<checkpoint.dir>/.lock`` when that folder lies
elsewhere) and records host, pid and start time in it; the record is cleared when the run ends. A
second job finds the lock taken and stops naming the holder. A record left by a process that ended
without clearing it (killed, crashed) is reported and taken over: the kernel releases a dead
process's flock, so a lock that can be taken is free.

A fresh run (``checkpoint.resume`` null) into a folder that holds another run's outputs stops, unless
``log.overwrite`` moves the old run aside to ``<log.dir>.old-<time>`` first. ``checkpoint.resume: auto``
finding no checkpoint there (an attempt of the same job that died before its first checkpoint:
preemption, a node lost) moves that attempt aside the same way and starts anew, so that resubmitting a
job always goes on; an attempt whose ``config.yaml`` differs from this run's as a resume's checkpoint
would (:func:`resume_changes`), or that has no readable ``config.yaml``, is another run: it stops.
Nothing is deleted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import yaml

from launch.config.schema import SCHEMA, may_change_on_resume
from launch.errors import ConfigError

if TYPE_CHECKING:
    from launch.config.load import Config

LOCK = ".lock"
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(record: dict[str, Any]) -> str:
    if not record:
        return "a job that has not yet written its details"
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}" + (
        f" ({record['command']})" if record.get("command") else ""
    )


class FolderLock:
    """An exclusive lock on ``<folder>/.lock`` held for the life of this process (see the module docstring)."""

    def __init__(self, folder: str):
        self.folder, self.path = folder, os.path.join(folder, LOCK)
        os.makedirs(folder, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        self.flock = True
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.record()
            os.close(self.fd)
            raise ConfigError(
                self.path,
                None,
                f"run folder {folder} is in use by another job: {_describe(holder)}; "
                f"wait for it to end, or choose another log.dir",
            ) from None
        except OSError as exc:
            if exc.errno not in NO_FLOCK:
                raise
            self.flock = False  # a file system without flock: the record alone decides
        self.previous = self.record()
        if not self.flock and self.previous and not self._stale(self.previous):
            os.close(self.fd)
            raise ConfigError(
                self.path,
                None,
                f"run folder {folder} is in use by another job: "
                f"{_describe(self.previous)} (this file system has no flock; delete "
                f"{self.path} if that job is gone)",
            )

    @staticmethod
    def _stale(record: dict[str, Any]) -> bool:
        return record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", 0) or 0))

    def record(self) -> dict[str, Any]:
        try:
            os.lseek(self.fd, 0, os.SEEK_SET)
            text = os.read(self.fd, 1 << 16).decode("utf-8", "replace")
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {"host": "?", "pid": "?", "started": "? (unreadable lock record)"}

    def take_over_warning(self) -> str | None:
        """The warning for a record left by a job that did not end cleanly, or None."""
        if not self.previous:
            return None
        dead = " (no longer running)" if self._stale(self.previous) else ""
        return (
            f"warning: {self.path}: taking over the lock left by {_describe(self.previous)}{dead}; "
            f"that job did not end cleanly"
        )

    def write(self, command: str) -> None:
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command[:300],
        }
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, json.dumps(record).encode())
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty record: this job ended cleanly
        except OSError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = -1


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _outputs(folder: str) -> list[str]:
    """What ``folder`` holds of a run: every entry but the lock and empty folders."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    out = []
    for name in names:
        path = os.path.join(folder, name)
        if name == LOCK or (os.path.isdir(path) and not _outputs(path)):
            continue
        out.append(name)
    return out


def claim(cfg: Config, fresh: bool, command: str = "") -> tuple[list[FolderLock], list[str]]:
    """Rank 0, before it writes anything: lock the run folder(s), refuse or move aside another run's
    outputs when this run starts fresh. Returns the locks (held until :func:`release`) and the lines
    to print. Raises ConfigError (exit code 2) with one line."""
    log_dir, ck_dir = cfg.run_dir, cfg.checkpoint_dir
    folders = [log_dir] + ([] if _inside(ck_dir, log_dir) else [ck_dir])
    locks: list[FolderLock] = []
    try:
        for folder in folders:
            locks.append(FolderLock(folder))
        used = {folder: _outputs(folder) for folder in folders}
        used = {f: names for f, names in used.items() if names}
        lines = [w for w in (lock.take_over_warning() for lock in locks) if w]
        if fresh and used:
            if cfg.log.overwrite:
                why = "log.overwrite: the previous run in {folder} was moved to {aside}"
            elif cfg.checkpoint.resume == "auto":
                _check_same_job(cfg, used)
                why = (
                    "checkpoint.resume=auto: the previous attempt in {folder} wrote no checkpoint; "
                    "it was moved to {aside} and this run starts anew"
                )
            else:
                raise _used_error(cfg, used)
            lines += _move_aside(used, why)
        for lock in locks:
            lock.write(command)
        return locks, lines
    except BaseException:
        for lock in locks:
            if lock.fd >= 0:
                os.close(lock.fd)
                lock.fd = -1
        raise


def _move_aside(used: dict[str, list[str]], why: str) -> list[str]:
    """Move every output of each used folder to ``<folder>.old-<UTC time>``; ``why`` (with ``{folder}``
    and ``{aside}``) is the line printed for each."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    lines = []
    for folder, names in used.items():
        aside = f"{os.path.abspath(folder).rstrip(os.sep)}.old-{stamp}"
        os.makedirs(aside)
        for name in names:
            os.replace(os.path.join(folder, name), os.path.join(aside, name))
        lines.append(why.format(folder=folder, aside=aside))
    return lines


def _saved_config(log_dir: str) -> dict[str, Any] | None:
    """The resolved config an earlier attempt wrote to ``<log_dir>/config.yaml``, or None (none, unreadable)."""
    try:
        with open(os.path.join(log_dir, "config.yaml"), encoding="utf-8") as fh:
            saved = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


def _check_same_job(cfg: Config, used: dict[str, list[str]]) -> None:
    """Raise ConfigError (one line) unless the outputs without a checkpoint are an earlier attempt of this
    very job: its config.yaml differs from this run's by no key that a resume would refuse."""
    log_dir = cfg.run_dir
    saved = _saved_config(log_dir)
    if saved is None:
        raise _used_error(cfg, used)
    current = cfg.to_dict()
    refused, _ = resume_changes(
        saved,
        current,
        (saved.get("train") or {}).get("world_size"),
        current["train"]["world_size"],
        list(cfg.checkpoint.allow_changes),
    )
    if refused:
        raise cfg.error(
            "log.dir",
            f"{log_dir} holds an attempt that wrote no checkpoint, run with other settings: "
            f"{'; '.join(refused)}; resubmit with its settings to move it aside and start anew, choose "
            f"another log.dir, or set checkpoint.resume=null log.overwrite=true to move it aside "
            f"(to {os.path.abspath(log_dir)}.old-<time>; nothing is deleted)",
        )


def _used_error(cfg: Config, used: dict[str, list[str]]) -> ConfigError:
    folder, names = next(iter(used.items()))
    shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
    if cfg.checkpoint.resume == "auto":
        ways = (
            "it has no checkpoint to resume from and no readable config.yaml to show it is an earlier "
            "attempt of this run; choose another log.dir, or set checkpoint.resume=null "
            "log.overwrite=true to move the old run aside"
        )
    else:
        ways = (
            "to continue it set checkpoint.resume=auto; to start anew choose another log.dir, or set "
            "log.overwrite=true to move the old run aside"
        )
    return cfg.error(
        "log.dir",
        f"{folder} holds another run's outputs ({shown}): {ways} "
        f"(to {os.path.abspath(folder)}.old-<time>; nothing is deleted)",
    )


def release(locks: list[FolderLock] | None) -> None:
    for lock in locks or []:
        lock.release()


# --------------------------------------------------------------------------------------------------
# A resumed run must be the run that wrote the checkpoint
# --------------------------------------------------------------------------------------------------
def _flat(values: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in values.items() if isinstance(sec, dict) for k, v in sec.items()}


def resume_changes(
    saved: dict[str, Any], current: dict[str, Any], saved_world: int | None, world: int, allowed: list[str]
) -> tuple[list[str], list[str]]:
    """(refused, accepted): ``key old → new`` for every key whose value differs between the checkpoint's
    saved config and this run's. ``train.world_size`` compares the ranks launched. A key the saved
    config lacks (added to the schema since) counts as its default."""
    old, new = _flat(saved or {}), _flat(current)
    old["train.world_size"], new["train.world_size"] = saved_world, world
    refused, accepted = [], []
    for key in sorted(new):
        section, _, name = key.partition(".")
        spec = SCHEMA.get(section, {}).get(name)
        before = old.get(key, spec.default if spec is not None else None)
        if before == new[key] or (
            isinstance(before, (int, float))
            and isinstance(new[key], (int, float))
            and not isinstance(before, bool)
            and float(before) == float(new[key])
        ):
            continue
        text = f"{key} {before!r} → {new[key]!r}"
        if may_change_on_resume(key):
            accepted.append(text)
        elif key in allowed:
            accepted.append(text + " (checkpoint.allow_changes)")
        else:
            refused.append(text)
    return refused, accepted
