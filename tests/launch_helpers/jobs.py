"""Helpers of the reliability tests: timed jobs under horovodrun / mpirun, per-rank commands, tiny runs."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from typing import Dict, List, Optional, Tuple

from .common import BIN, CONFIGS, PYTHON, REPO, env as base_env

# The rank as each launcher announces it, for `sh -c` commands that differ per rank.
RANK = "${HOROVOD_RANK:-$OMPI_COMM_WORLD_RANK}"
DEMO = os.path.join(CONFIGS, "fashion_mnist", "small_resnet_kfac_lambda0.25.yaml")


def tiny(run_dir: str, *extra: str) -> List[str]:
    """Arguments of a very small K-FAC run: 64 Fashion-MNIST images, batch 8, width 4 (4 steps on 2 ranks)."""
    return ["--config", DEMO, f"log.dir={run_dir}", "data.train_subset=64", "data.val_subset=32",
            "data.batch_size=8", "data.val_batch_size=32", "model.width=4", "train.epochs=1",
            "log.progress=false", "log.tensorboard=false", "checkpoint.every_epochs=0", *extra]


def train_cmd(args: List[str]) -> List[str]:
    return [PYTHON, "-m", "launch.train", *args]


def per_rank_shell(template: str) -> List[str]:
    """A command run by every rank through `sh -c`; ``{rank}`` in ``template`` is the rank."""
    return ["sh", "-c", template.replace("{rank}", RANK)]


def shell_train(args: List[str]) -> str:
    """The launcher's command line for `sh -c`; arguments with ``$VAR`` or ``{rank}`` are expanded by sh."""
    return "exec " + " ".join(f'"{a}"' if ("$" in a or "{rank}" in a) else shlex.quote(a) for a in train_cmd(args))


def launcher_cmd(launcher: str, np_: int, command: List[str]) -> List[str]:
    if launcher == "horovodrun":
        return [os.path.join(BIN, "horovodrun"), "-np", str(np_), "--gloo", "-H", f"localhost:{np_}", *command]
    if launcher == "mpirun":
        return [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np_),
                "-bind-to", "none", "-map-by", "slot", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", *command]
    if launcher == "none":
        return list(command)
    raise ValueError(launcher)


def job(launcher: str, command: List[str], *, np_: int = 2, timeout: float = 300,
        env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> Tuple[subprocess.CompletedProcess, float]:
    """Run ``command`` under ``launcher``; returns (completed process, wall seconds).

    The job runs in its own process group; when it outlives ``timeout`` the whole group is killed
    and TimeoutError is raised (a hang is a failure, never a silent wait).
    """
    full_env = base_env()
    full_env.update(env or {})
    start = time.monotonic()
    proc = subprocess.Popen(launcher_cmd(launcher, np_, command), cwd=cwd or REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise TimeoutError(f"job still running after {timeout} s (killed)\n--- stdout\n{out[-3000:]}\n"
                           f"--- stderr\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - start


def rank_lines(text: str, rank: int) -> List[str]:
    """Lines horovodrun tagged with ``[rank]<stdout>:`` / ``[rank]<stderr>:``, without the tag."""
    out = []
    for line in text.splitlines():
        for stream in ("stdout", "stderr"):
            tag = f"[{rank}]<{stream}>:"
            if line.startswith(tag):
                out.append(line[len(tag):])
    return out
