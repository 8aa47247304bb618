"""Small helpers shared by the benchmark scripts: the machine's description and a few statistics."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the numbers: cores, CPU, memory, versions, the load right now."""
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "load_average": load_average(),
    }
    try:
        import horovod

        info["horovod"] = horovod.__version__
    except ImportError:
        info["horovod"] = None
    try:
        with open("/proc/meminfo") as f:
            total_kb = int(f.readline().split()[1])
        info["memory_gib"] = round(total_kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (rev + ("+changes" if dirty else "")) if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as a user would type it from the repository root (``python -m bench.NAME ...``)."""
    argv = list(sys.argv if argv is None else argv)
    module = os.path.relpath(os.path.abspath(argv[0]), REPO).removesuffix(".py").replace(os.sep, ".")
    python = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO) else sys.executable
    return shlex.join([python, "-m", module, *argv[1:]])


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def spread(values: Sequence[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


# Starting runs -------------------------------------------------------------------------------------


def horovodrun(ranks: int) -> list[str]:
    """``horovodrun -np RANKS --gloo`` on this host: the one next to this Python, else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    found = local if os.path.exists(local) else shutil.which("horovodrun")
    if not found:
        sys.exit("bench: horovodrun not found next to this Python nor on PATH; run 'make setup' first")
    return [found, "-np", str(ranks), "--gloo", "-H", f"localhost:{ranks}"]


def _niceness(nice: int | None) -> list[str]:
    return ["nice", "-n", str(nice)] if nice is not None else []


_TRAIN_ENV = {"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


class TrainWorker:
    """One process of bench._train_worker that trains single-rank runs one after another (Python, torch
    and Horovod start once rather than once a run)."""

    def __init__(self, nice: int | None = None) -> None:
        self.nice = nice
        self.process: subprocess.Popen | None = None

    def train(self, run_dir: str, arguments: Sequence[str]) -> int:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [*_niceness(self.nice), sys.executable, "-m", "bench._train_worker"],
                cwd=REPO,
                env={**os.environ, **_TRAIN_ENV},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"run_dir": run_dir, "argv": list(arguments)}) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        return json.loads(reply)["exit"] if reply else -1


def train(
    tool: str,
    label: str,
    run_dir: str,
    arguments: Sequence[str],
    ranks: int = 2,
    nice: int | None = None,
    worker: TrainWorker | None = None,
) -> int:
    """``python -m launch.train ARGUMENTS``: under horovodrun when RANKS > 1, in WORKER when given and
    RANKS is 1, under ``nice -n NICE`` when given; its output goes to RUN_DIR/stdout.txt. Returns the
    exit code (launch.errors names them)."""
    os.makedirs(run_dir, exist_ok=True)  # Horovod opens a timeline before the launcher makes folders
    start = time.time()
    if worker is not None and ranks == 1:
        print(f"[{tool}] {label}: in a worker", flush=True)
        code = worker.train(run_dir, arguments)
    else:
        python = [sys.executable, "-m", "launch.train", *arguments]
        launcher = horovodrun(ranks) if ranks > 1 else []
        print(f"[{tool}] {label}: {shlex.join(python[1:])}", flush=True)
        env = {**os.environ, **_TRAIN_ENV}
        result = subprocess.run(
            _niceness(nice) + launcher + python, cwd=REPO, capture_output=True, text=True, env=env
        )
        with open(os.path.join(run_dir, "stdout.txt"), "w") as handle:
            handle.write(result.stdout + result.stderr)
        code = result.returncode
    print(f"[{tool}]   {label}: exit {code} after {time.time() - start:.0f} s", flush=True)
    return code


def train_on_two_ranks(tool: str, label: str, run_dir: str, arguments: Sequence[str]) -> None:
    """:func:`train` on 2 ranks; a failed run stops the benchmark with the folder's name."""
    code = train(tool, label, run_dir, arguments, ranks=2)
    if code != 0:
        raise SystemExit(f"{tool}: run {label} failed (exit {code}); see {run_dir}/stdout.txt")


# Reports -------------------------------------------------------------------------------------------


def pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def interpolate_log_x(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """y at ``x`` on the polyline through ``points`` (sorted by x), linear in log(x); None outside it."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 0.0
            return y0 + w * (y1 - y0)
    return None
