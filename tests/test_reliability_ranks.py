"""A rank that dies or hangs mid-run ends the whole job with an error in bounded time, never a hang."""
import shutil

import pytest

from launch.config import load_config
from launch.dist import horovod_env
from launch_helpers.common import horovod_ready
from launch_helpers.jobs import DEMO, job, rank_lines, tiny, train_cmd

needs_horovod = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")
BOUND = 120      # seconds from launch to the end of the job, start-up included


def test_horovod_timeouts_reach_the_environment():
    cfg = load_config(DEMO, ["horovod.stall_check_s=30", "horovod.stall_shutdown_s=120",
                             "horovod.gloo_timeout_s=60"])
    env = horovod_env(cfg.horovod)
    assert env["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "30"
    assert env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "120"
    assert env["HOROVOD_GLOO_TIMEOUT_SECONDS"] == "60"
    assert horovod_env(load_config(DEMO, ["horovod.stall_check_s=0"]).horovod)["HOROVOD_STALL_CHECK_DISABLE"] == "1"
    assert not any(k.startswith(("HOROVOD_STALL", "HOROVOD_GLOO")) for k in horovod_env(load_config(DEMO).horovod))


@needs_horovod
def test_killed_rank_ends_the_job_under_horovodrun(tmp_path):
    """Rank 1 is SIGKILLed after step 2 of 12; rank 0 must not wait for it."""
    proc, seconds = job("horovodrun", train_cmd(tiny(str(tmp_path / "run"), "train.epochs=3",
                                                      "debug.kill_step=2", "debug.fault_rank=1")),
                        timeout=2 * BOUND)
    assert proc.returncode != 0
    assert "debug.kill_step: rank 1 sends itself SIGKILL after step 2" in proc.stderr
    assert seconds < BOUND, seconds
    rank0 = rank_lines(proc.stdout + proc.stderr, 0)
    # Rank 0 either noticed the lost peer itself (exit code 3, one line) or horovodrun ended it first.
    assert any(l.startswith("error: rank 0: Horovod shut down") for l in rank0) or \
        "Terminated" in "\n".join(rank0), "\n".join(rank0[-20:])
    assert not any("Traceback" in l for l in rank0)


@needs_horovod
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
def test_hung_rank_ends_the_job_through_the_watchdog_under_mpirun(tmp_path):
    """Rank 1 stops making progress at step 2 (alive, its Horovod thread still answering, so neither
    MPI nor Horovod notices); the watchdog ends it after train.watchdog_s, and mpirun the job."""
    proc, seconds = job("mpirun", train_cmd(tiny(str(tmp_path / "run"), "train.epochs=3", "debug.hang_step=2",
                                                  "debug.fault_rank=1", "train.watchdog_s=10")),
                        timeout=2 * BOUND)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "debug.hang_step: this rank stops making progress at step 2" in proc.stderr
    assert "no progress for" in proc.stderr and "train.watchdog_s = 10" in proc.stderr
    assert seconds < BOUND, seconds
