"""The pieces of the GPU path that can be judged on any machine: device and precision checks, the
NCCL-less Horovod decision, fp16 loss-scale agreement, the step verdicts, timers and progress output."""

import io
import json
import os

import pytest
import torch
from tests.helpers.jobs import DEMO

from launch.config.load import load_config
from launch.dist.device import check_device, describe_device
from launch.dist.mixed_precision import MixedPrecision
from launch.errors import ConfigError
from launch.record.progress import Progress, wants_bar
from launch.training.step import DIVERGED, OK, OVERFLOW, judge, nonfinite_flag
from launch.training.step_timer import StepTimer

LAUNCHER_ENV = (
    "HOROVOD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "MV2_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "SLURM_PROCID",
    "HOROVOD_GLOO_RENDEZVOUS_ADDR",
    "HOROVOD_CONTROLLER",
)


def cfg(*overrides):
    return load_config(DEMO, list(overrides))


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA 'available' (nothing touches a real device in these checks) and a Horovod to configure."""
    hvd = pytest.importorskip("horovod.torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_70", "sm_80", "sm_90"])
    monkeypatch.setattr(hvd, "cuda_built", lambda: True)
    monkeypatch.setattr(hvd, "nccl_built", lambda: 2)
    return hvd


def test_horovod_without_nccl_stops_unless_meant(fake_gpu, monkeypatch):
    check_device(cfg("train.device=cuda"))  # NCCL build: fine
    monkeypatch.setattr(fake_gpu, "nccl_built", lambda: 0)
    with pytest.raises(ConfigError) as info:
        check_device(cfg("train.device=cuda"))
    msg = str(info.value)
    assert "\n" not in msg and "train.device: cuda, but this Horovod was built without NCCL" in msg
    assert "HOROVOD_GPU_OPERATIONS=NCCL make setup" in msg and "horovod.allow_host_collectives=true" in msg
    check_device(cfg("train.device=cuda", "horovod.allow_host_collectives=true"))  # the user means it
    with pytest.raises(ConfigError, match="auto chose cuda, but this Horovod was built without NCCL"):
        check_device(cfg("train.device=auto"))
    # A Horovod without CUDA support cannot take CUDA tensors at all: no opting out.
    monkeypatch.setattr(fake_gpu, "cuda_built", lambda: False)
    with pytest.raises(ConfigError, match="built without CUDA support"):
        check_device(cfg("train.device=cuda", "horovod.allow_host_collectives=true"))


def test_torch_without_kernels_for_the_gpu_stops_with_the_fix(fake_gpu, monkeypatch):
    """torch 2.14's CUDA 13 wheels are built for sm_75 and newer: a V100 (7.0) has no kernels there."""
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100"])
    check_device(cfg("train.device=cuda"))  # the H200 (9.0) is covered
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(ConfigError) as info:
        check_device(cfg("train.device=cuda", "train.precision=fp16"))
    msg = str(info.value)
    assert "train.device: cuda:0 is Tesla V100-SXM2-16GB (compute capability 7.0)" in msg
    assert "sm_75 sm_80" in msg and "CUDA 12.x" in msg


