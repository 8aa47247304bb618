"""A whole training run: set-up, the epochs (plain or elastic: :mod:`launch.training.elastic`), the
summary."""

from __future__ import annotations

import time

from launch.config.load import Config
from launch.training.elastic import train_elastic
from launch.training.evaluation import evaluate
from launch.training.guards import Watchdog
from launch.training.loop import start, train_epoch
from launch.training.set_up import set_up
from launch.training.summary import summarize


def run(cfg: Config, resume_candidates: list[str]) -> int:
    t_start = time.time()
    r = set_up(cfg)
    # From here to the summary a rank that stops making progress (a peer lost while the checkpoint
    # is read or broadcast, or in the closing collectives) exits instead of hanging.
    r.watchdog = Watchdog(cfg.train.watchdog_s, r.hvd.rank())
    if cfg.train.elastic:
        state = train_elastic(r, resume_candidates)
    else:
        state = start(r, resume_candidates)
        while not state.done and state.epoch < cfg.train.epochs:
            train_epoch(r, state)
            state.epoch += 1
    if r.progress is not None:
        r.progress.close()
    if not state.last_eval:  # nothing left to train (a finished run resumed): still report accuracy
        state.last_eval = evaluate(
            r.trainer.model, r.val_loader, r.trainer.precision, r.hvd, cfg.data.skip_unreadable, r.watchdog
        )
    r.watchdog.beat("the summary")
    summarize(r, state, time.time() - t_start)
    r.watchdog.stop()
    return 0
