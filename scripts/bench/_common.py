"""Small helpers shared by the benchmark scripts: the machine's description and a few statistics."""
from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> Dict[str, Any]:
    """What a reader needs to judge the numbers: cores, CPU, memory, versions, the load right now."""
    import torch
    info: Dict[str, Any] = {
        "host": platform.node(), "nproc": os.cpu_count(), "cpu": cpu_model(),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(), "load_average": load_average(),
    }
    try:
        import horovod
        info["horovod"] = horovod.__version__
    except ImportError:
        info["horovod"] = None
    try:
        with open("/proc/meminfo") as f:
            total_kb = int(f.readline().split()[1])
        info["memory_gib"] = round(total_kb / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def git_revision() -> Optional[str]:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+changes" if dirty else "")) if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as a user would type it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = os.path.relpath(os.path.abspath(argv[0]), REPO)
    python = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO) else sys.executable
    return " ".join(shlex.quote(part) for part in [python, script, *argv[1:]])


def median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def spread(values: Sequence[float]) -> Optional[List[float]]:
    return [min(values), max(values)] if values else None


# Host reads ----------------------------------------------------------------------------------------


def train_on_two_ranks(tool: str, label: str, run_dir: str, arguments: Sequence[str]) -> None:
    """``horovodrun -np 2 --gloo`` on ``python -m launch.train ARGUMENTS``; its output goes to
    RUN_DIR/stdout.txt, and a failed run stops the benchmark with the folder's name."""
    os.makedirs(run_dir, exist_ok=True)   # Horovod opens a timeline before the launcher makes folders
    command = [os.path.join(REPO, ".venv/bin/horovodrun"), "-np", "2", "--gloo", "-H", "localhost:2",
               os.path.join(REPO, ".venv/bin/python"), "-m", "launch.train", *arguments]
    print(f"[{tool}] {label}: {shlex.join(command[6:])}", flush=True)
    start = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    with open(os.path.join(run_dir, "stdout.txt"), "w") as handle:
        handle.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{tool}: run {label} failed (exit {result.returncode}); see {run_dir}/stdout.txt")
    print(f"[{tool}]   done in {time.time() - start:.0f} s", flush=True)
