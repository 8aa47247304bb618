"""Start real 2-process jobs under horovodrun (Gloo) or mpirun (Horovod's MPI controller)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LAUNCHERS = ("horovodrun-gloo", "mpirun")


def command(launcher: str, np: int, argv: list) -> list:
    if launcher == "horovodrun-gloo":
        return [
            str(BIN / "horovodrun"),
            "-np",
            str(np),
            "--gloo",
            "-H",
            f"localhost:{np}",
            sys.executable,
            *argv,
        ]
    if launcher == "mpirun":
        return [
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            str(np),
            "-bind-to",
            "none",
            "-map-by",
            "slot",
            "-x",
            "PYTHONPATH",
            "-x",
            "KFAC_TEST_MPI4PY",
            sys.executable,
            *argv,
        ]
    raise ValueError(launcher)


def run(
    launcher: str, argv: list, *, np: int = 2, env: dict = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if key != "HOROVOD_TIMELINE"}
    full_env.update(
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        KFAC_TEST_MPI4PY="1" if launcher == "mpirun" else "",
        **(env or {}),
    )
    result = subprocess.run(
        command(launcher, np, argv), cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{launcher} exited {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\n"
            f"STDERR:\n{result.stderr[-4000:]}"
        )
    return result
