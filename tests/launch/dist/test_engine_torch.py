"""``train.engine: torch``: the launcher on torch.distributed under torchrun and mpirun, with Horovod's
import blocked, trains to the same weights as Horovod; elastic runs are refused on it."""

import os
import shutil
import socket

import pytest
import torch
from tests.helpers.common import BIN, horovod_ready, launcher_prefix
from tests.helpers.jobs import job, tiny, train_cmd

needs_horovod = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def horovod_blocked(tmp_path) -> dict[str, str]:
    """An environment in which every ``import horovod...`` raises ImportError (a sitecustomize that
    Python runs at start-up in each rank), with the repository still first for ``launch``."""
    block = tmp_path / "block_horovod"
    block.mkdir()
    (block / "sitecustomize.py").write_text('import sys\nsys.modules["horovod"] = None\n')
    from tests.helpers.common import REPO

    return {"PYTHONPATH": f"{block}{os.pathsep}{REPO}", "GLOO_SOCKET_IFNAME": "lo"}


def torchrun(np_: int) -> list[str]:
    return [
        os.path.join(BIN, "torchrun"),
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(np_),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "launch.train",
    ]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), map_location="cpu", weights_only=False)
    return ckpt["model"]


def run_args(run_dir, *extra: str) -> list[str]:
    # Four K-FAC steps on 2 ranks, one checkpoint at the end (its weights are compared).
    return tiny(str(run_dir), "checkpoint.every_epochs=1", *extra)


def check(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        diff = (a[name].double() - b[name].double()).abs().max().item() if a[name].numel() else 0.0
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs by {diff!r}"


@needs_horovod
@needs_mpirun
def test_torch_engine_under_torchrun_and_mpirun_gives_horovods_weights_without_horovod(tmp_path):
    """Bit-equal: at 2 ranks a sum of two values is exact in either order and the division by 2 is
    exact, so both engines' gradient averages (and K-FAC's factor averages) agree to the bit."""
    blocked = horovod_blocked(tmp_path)
    hvd_dir, tr_dir, mpi_dir = tmp_path / "horovod", tmp_path / "torchrun", tmp_path / "mpirun"
    reference, _ = job("horovodrun", train_cmd(run_args(hvd_dir)), timeout=300)
    check(reference)

    on_torchrun, _ = job(
        "none", torchrun(2) + run_args(tr_dir, "train.engine=torch"), env=blocked, timeout=300
    )
    check(on_torchrun)
    assert "init via torchrun (torch.distributed, Gloo)" in on_torchrun.stdout
    assert "2 rank(s) x 8 = 16 images per step, 4 steps" in on_torchrun.stdout

    mpirun_cmd = launcher_prefix("mpirun", 2) + ["-x", "GLOO_SOCKET_IFNAME", "-x", "MASTER_PORT"]
    on_mpirun, _ = job(
        "none",
        mpirun_cmd + train_cmd(run_args(mpi_dir, "train.engine=torch")),
        env={**blocked, "MASTER_PORT": str(free_port())},
        timeout=300,
    )
    check(on_mpirun)
    assert "init via mpirun (torch.distributed, Gloo)" in on_mpirun.stdout

    horovod_weights = final_weights(hvd_dir)
    assert_same_weights(horovod_weights, final_weights(tr_dir), "torchrun vs horovodrun")
    assert_same_weights(horovod_weights, final_weights(mpi_dir), "mpirun vs horovodrun")


def test_elastic_on_the_torch_engine_is_refused_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    proc, _ = job(
        "none",
        train_cmd(tiny(str(run_dir), "train.engine=torch", "train.elastic=true")),
        env=horovod_blocked(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "train.elastic" in lines[0] and "train.engine=horovod" in lines[0]
    assert not run_dir.exists()  # refused before the run folder was claimed


WORKER = """
import sys, torch
from launch.dist.torch_engine import TorchEngine
assert "horovod" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
e = TorchEngine("cpu")
r = e.rank()
model = torch.nn.Linear(3, 2)
with torch.no_grad():
    for p in model.parameters():
        p.fill_(float(r + 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
opt.state[model.weight]["momentum_buffer"] = torch.full((2, 3), float(r + 5))
e.broadcast_parameters(model.state_dict(), root_rank=1)
e.broadcast_optimizer_state(opt, root_rank=1)
dist_opt = e.DistributedOptimizer(opt, named_parameters=model.named_parameters())
model(torch.full((4, 3), float(r))).sum().backward()
dist_opt.synchronize()
fields = ("RESULT", r, e.size(), e.local_rank(), e.local_size(), e.cross_size(),
      model.weight.flatten().tolist(), model.bias.tolist(),
      dist_opt.state_dict()["state"][0]["momentum_buffer"].flatten().tolist(),
      model.weight.grad.flatten().tolist(), model.bias.grad.tolist(),
      e.allreduce(torch.tensor([float(r)]), op=e.Sum).tolist(),
      e.allgather_object({"r": r}), e.broadcast_object("from%d" % r, root_rank=1))
# One file a rank: two ranks printing to one pipe may interleave their lines.
with open(__file__ + ".rank%d" % r, "w") as out:
    out.write(" ".join(map(str, fields)))
e.shutdown()
"""


def test_engine_calls_broadcast_average_and_gather_across_two_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = torchrun(2)[:-2] + [str(script)]
    proc, _ = job("none", cmd, env=horovod_blocked(tmp_path), timeout=180)
    check(proc)
    results = [open(f"{script}.rank{rank}").read() for rank in (0, 1)]
    assert len(results) == 2, proc.stdout
    for rank, line in enumerate(results):
        # Rank 1's parameters (2.0) and momentum (6.0) everywhere; the gradient of sum(W x + b) over a
        # batch of 4 rows x = r: dW = 4 r, averaged over r = 0, 1 -> 2; db = 4.
        expected = (
            f"RESULT {rank} 2 {rank} 2 1 [2.0, 2.0, 2.0, 2.0, 2.0, 2.0] [2.0, 2.0] "
            f"[6.0, 6.0, 6.0, 6.0, 6.0, 6.0] [2.0, 2.0, 2.0, 2.0, 2.0, 2.0] [4.0, 4.0] [1.0] "
            f"[{{'r': 0}}, {{'r': 1}}] from1"
        )
        assert line == expected
