"""Host synchronisations of one training step of the loop: at most one on a step that is not logged (the
status read), at most two on a logged step (plus the read of what the record needs).

Counted: every way a tensor's value reaches the host (``item``, ``tolist``, ``numpy``, ``bool()``,
``float()``, ``int()``, ``index``) and explicit CUDA synchronisations, around ``launch.training.loop.run_step``
(the whole step with its bookkeeping, logging and progress line). K-FAC's own reads inside
``kfac.step``/``skip_step``/``collect_times`` are the library's and are not counted here.

The measurement runs in a fresh process (it initialises Horovod as a world of one, which must not
leak into other tests): ``python tests/launch/training/test_host_syncs.py OVERRIDES...`` prints the counts.
"""

import contextlib
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.common import PYTHON, env, horovod_ready
from tests.helpers.jobs import DEMO

needs_horovod = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")


@contextlib.contextmanager
def library_reads_excluded(kfac, counter):
    """K-FAC's own reads (kfac.step, skip_step, collect_times) are the library's: left out here."""
    if kfac is None:
        yield
        return
    originals = {name: getattr(kfac, name) for name in ("step", "skip_step", "collect_times")}

    def paused(method):
        def call(*args, **kwargs):
            with counter.paused():
                return method(*args, **kwargs)

        return call

    for name, method in originals.items():
        setattr(kfac, name, paused(method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(kfac, name, method)


def measure(overrides, steps=4):
    """Counts per step of a one-rank run (log.every_steps=2: steps 2 and 4 are logged)."""
    import torch

    from kfac_hvd.diagnostics import HostSyncCounter
    from launch.config.load import load_config, resolve_paths
    from launch.record.progress import Progress
    from launch.record.writer import RunOutputs
    from launch.training.guards import Watchdog
    from launch.training.loop import EpochTally, run_step
    from launch.training.resume import resume_or_start
    from launch.training.set_up import set_up

    cfg = load_config(
        DEMO,
        [
            "data.train_subset=128",
            "data.val_subset=32",
            "data.batch_size=8",
            "model.width=4",
            "train.epochs=1",
            "train.world_size=1",
            "log.tensorboard=false",
            "log.every_steps=2",
            "checkpoint.every_epochs=0",
            *overrides,
        ],
    )
    resolve_paths(cfg)
    run = set_up(cfg)
    state = resume_or_start(run, [])
    run.out = RunOutputs(cfg, None)
    run.watchdog = Watchdog(None, 0)
    run.progress = Progress(run.total_steps, 0, 1, every_s=0.0, bar=False)  # a progress line every step
    tally = EpochTally(torch.zeros(2, dtype=torch.float64, device=run.device))
    batches = iter(run.train_loader)
    counts, verdicts, where = [], [], []
    for _ in range(steps):
        x, y = next(batches)  # loading a batch is not part of the count
        run.timer.start()
        with HostSyncCounter() as counter, library_reads_excluded(run.kfac, counter):
            outcome = run_step(run, state, tally, x, y)
        counts.append(counter.count)
        verdicts.append(outcome.verdict)
        where.append(counter.where)
    run.out.close()
    return {"counts": counts, "verdicts": verdicts, "where": where}


def measured(tmp_path, *overrides):
    proc = subprocess.run(
        [PYTHON, "-m", __name__, f"log.dir={tmp_path}/run", *overrides],
        env=env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_horovod
@pytest.mark.parametrize(
    "overrides",
    [
        # K-FAC with kl_clip (a kl_scale to log), fp16 (a loss scale to log), mixup, weight rescaling.
        (
            "train.precision=fp16",
            "data.mixup_alpha=0.4",
            "optim.weight_rescaling=true",
            "optim.weight_decay=0",
        ),
        ("train.precision=bf16", "train.channels_last=true"),
        # Plain SGD: nothing device-side to log, so a logged step reads nothing more.
        ("optim.method=sgd", "optim.weight_rescaling=true", "optim.weight_decay=0"),
    ],
    ids=["kfac-fp16", "kfac-bf16", "sgd"],
)
def test_one_read_per_step_and_one_more_when_logged(tmp_path, overrides):
    result = measured(tmp_path, *overrides)
    counts, where = result["counts"], result["where"]
    assert result["verdicts"] == ["ok"] * 4
    unlogged, logged = counts[0::2], counts[1::2]  # steps 1, 3 | steps 2, 4
    assert unlogged == [1, 1], where
    expected_logged = 1 if "optim.method=sgd" in overrides else 2
    assert logged == [expected_logged] * 2, where


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(json.dumps(measure(sys.argv[1:])))
