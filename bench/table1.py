"""Table 1 at small scale: Fashion-MNIST, 2 ranks under horovodrun, the small ResNet.

    .venv/bin/python -m bench.table1                 # all runs (about an hour on 2 cores)
    .venv/bin/python -m bench.table1 --report-only   # tables and plots from finished runs
    .venv/bin/python -m bench.table1 --batchnorm-fisher full --runs-dir runs/table1_full \
        --out docs/results/table1_bn/full --only kfac_every_step lambda0.2 lambda0.25 lambda0.3
                                                     # the same with 2Cx2C BatchNorm blocks

Runs (identical hyperparameters, configs/fashion_mnist/base.yaml plus the overrides below, each seed):
SGD; K-FAC every step; K-FAC λ = 0.2, 0.25, 0.3 (modulo, the paper's rule); λ = 0.25 since_last; and
K-FAC with a fixed interval k chosen to match the traffic of the λ = 0.2 and λ = 0.3 runs. Finished runs
(summary.json present) are not run again. Writes docs/results/table1/{table1.md,runs.json,*.png}.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import numpy as np

from bench._common import REPO, train_on_two_ranks
from kfac_hvd.timeline import read_collectives
from launch.record.reader import read_run

ROOT = Path(REPO)

BASE_CONFIG = "configs/fashion_mnist/base.yaml"
ADAPTIVE = [
    ("lambda0.2", "λ = 0.2", 0.2, "modulo"),
    ("lambda0.25", "λ = 0.25", 0.25, "modulo"),
    ("lambda0.3", "λ = 0.3", 0.3, "modulo"),
    ("lambda0.25_since_last", "λ = 0.25, since_last", 0.25, "since_last"),
]
TIMELINE_RUN = ("lambda0.25", 0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=7680, help="training images (of 60,000)")
    parser.add_argument("--val-subset", type=int, default=5000, help="test images (of 10,000)")
    parser.add_argument("--runs-dir", default="runs/table1")
    parser.add_argument("--out", default="docs/results/table1")
    parser.add_argument("--target", type=float, default=0.80, help="top-1 for the epochs-to-target plot")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--batchnorm-fisher",
        choices=["unit_wise", "full"],
        default="unit_wise",
        help="BatchNorm's Fisher blocks in every K-FAC run (kfac.batchnorm_fisher)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="RUN",
        help="run (and report) only these runs, by name: sgd, kfac_every_step, lambda0.2, ... fixed_every2",
    )
    return parser.parse_args()


def common_overrides(args: argparse.Namespace, seed: int, run_dir: Path) -> list:
    return [
        f"train.seed={seed}",
        f"train.epochs={args.epochs}",
        f"data.train_subset={args.train_subset}",
        f"data.val_subset={args.val_subset}",
        f"optim.poly_end_epoch={args.epochs}",
        f"log.dir={run_dir}",
        "log.progress=false",
        "log.tensorboard=false",
        "checkpoint.every_epochs=0",
    ]


def run_one(args, name: str, overrides: list, seed: int) -> Path:
    run_dir = ROOT / args.runs_dir / f"{name}_s{seed}"
    if (run_dir / "summary.json").exists():
        return run_dir
    extra = []
    if (name, seed) == TIMELINE_RUN:
        extra = [f"horovod.timeline={run_dir / 'timeline.json'}"]
    train_on_two_ranks(
        "table1",
        f"{name} seed {seed}",
        str(run_dir),
        ["--config", BASE_CONFIG, *overrides, *common_overrides(args, seed, run_dir), *extra],
    )
    return run_dir


def load_run(run_dir: Path) -> dict:
    """The summary and, at each record with Fisher traffic (none for SGD), the cumulative payload and
    every layer's interval and due flag."""
    log = read_run(str(run_dir))
    payload = log.fisher_payload_bytes
    kept = np.isfinite(payload) if payload is not None else np.zeros(len(log.steps), bool)
    intervals = log.interval[:, kept].T if log.interval is not None else np.zeros((kept.sum(), 0))
    due = log.due[:, kept] if log.due is not None else np.zeros((0, kept.sum()), bool)
    return {
        "summary": log.summary,
        "steps": log.steps[kept].tolist(),
        "cumulative_payload_bytes": [int(b) for b in payload[kept]] if payload is not None else [],
        "intervals": [[int(k) for k in row] for row in intervals],
        "due_layers": due.sum(axis=0).tolist(),
        "layer_names": log.layers if len(intervals) and log.layers else [],
    }


def fixed_interval_for(ratio: float) -> int:
    return max(2, round(1.0 / ratio))


def main() -> int:
    args = parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    plan = [
        ("sgd", "SGD", ["optim.method=sgd"]),
        ("kfac_every_step", "K-FAC every step (λ = –)", ["optim.method=kfac", "kfac.update_threshold=null"]),
    ]
    plan += [
        (name, label, ["optim.method=kfac", f"kfac.update_threshold={lam}", f"kfac.interval_policy={policy}"])
        for name, label, lam, policy in ADAPTIVE
    ]
    bn = [f"kfac.batchnorm_fisher={args.batchnorm_fisher}"]
    plan = [(name, label, overrides + (bn if name != "sgd" else [])) for name, label, overrides in plan]
    if args.only:
        plan = [entry for entry in plan if entry[0] in args.only]
    runs = {}
    for name, label, overrides in plan:
        for seed in args.seeds:
            if args.report_only and not (ROOT / args.runs_dir / f"{name}_s{seed}" / "summary.json").exists():
                continue
            runs[(name, seed)] = (label, run_one(args, name, overrides, seed))
    # Fixed intervals matched to the traffic of the λ = 0.2 and λ = 0.3 runs (mean ratio over seeds).
    fixed = []
    for reference in ("lambda0.2", "lambda0.3"):
        ratios = [
            load_run(path)["summary"]["fisher"]["ratio"]
            for (name, _), (_, path) in runs.items()
            if name == reference
        ]
        if ratios:
            k = fixed_interval_for(statistics.mean(ratios))
            if k not in fixed:
                fixed.append(k)
    for k in fixed:
        name = f"fixed_every{k}"
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            if args.report_only and not (ROOT / args.runs_dir / f"{name}_s{seed}" / "summary.json").exists():
                continue
            runs[(name, seed)] = (
                f"K-FAC fixed interval {k}",
                run_one(
                    args,
                    name,
                    ["optim.method=kfac", "kfac.update_threshold=null", f"kfac.update_interval={k}", *bn],
                    seed,
                ),
            )
    report(args, runs, out)
    return 0


def report(args, runs: dict, out: Path) -> None:
    from bench.report_table1 import write_report

    loaded = {key: (label, load_run(path)) for key, (label, path) in runs.items()}
    timeline = None
    if TIMELINE_RUN in runs and (runs[TIMELINE_RUN][1] / "timeline.json").exists():
        timeline = read_collectives(str(runs[TIMELINE_RUN][1] / "timeline.json"))
    write_report(args, loaded, timeline, out)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    raise SystemExit(main())
