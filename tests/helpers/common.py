"""Shared helpers of the launcher tests: paths, subprocess runners, tiny config files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
BIN = os.path.dirname(PYTHON)
FASHION = "/usr/share/datasets/fashion-mnist"
CONFIGS = os.path.join(REPO, "configs")
PAPER_CONFIGS = [
    "imagenet/resnet50_kfac_bs16k_baseline.yaml",
    "imagenet/resnet50_kfac_bs16k_lambda0.2.yaml",
    "imagenet/resnet50_kfac_bs16k_lambda0.25.yaml",
    "imagenet/resnet50_kfac_bs16k_lambda0.3.yaml",
    "imagenet/resnet50_sgd_bs16k.yaml",
]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    # A test run must not inherit a launcher's identity from the test environment.
    for key in (
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK",
        "PMI_SIZE",
        "PMI_RANK",
        "PMIX_RANK",
        "HOROVOD_RANK",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR",
        "HOROVOD_CONTROLLER",
    ):
        e.pop(key, None)
    return e


def launch_cmd(args: list[str]) -> list[str]:
    return [PYTHON, "-m", "launch.train"] + args


def run(cmd: list[str], timeout: float = 300, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd or REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def launcher_prefix(launcher: str, np_: int) -> list[str]:
    """The command that starts ``np_`` ranks on this one host, before the program's own command."""
    if launcher == "horovodrun":
        return [os.path.join(BIN, "horovodrun"), "-np", str(np_), "--gloo", "-H", f"localhost:{np_}"]
    if launcher == "mpirun":
        return [
            shutil.which("mpirun") or "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            str(np_),
            "-bind-to",
            "none",
            "-map-by",
            "slot",
            "-x",
            "PYTHONPATH",
            "-x",
            "OMP_NUM_THREADS",
        ]
    raise ValueError(launcher)


def horovodrun(np_: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return run(launcher_prefix("horovodrun", np_) + launch_cmd(args), timeout=timeout)


def mpirun(np_: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return run(launcher_prefix("mpirun", np_) + launch_cmd(args), timeout=timeout)


def horovod_problem() -> str | None:
    """Why Horovod cannot run the launcher tests here, or None when it can."""
    try:
        import horovod.torch as hvd

        hvd.gloo_built()  # loads the native library: a half-built install fails here, not in a test
    except Exception as exc:  # a broken build raises OSError or AttributeError as well as ImportError
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"horovod.torch does not load ({type(exc).__name__}: {first})"
    if not os.path.exists(os.path.join(BIN, "horovodrun")):
        return f"no horovodrun next to {PYTHON}"
    return None


def horovod_ready() -> bool:
    """False skips the Horovod tests; under KFAC_HVD_STRICT=1 a missing Horovod is an error instead."""
    problem = horovod_problem()
    if problem is not None and os.environ.get("KFAC_HVD_STRICT") == "1":
        raise RuntimeError(f"KFAC_HVD_STRICT=1: {problem}")
    return problem is None


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def tiny_fashion_args(run_dir: str, *extra: str) -> list[str]:
    """A few steps of the demo config on a small Fashion-MNIST subset (seconds on 2 ranks); ``extra`` may
    set again any key set here (an override given twice is an error)."""
    base = {
        "log.dir": run_dir,
        "data.train_subset": "256",
        "data.val_subset": "200",
        "data.batch_size": "16",
        "model.width": "8",
        "train.epochs": "1",
        "log.progress": "false",
        "log.tensorboard": "false",
    }
    given = {a.split("=", 1)[0] for a in extra}
    return [
        "--config",
        os.path.join(CONFIGS, "fashion_mnist", "small_resnet_kfac_lambda0.25.yaml"),
        *(f"{k}={v}" for k, v in base.items() if k not in given),
        *extra,
    ]


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
