"""Session checks: under KFAC_HVD_STRICT=1 (make test, CI) a missing prerequisite fails the run instead of
skipping the tests that need it; tests marked `cuda` are skipped, with the reason, where there is no GPU."""

import os
import shutil
import subprocess

import pytest

from tests.helpers.common import BIN, FASHION, horovod_problem

STRICT = os.environ.get("KFAC_HVD_STRICT") == "1"
# Open MPI 4.1's mpirun writes the hardware topology into a shared-memory segment at an address it
# guesses from its own memory map, and now and then crashes there at start-up (a segfault in
# hwloc_shmem_topology_write, seen once in a test run). Only local processes' start-up time gains from
# it; every mpirun the tests start (they inherit this environment) goes without.
os.environ.setdefault("OMPI_MCA_rtc_hwloc_vmhole", "none")
FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def strict_problems():
    """Everything the launcher tests need that is missing or broken here, cheapest checks first."""
    problems = []
    if shutil.which("mpirun") is None:
        problems.append("mpirun is not on PATH (apt-get install openmpi-bin)")
    absent = [
        name
        for name in FASHION_FILES
        if not any(os.path.isfile(os.path.join(FASHION, name + ext)) for ext in (".gz", ""))
    ]
    if absent:
        problems.append(
            f"Fashion-MNIST IDX files missing in {FASHION}: {', '.join(absent)} "
            "(apt-get install dataset-fashion-mnist)"
        )
    problem = horovod_problem()
    if problem is not None:
        problems.append(problem)
    else:
        try:
            check = subprocess.run(
                [os.path.join(BIN, "horovodrun"), "--check-build"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            lines = {line.strip() for line in check.stdout.splitlines()}
            lacking = [name for name in ("PyTorch", "Gloo", "MPI") if f"[X] {name}" not in lines]
            if check.returncode != 0:
                problems.append(f"horovodrun --check-build exited {check.returncode}")
            elif lacking:
                problems.append(f"horovodrun --check-build lacks {', '.join(lacking)}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"horovodrun --check-build did not run ({exc})")
    return problems


def pytest_sessionstart(session):
    if STRICT:
        problems = strict_problems()
        if problems:
            pytest.exit("KFAC_HVD_STRICT=1: " + "; ".join(problems), returncode=3)


def pytest_collection_modifyitems(config, items):
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    import torch  # only when some test asks for a GPU

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in cuda_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def two_hosts(tmp_path_factory):
    """Two loopback hosts reachable over ssh (tests/helpers/twohosts.py), for the session; stopped at its end."""
    from tests.helpers.twohosts import SshdServer, sshd_problem

    problem = sshd_problem()
    if problem is not None:
        if STRICT:
            pytest.fail(f"KFAC_HVD_STRICT=1: {problem}")
        pytest.skip(problem)
    server = SshdServer(str(tmp_path_factory.mktemp("twohosts")))
    try:
        yield server.start()
    finally:
        server.stop()
