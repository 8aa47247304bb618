"""The exit codes of ``launch.train`` and the errors that end a run with one of them.

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

# 0 and 1 are Python's own: a normal end, an uncaught exception.
EXIT_INPUT, EXIT_ABORTED, EXIT_DIVERGED, EXIT_STORAGE = 2, 3, 4, 5


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


class ConfigError(Exception):
    """A configuration problem; ``str(err)`` is a single line naming the file and the key."""

    def __init__(self, source: str, key: str | None, message: str):
        self.source, self.key, self.message = source, key, message
        where = f"{source}: {key}" if key else source
        super().__init__(f"config error: {where}: {message}")


class CheckpointError(Exception):
    """No usable checkpoint; the message names the file(s) and why."""


class StorageError(Exception):
    """A checkpoint could not be written (disk full, quota, read-only folder); the previous one is intact."""
