"""Promises of the launcher itself (launch.train) that hold before any rank starts: a Horovod that
cannot be imported (or used from PyTorch) is bad input, one line naming the fix, exit code 2
(docs/RELIABILITY.md, Configuration and inputs)."""

import os
import shutil

import pytest

from tests.helpers.common import describe, horovod_ready
from tests.helpers.common import env as base_env
from tests.helpers.jobs import DEMO, job, tiny, train_cmd

# What a failing `import horovod.torch` raises: Horovod not installed at all, or its PyTorch extension
# built against another torch (undefined symbol). (A Horovod built without the extension does not raise:
# see the last test.)
STUBS = {
    "not installed": {
        "horovod/__init__.py": "raise ModuleNotFoundError(\"No module named 'horovod'\", name='horovod')\n"
    },
    "torch extension broken": {
        "horovod/__init__.py": "",
        "horovod/torch/__init__.py": "raise ImportError('mpi_lib_v2.cpython-311-x86_64-linux-gnu.so: undefined "
        "symbol: _ZN3c1017RegisterOperators')\n",
    },
    # An ImportError whose message runs over several lines (numpy's, Horovod's own check_extension's).
    "message of several lines": {
        "horovod/__init__.py": "",
        "horovod/torch/__init__.py": "raise ImportError('Extension horovod.torch has not been built: /x/mpi_lib_v2.so "
        "not found\\nIf this is not expected, reinstall Horovod with "
        "HOROVOD_WITH_PYTORCH=1 to debug the build error.')\n",
    },
}
REASONS = {
    "not installed": "No module named 'horovod'",
    "torch extension broken": "mpi_lib_v2.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c1017RegisterOperators",
    "message of several lines": "Extension horovod.torch has not been built: /x/mpi_lib_v2.so not found",
}


@pytest.mark.parametrize("stub", ["not installed", "torch extension broken", "message of several lines"])
def test_horovod_that_cannot_be_imported_is_one_line_naming_the_fix(tmp_path, stub):
    """A `horovod` package earlier on PYTHONPATH than the real one stands in for a missing or broken
    install; the launcher (a single process, as every rank runs this check alone) exits 2 with one line."""
    for rel, text in STUBS[stub].items():
        path = tmp_path / "stub" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = {"PYTHONPATH": str(tmp_path / "stub") + os.pathsep + base_env()["PYTHONPATH"]}
    proc, _ = job("none", train_cmd(tiny(str(tmp_path / "run"))), env=env, timeout=120)
    reason = REASONS[stub]
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.splitlines() == [
        f"config error: {DEMO}: cannot import horovod.torch ({reason}); run 'make setup'"
    ], describe(proc)
    assert proc.stdout == "", describe(proc)
    assert not os.path.exists(tmp_path / "run"), "nothing is written before the checks pass"


@pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")
def test_horovod_without_its_pytorch_extension_is_one_line_naming_the_fix(tmp_path):
    """This machine's Horovod, copied without horovod/torch/mpi_lib_v2*.so: what `pip install horovod`
    leaves when PyTorch was not found at build time (HOROVOD_WITH_PYTORCH unset)."""
    import horovod

    shutil.copytree(
        os.path.dirname(horovod.__file__),
        tmp_path / "stub" / "horovod",
        ignore=shutil.ignore_patterns("mpi_lib_v2*", "__pycache__"),
    )
    env = {"PYTHONPATH": str(tmp_path / "stub") + os.pathsep + base_env()["PYTHONPATH"]}
    proc, _ = job("none", train_cmd(tiny(str(tmp_path / "run"))), env=env, timeout=120)
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {DEMO}: "), describe(proc)
    assert "horovod.torch" in lines[0] and "make setup" in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
