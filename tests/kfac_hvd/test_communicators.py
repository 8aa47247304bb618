"""The communicators in one process: importing kfac_hvd sets no engine up, default_communicator() picks
the engine that is initialised, and TorchDistributedCommunicator on a one-rank Gloo group. Each check
runs in a fresh interpreter, so that no engine initialised here outlives it (the multi-rank checks are
in tests/kfac_hvd/test_distributed.py)."""

import subprocess
import sys
import textwrap

from tests.helpers.multiproc import ROOT


def python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_importing_the_library_sets_no_engine_up():
    assert (
        python(
            """
        import sys
        import kfac_hvd
        from kfac_hvd.comm import default_communicator
        import torch.distributed as dist
        comm = default_communicator()
        print(sorted(m for m in sys.modules if m.startswith("horovod")), dist.is_initialized(),
              type(comm).__name__, comm.rank, comm.size)
        """
        )
        == "[] False LocalCommunicator 0 1"
    )


def test_torch_communicator_on_one_rank_and_as_the_default():
    out = python(
        """
        import torch, torch.distributed as dist
        from kfac_hvd.comm import TorchDistributedCommunicator, default_communicator
        try:
            TorchDistributedCommunicator()
        except RuntimeError as error:
            print("refused:", "init_process_group" in str(error))
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        comm = default_communicator()
        x = torch.arange(4.0)
        mean = comm.wait(comm.allreduce_async(x, "x"))
        rows = torch.ones(2, 3)
        told = comm.wait(comm.allgather_async(rows, "rows", sizes=[2]))
        untold = comm.wait(comm.allgather_async(rows, "rows"))
        empty = comm.wait(comm.allgather_async(rows[:0], "none", sizes=[0]))
        print("empty", tuple(empty.shape))
        try:
            comm.allgather_async(rows, "rows", sizes=[3])
        except ValueError:
            print("wrong sizes refused")
        print(type(comm).__name__, comm.rank, comm.size, mean.tolist(), mean is x,
              told.shape == untold.shape == (2, 3))
        dist.destroy_process_group()
        """
    )
    assert out.splitlines() == [
        "refused: True",
        "empty (0, 3)",
        "wrong sizes refused",
        "TorchDistributedCommunicator 0 1 [0.0, 1.0, 2.0, 3.0] True True",
    ]
