"""A rank that dies or hangs mid-run ends the whole job with an error in bounded time, never a hang."""

import os
import re
import shutil
import signal

import pytest
from tests.helpers.common import describe, horovod_ready
from tests.helpers.jobs import (
    DEMO,
    first_failure,
    job,
    rank_exit_codes,
    rank_lines,
    recorded_train,
    tiny,
    train_cmd,
)

from launch.config.load import load_config
from launch.dist.horovod_setup import horovod_env

needs_horovod = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")
BOUND = 120  # seconds from launch to the end of the job, start-up included
EXIT_ABORTED = 3  # docs/RELIABILITY.md: the job cannot go on (a rank died, hung or stopped answering)
# The two lines of docs/RELIABILITY.md for exit code 3 (a lost peer; the watchdog).
PEER_LOST = re.compile(
    r"error: rank 0: Horovod shut down: another rank failed, exited or stopped answering "
    r"\(HorovodInternalError: .+\)"
)
WATCHDOG = re.compile(
    r"error: rank (?P<rank>\d+): no progress for (?P<idle>\d+) s \(train\.watchdog_s = "
    r"(?P<limit>\d+)\) since (?P<since>[^;]+); a rank died, hung or stopped answering\. "
    r"Exiting with code 3 so the job ends instead of hanging\."
)


def watchdog_line(line, *, rank, watchdog_s):
    """The watchdog's line of ``rank``, checked; it fired after watchdog_s, not much later."""
    match = WATCHDOG.fullmatch(line)
    assert match and int(match.group("rank")) == rank and int(match.group("limit")) == watchdog_s, line
    assert watchdog_s <= int(match.group("idle")) <= watchdog_s + 3, line
    return match


def test_horovod_timeouts_reach_the_environment():
    cfg = load_config(
        DEMO, ["horovod.stall_check_s=30", "horovod.stall_shutdown_s=120", "horovod.gloo_timeout_s=60"]
    )
    env = horovod_env(cfg.horovod)
    assert env["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "30"
    assert env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "120"
    assert env["HOROVOD_GLOO_TIMEOUT_SECONDS"] == "60"
    assert (
        horovod_env(load_config(DEMO, ["horovod.stall_check_s=0"]).horovod)["HOROVOD_STALL_CHECK_DISABLE"]
        == "1"
    )
    assert not any(
        k.startswith(("HOROVOD_STALL", "HOROVOD_GLOO")) for k in horovod_env(load_config(DEMO).horovod)
    )


@needs_horovod
def test_killed_rank_ends_the_job_under_horovodrun(tmp_path):
    """Rank 1 is SIGKILLed after step 2 of 12. Rank 0 must not wait for it: its Horovod loop sees the
    connection reset and it exits 3 with the documented line, by itself.

    horovodrun SIGTERMs the other ranks as soon as one fails, faster than a Python process exits, so
    on its own it reports rank 0 as 143 (or not at all); the wrapper (jobs.recorded_train) keeps that
    SIGTERM from rank 0's launcher process and records the code rank 0 exits with."""
    out = str(tmp_path / "ranks")
    os.mkdir(out)
    args = tiny(str(tmp_path / "run"), "train.epochs=3", "debug.kill_step=2", "debug.fault_rank=1")
    proc, seconds = job("horovodrun", recorded_train(args, out), timeout=2 * BOUND)
    text = proc.stdout + proc.stderr
    rank0, rank1 = rank_lines(text, 0), rank_lines(text, 1)
    assert "debug.kill_step: rank 1 sends itself SIGKILL after step 2" in rank1, describe(proc)
    assert rank_exit_codes(out) == {0: EXIT_ABORTED, 1: 128 + signal.SIGKILL}, describe(proc)
    stops = [line for line in rank0 if line.startswith("error: ")]
    assert len(stops) == 1 and PEER_LOST.fullmatch(stops[0]), "\n".join(rank0[-20:])
    assert not any("Traceback" in line for line in rank0 + rank1)
    # What horovodrun itself reports: exit code 1, and the rank that failed first with its code.
    assert proc.returncode == 1 and first_failure(text) == (1, 128 + signal.SIGKILL), describe(proc)
    assert seconds < BOUND, seconds


@needs_horovod
def test_hung_rank_ends_the_job_through_the_watchdog_under_horovodrun(tmp_path):
    """Rank 1 stops making progress at step 2 (alive, its Horovod thread still answering, so Gloo
    does not notice). Its watchdog ends it after train.watchdog_s with exit code 3 and the watchdog's
    line; rank 0, blocked in step 2's allreduce, exits 3 as well (its own watchdog, or the lost peer,
    whichever comes first); horovodrun ends the job. Each rank's own code is recorded (see
    jobs.recorded_train), so a rank that does not end by itself shows as None."""
    watchdog_s = 5
    out = str(tmp_path / "ranks")
    os.mkdir(out)
    args = tiny(
        str(tmp_path / "run"),
        "train.epochs=3",
        "debug.hang_step=2",
        "debug.fault_rank=1",
        f"train.watchdog_s={watchdog_s}",
    )
    proc, seconds = job("horovodrun", recorded_train(args, out), timeout=BOUND)
    text = proc.stdout + proc.stderr
    rank0, rank1 = rank_lines(text, 0), rank_lines(text, 1)
    assert "WARNING: rank 1: debug.hang_step: this rank stops making progress at step 2" in rank1, describe(
        proc
    )
    assert rank_exit_codes(out) == {0: EXIT_ABORTED, 1: EXIT_ABORTED}, describe(proc)
    stops = {
        rank: [line for line in lines if line.startswith("error: ")]
        for rank, lines in ((0, rank0), (1, rank1))
    }
    assert len(stops[0]) == 1 and len(stops[1]) == 1, stops
    hung = watchdog_line(stops[1][0], rank=1, watchdog_s=watchdog_s)
    assert hung.group("since") == "step 2", stops[1][0]
    if not PEER_LOST.fullmatch(stops[0][0]):  # else rank 1's exit ended rank 0 first
        assert watchdog_line(stops[0][0], rank=0, watchdog_s=watchdog_s).group("since") == "step 2", stops[0][
            0
        ]
    assert not any("Traceback" in line for line in rank0 + rank1)
    failed = first_failure(text)
    assert proc.returncode == 1 and failed[0] in (0, 1) and failed[1] == EXIT_ABORTED, describe(proc)
    assert seconds < BOUND, seconds


@needs_horovod
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
def test_hung_rank_ends_the_job_through_the_watchdog_under_mpirun(tmp_path):
    """Rank 1 stops making progress at step 2 (alive, its Horovod thread still answering, so neither
    MPI nor Horovod notices); the watchdog ends it after train.watchdog_s, and mpirun the job."""
    proc, seconds = job(
        "mpirun",
        train_cmd(
            tiny(
                str(tmp_path / "run"),
                "train.epochs=3",
                "debug.hang_step=2",
                "debug.fault_rank=1",
                "train.watchdog_s=10",
            )
        ),
        timeout=2 * BOUND,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "debug.hang_step: this rank stops making progress at step 2" in proc.stderr
    assert "no progress for" in proc.stderr and "train.watchdog_s = 10" in proc.stderr
    assert seconds < BOUND, seconds
