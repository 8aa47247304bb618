"""Where stale curvature costs accuracy: fixed intervals (with and without a warm-up of fresh factors)
against the adaptive interval, at equal factor work, in a base regime and one axis changed at a time.

    .venv/bin/python -m bench.freshness --deadline 10:40   # no run starts after 10:40 UTC
    .venv/bin/python -m bench.freshness --report-only      # table, runs.json and plot from finished runs

The base regime is Fashion-MNIST as a new user first tries it: the demo's small ResNet (19 K-FAC layers),
one process, batch 128, 10,000 training images for 3 epochs (234 steps), lr 0.05 with a 0.2-epoch warm-up
and linear decay to 0, momentum 0.9, **no kl_clip**, the whole test set; the images average-pooled to
14x14, which halves a run's cost (the machine is shared). Each variation changes one axis: kl_clip 1e-3,
batch 512 (the same 3 epochs: 57 steps), lr 0.1, 2 ranks of 64 (horovodrun --gloo), 28x28 images. The
schedules (SCHEDULES): SGD; fixed k = 1, 2, 5, 10, 20; k = 5 and 20 after one epoch of every-step updates,
k = 20 after 0.2 epochs (kfac.interval_warmup_epochs); λ = 0.25 and 0.5 with the raw and the noise-aware
Diff (modulo); λ = 0.5, raw, since_last.

Order (so that an interrupted sweep has the most useful runs): the base regime, seed 0 (BASE_ORDER);
kl_clip, seed 0; the base regime, seeds 1 and 2 (BASE_SEEDED); the other variations, seed 0
(VARIATION_SCHEDULES, TWO_RANK_SCHEDULES at 2 ranks) and 28x28 images (FULL_SIZE_SCHEDULES); then seeds
1 and 2 of DECIDING in each variation, first those whose seed-0 runs are near a decision (a run collapsed
or diverged, or two schedules' top-1 differ by more than DECISION_SPREAD), the widest first; last, every
step on 28x28 images, seeds 1 and 2 of BASE_SEEDED_LAST, and of k = 1 and 2 in clip, b512 and lr2, and SGD
at batch 512 and lr 0.1. Every
run has one thread per rank at nice 10; the single-rank runs of a sweep thread share one process
(_train_worker.py), the 2-rank runs start under horovodrun. Finished runs (summary.json, or outcome.json
for a run that stopped) are kept in runs/freshness/<regime>__<schedule>_s<seed>/ and not run again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench._common import REPO, TrainWorker, train
from bench._freshness_plan import (
    BASE,
    BASE_ORDER,
    BASE_SEEDED,
    BASE_SEEDED_LAST,
    CONFIG,
    DECIDING,
    DECISION_SPREAD,
    FULL_SIZE_SCHEDULES,
    NICE,
    REGIMES,
    SCHEDULES,
    TWO_RANK_SCHEDULES,
    VARIATION_SCHEDULES,
    Regime,
    finished,
    outcome,
    run_dir,
)
from launch.errors import EXIT_DIVERGED

ROOT = Path(REPO)


_workers = threading.local()


def run_one(runs_dir: Path, regime: Regime, schedule: str, seed: int) -> None:
    path = run_dir(runs_dir, regime.name, schedule, seed)
    if finished(path):
        return
    shutil.rmtree(path, ignore_errors=True)  # an interrupted run starts again from step 0
    label, overrides = SCHEDULES[schedule]
    start = time.time()
    argv = ["--config", CONFIG, *BASE, *regime.overrides, *overrides, f"train.seed={seed}", f"log.dir={path}"]
    name = f"{regime.name} / {schedule} / seed {seed}"
    if not hasattr(_workers, "worker"):
        _workers.worker = TrainWorker(nice=NICE)
    code = train("freshness", name, str(path), argv, ranks=regime.ranks, nice=NICE, worker=_workers.worker)
    if code == 0 and (path / "summary.json").exists():
        return
    status = "diverged" if code == EXIT_DIVERGED else "failed"
    (path / "outcome.json").write_text(
        json.dumps(
            {"status": status, "exit": code, "top1": None, "work": None, "wall_s": time.time() - start}
        )
    )


def decision_spread(runs_dir: Path, regime: str) -> float | None:
    """How far a regime's seed-0 K-FAC runs are from a tie: their top-1 range, 1 when a run collapsed or
    diverged; None below DECISION_SPREAD."""
    results = [outcome(run_dir(runs_dir, regime, s, 0)) for s in SCHEDULES if s != "sgd"]
    results = [r for r in results if r is not None]
    if any(r["status"] != "ok" for r in results):
        return 1.0
    top1 = [r["top1"] for r in results]
    spread = max(top1) - min(top1) if top1 else 0.0
    return spread if spread > DECISION_SPREAD else None


def plan_phases(runs_dir: Path) -> list[tuple[str, Callable[[], list[tuple[Regime, str, int]]]]]:
    regimes = {r.name: r for r in REGIMES}
    base, variations = regimes["base"], REGIMES[1:]

    def schedules_of(regime: Regime) -> tuple[str, ...]:
        if regime.name == "full28":
            return FULL_SIZE_SCHEDULES
        return TWO_RANK_SCHEDULES if regime.ranks > 1 else VARIATION_SCHEDULES

    def by_decision() -> list[tuple[Regime, str, int]]:
        spreads = {r.name: decision_spread(runs_dir, r.name) for r in variations}
        chosen = sorted(
            (r for r in variations if spreads[r.name] is not None), key=lambda r: -spreads[r.name]
        )
        tied = [r for r in variations if spreads[r.name] is None]
        return [
            (r, s, seed) for r in chosen + tied for seed in (1, 2) for s in DECIDING if s in schedules_of(r)
        ]

    others = [r for r in variations if r.name not in ("clip", "full28")]
    return [
        ("base regime, seed 0", lambda: [(base, s, 0) for s in BASE_ORDER]),
        ("kl_clip, seed 0", lambda: [(regimes["clip"], s, 0) for s in VARIATION_SCHEDULES]),
        ("base regime, seeds 1-2", lambda: [(base, s, seed) for seed in (1, 2) for s in BASE_SEEDED]),
        ("the other variations, seed 0", lambda: [(r, s, 0) for r in others for s in schedules_of(r)]),
        ("28x28 images, seed 0", lambda: [(regimes["full28"], s, 0) for s in FULL_SIZE_SCHEDULES]),
        ("variations, seeds 1-2, those near a decision first (widest first)", by_decision),
        (
            "the rest: every step on 28x28 images, seed 0; the other base schedules, seeds 1-2",
            lambda: (
                [(regimes["full28"], "fixed1", 0)]
                + [(base, s, seed) for seed in (1, 2) for s in BASE_SEEDED_LAST]
            ),
        ),
        (
            "the fixed front's upper end, seeds 1-2; SGD at batch 512 and lr 0.1",
            lambda: (
                [
                    (regimes[r], s, seed)
                    for r in ("clip", "b512", "lr2")
                    for seed in (1, 2)
                    for s in ("fixed1", "fixed2")
                ]
                + [(regimes[r], "sgd", 0) for r in ("b512", "lr2")]
            ),
        ),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs-dir", default="runs/freshness")
    parser.add_argument("--out", default="docs/results/freshness")
    parser.add_argument("--workers", type=int, default=3, help="runs at a time")
    parser.add_argument("--deadline", default=None, help="HH:MM (UTC): start no run after this time")
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args()


def deadline_of(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    hour, minute = (int(part) for part in text.split(":"))
    return now.replace(hour=hour, minute=minute, second=0, microsecond=0)


def main() -> int:
    args = parse_args()
    os.environ.setdefault("MPLBACKEND", "Agg")
    runs_dir = ROOT / args.runs_dir
    deadline = deadline_of(args.deadline)
    sweep_start = time.time()
    if not args.report_only:

        def job(item: tuple[Regime, str, int]) -> None:
            if deadline is not None and datetime.datetime.now(datetime.timezone.utc) >= deadline:
                return
            run_one(runs_dir, *item)

        with ThreadPoolExecutor(max_workers=args.workers) as pool:  # its threads keep their workers
            for title, jobs in plan_phases(runs_dir):
                jobs = jobs()
                todo = [job for job in jobs if not finished(run_dir(runs_dir, job[0].name, job[1], job[2]))]
                print(f"[freshness] {title}: {len(todo)} of {len(jobs)} runs to do", flush=True)
                list(pool.map(job, todo))
        print(f"[freshness] sweep: {(time.time() - sweep_start) / 60:.1f} min", flush=True)
    from bench.report_freshness import write_report

    write_report(runs_dir, ROOT / args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