def test_bf16_needs_an_ampere_or_newer_gpu(fake_gpu, monkeypatch):
    check_device(cfg("train.device=cuda", "train.precision=bf16"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(ConfigError) as info:
        check_device(cfg("train.device=cuda", "train.precision=bf16"))
    assert "train.precision: bf16 needs a GPU of compute capability 8.0" in str(info.value)
    assert "Tesla V100" in str(info.value) and "train.precision=fp16" in str(info.value)
    check_device(cfg("train.device=cuda", "train.precision=fp16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cpu_runs_allow_autocast_and_say_why_auto_chose_the_cpu():
    for precision in ("fp32", "bf16", "fp16"):
        check_device(cfg("train.device=cpu", f"train.precision={precision}"))
    line = describe_device("auto", torch.device("cpu"))
    assert line.startswith("device: cpu (auto: torch.cuda.is_available() is False: ")
    assert f"torch {torch.__version__}" in line
    assert describe_device("cpu", torch.device("cpu")) == "device: cpu (train.device)"


def test_new_kfac_keys_reach_the_library():
    import kfac_hvd.assignment
    import kfac_hvd.layers

    options = cfg().kfac.options()
    assert options.local_inverse_max_dim == kfac_hvd.assignment.DEFAULT_LOCAL_INVERSE_MAX_DIM
    assert options.unfold_chunk_bytes == kfac_hvd.layers.DEFAULT_UNFOLD_CHUNK_BYTES
    options = cfg("kfac.unfold_chunk_mb=1.5", "kfac.local_inverse_max_dim=0").kfac.options()
    assert options.unfold_chunk_bytes == 3 * 2**19 and options.local_inverse_max_dim == 0
    with pytest.raises(ConfigError, match="kfac.local_inverse_max_dim: must be >= 0"):
        cfg("kfac.local_inverse_max_dim=-1")


def test_fp16_loss_scale_follows_the_verdict_of_all_ranks():
    """The scaler backs off when *any* rank saw an overflow, even if this rank's gradients are finite."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = MixedPrecision("fp16", channels_last=False, device=torch.device("cpu"))
    scales = []
    for any_rank_nonfinite in (True, False):
        optimizer.zero_grad()
        precision.backward(model(torch.randn(4, 3)).sum())
        precision.unscale_(optimizer)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        precision.end_step(optimizer, any_rank_nonfinite=any_rank_nonfinite)
        scales.append(precision.scaler.get_scale())
    assert scales == [32768.0, 32768.0]  # halved once, then kept (growth needs 2000 steps)
    assert isinstance(precision.loss_scale(), torch.Tensor) and precision.loss_scale().dim() == 0
    assert MixedPrecision("bf16", False, torch.device("cpu")).loss_scale() is None


def test_step_verdicts_and_the_device_side_finiteness_flag():
    assert judge(0, 0, loss_scaling=True) == OK
    assert judge(0, 2, loss_scaling=True) == OVERFLOW  # fp16: finite losses, overflowed gradients
    assert judge(0, 2, loss_scaling=False) == DIVERGED
    assert judge(1, 2, loss_scaling=True) == DIVERGED  # a non-finite loss is never an overflow
    like = torch.zeros(())
    assert nonfinite_flag([torch.ones(3), None, torch.full((2, 2), 3e38)], like).item() == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert nonfinite_flag([torch.ones(3), torch.tensor([1.0, bad])], like).item() == 1.0
    assert nonfinite_flag([], like).item() == 0.0


def test_cpu_step_timer():
    timer = StepTimer(torch.device("cpu"))
    assert timer.take() == []
    for _ in range(3):
        timer.start()
        timer.stop()
    times = timer.take()
    assert len(times) == 3 and all(t >= 0 for t in times) and timer.take() == []
    with pytest.raises(RuntimeError):
        timer.stop()


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_without_launcher(monkeypatch, capsys):
    for key in LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    assert wants_bar(Terminal()) and not wants_bar(io.StringIO())
    monkeypatch.setenv("HOROVOD_RANK", "0")
    assert not wants_bar(Terminal())
    # The plain line: every progress_every_s seconds, and always at the last step.
    progress = Progress(total_steps=3, done_steps=0, epochs=1, every_s=3600.0, bar=False)
    for step in (1, 2, 3):
        progress.update(step, 1, loss=0.5, lr=0.1, images=32, mean_interval=None)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("progress: step 3/3 (100%), epoch 1/1, loss 0.5000, ")
    assert "images/s" in lines[0] and "lr 0.1" in lines[0] and "K-FAC" not in lines[0]
    assert os.environ["HOROVOD_RANK"] == "0"


@pytest.mark.cuda
def test_cuda_step_timer_reads_events_once_per_take():
    timer = StepTimer(torch.device("cuda"))
    a = torch.randn(2048, 2048, device="cuda")
    for _ in range(3):
        timer.start()
        for _ in range(10):
            a = (a @ a).tanh_()
        timer.stop()
    times = timer.take()
    assert len(times) == 3 and all(0 < t < 60 for t in times)


@pytest.mark.cuda
def test_one_cuda_rank_bf16_channels_last(tmp_path):
    """The launcher on a GPU: bf16 autocast (fp16 where the GPU has no bf16), channels_last inputs."""
    hvd = pytest.importorskip("horovod.torch")
    if not hvd.cuda_built():
        pytest.skip("this Horovod was built without CUDA: it cannot take CUDA tensors")
    from tests.helpers.jobs import job, tiny, train_cmd

    precision = "bf16" if torch.cuda.get_device_capability(0)[0] >= 8 else "fp16"
    run_dir = str(tmp_path / "run")
    proc, _ = job(
        "none",
        train_cmd(
            tiny(
                run_dir,
                "train.device=cuda",
                f"train.precision={precision}",
                "train.channels_last=true",
                "train.cudnn_benchmark=true",
                "horovod.allow_host_collectives=true",
                "train.world_size=1",
            )
        ),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(line.startswith("device: cuda (train.device; ") for line in proc.stdout.splitlines())
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["device"].startswith("cuda") and summary["rank_state_finite"] == [True]
    assert summary["train_time_s"] > 0 and sum(summary["kfac"]["seconds"].values()) > 0
