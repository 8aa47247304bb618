"""Start real 2-process jobs under horovodrun (Gloo) or mpirun (Horovod's MPI controller), both on
Horovod, or under torchrun (torch.distributed, Gloo). The workers (tests/workers) read the engine from
KFAC_TEST_ENGINE, which ``run`` sets from the launcher."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LAUNCHERS = ("horovodrun-gloo", "mpirun", "torchrun")
ENGINES = {"horovodrun-gloo": "horovod", "mpirun": "horovod", "torchrun": "torch"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice), for torchrun's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command(launcher: str, np: int, argv: list) -> list:
    if launcher == "torchrun":
        # One node, rendezvous on the loopback address (the static rendezvous: rank 0's store).
        return [
            str(BIN / "torchrun"),
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(np),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            *argv,
        ]
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
        KFAC_TEST_ENGINE=ENGINES[launcher],
        GLOO_SOCKET_IFNAME="lo",  # torch.distributed's Gloo: the loopback interface, nothing else
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
