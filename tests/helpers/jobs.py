"""Helpers of the reliability tests: timed jobs under horovodrun / mpirun, per-rank commands, tiny runs."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time

from .common import CONFIGS, PYTHON, REPO, launcher_prefix
from .common import env as base_env

# The rank as each launcher announces it, for `sh -c` commands that differ per rank.
RANK = "${HOROVOD_RANK:-$OMPI_COMM_WORLD_RANK}"
DEMO = os.path.join(CONFIGS, "fashion_mnist", "small_resnet_kfac_lambda0.25.yaml")


def tiny(run_dir: str, *extra: str) -> list[str]:
    """Arguments of a very small K-FAC run: 64 Fashion-MNIST images, batch 8, width 4 (4 steps on 2 ranks).

    Any number of ranks may run it (train.world_size=null) unless ``extra`` sets train.world_size, and
    ``extra`` may set again any key set here (an override given twice is an error)."""
    base = {
        "log.dir": run_dir,
        "data.train_subset": "64",
        "data.val_subset": "32",
        "data.batch_size": "8",
        "data.val_batch_size": "32",
        "model.width": "4",
        "train.epochs": "1",
        "log.progress": "false",
        "log.tensorboard": "false",
        "checkpoint.every_epochs": "0",
        "train.world_size": "null",
    }
    given = {a.split("=", 1)[0] for a in extra}
    return ["--config", DEMO, *(f"{k}={v}" for k, v in base.items() if k not in given), *extra]


def train_cmd(args: list[str]) -> list[str]:
    return [PYTHON, "-m", "launch.train", *args]


def per_rank_shell(template: str) -> list[str]:
    """A command run by every rank through `sh -c`; ``{rank}`` in ``template`` is the rank."""
    return ["sh", "-c", template.replace("{rank}", RANK)]


def shell_train(args: list[str]) -> str:
    """The launcher's command line for `sh -c`; arguments with ``$VAR`` or ``{rank}`` are expanded by sh."""
    return "exec " + " ".join(
        f'"{a}"' if ("$" in a or "{rank}" in a) else shlex.quote(a) for a in train_cmd(args)
    )


def launcher_cmd(launcher: str, np_: int, command: list[str]) -> list[str]:
    if launcher == "none":
        return list(command)
    return launcher_prefix(launcher, np_) + list(command)


def job(
    launcher: str,
    command: list[str],
    *,
    np_: int = 2,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command`` under ``launcher``; returns (completed process, wall seconds).

    The job runs in its own process group; when it outlives ``timeout`` the whole group is killed
    and TimeoutError is raised (a hang is a failure, never a silent wait).
    """
    full_env = base_env()
    full_env.update(env or {})
    start = time.monotonic()
    proc = subprocess.Popen(
        launcher_cmd(launcher, np_, command),
        cwd=cwd or REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise TimeoutError(
            f"job still running after {timeout} s (killed)\n--- stdout\n{out[-3000:]}\n"
            f"--- stderr\n{err[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - start


def rank_lines(text: str, rank: int) -> list[str]:
    """Lines horovodrun tagged with ``[rank]<stdout>:`` / ``[rank]<stderr>:``, without the tag."""
    out = []
    for line in text.splitlines():
        for stream in ("stdout", "stderr"):
            tag = f"[{rank}]<{stream}>:"
            if line.startswith(tag):
                out.append(line[len(tag) :])
    return out


def recorded_train(
    args: list[str], out: str, *, stderr_to_file: bool = False, pass_code: bool = True
) -> list[str]:
    """Every rank's `sh -c` command running the launcher with ``args``; it writes the launcher's own exit
    code to ``out/rc.RANK`` (and, with ``stderr_to_file``, its stderr to ``out/err.RANK``).

    A launcher ends the other ranks as soon as one exits non-zero, so a rank that is still exiting shows
    the launcher's signal (143) instead of its own code. Two ways to see the rank's own code:

    - ``pass_code=True`` (horovodrun): the wrapper exits with the launcher's code, so horovodrun sees the
      failure and ends the job as usual, but the wrapper ignores horovodrun's SIGTERM (``trap : TERM``).
      horovodrun signals only the direct children of each rank's command (the wrapper), not the launcher
      process under it, and SIGKILLs what is left 5 s later: a rank that ends by itself within those
      5 s has its own code recorded; one that does not leaves no ``rc`` file.
    - ``pass_code=False`` (mpirun, which signals the whole process group, trap or not): the wrapper
      exits 0, so the launcher never ends a rank; every rank must end by itself (else the job's timeout).
    """
    folder = shlex.quote(out)
    cmd = shell_train(args)[len("exec ") :]
    if stderr_to_file:
        cmd += f" 2> {folder}/err.{{rank}}"
    record = f"rc=$?; echo $rc > {folder}/rc.{{rank}}"
    if pass_code:
        return per_rank_shell(f"trap : TERM; {cmd}; {record}; exit $rc")
    return per_rank_shell(f"{cmd}; {record}; exit 0")


def rank_exit_codes(out: str, np_: int = 2) -> dict[int, int | None]:
    """The exit code each rank's launcher process recorded (see recorded_train); None: nothing recorded
    (the wrapper itself was killed, e.g. by horovodrun 5 s after its SIGTERM)."""
    codes: dict[int, int | None] = {}
    for rank in range(np_):
        path = os.path.join(out, f"rc.{rank}")
        codes[rank] = int(open(path).read().strip()) if os.path.exists(path) else None
    return codes


def rank_stderr(out: str, rank: int) -> list[str]:
    """The stderr lines of ``rank`` kept by recorded_train(..., stderr_to_file=True)."""
    path = os.path.join(out, f"err.{rank}")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read().splitlines()


def first_failure(text: str) -> tuple[int | None, int | None]:
    """(rank, exit code) of the first rank that failed, as horovodrun's closing error names them
    (``Process name: R`` / ``Exit code: N``); (None, None) when it names none."""
    match = re.search(r"^Process name: (\d+)\nExit code: (\d+)$", text, re.MULTILINE)
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)
