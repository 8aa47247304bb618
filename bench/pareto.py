"""Adaptive against fixed intervals over long runs, the noise-aware Diff, and λ across batch sizes.

    .venv/bin/python -m bench.pareto                 # every run (about 2 hours on 2 cores)
    .venv/bin/python -m bench.pareto --report-only   # tables and plots from finished runs

Fashion-MNIST at 14x14 (configs/fashion_mnist/long_run.yaml: the demo's small ResNet, 19 K-FAC layers),
2 ranks under horovodrun --gloo, 256 images per rank (global batch 512), 12 epochs = 1,404 steps, the
same hyperparameters and kl_clip for every K-FAC run. Seeds 0 and 1 for every point of the front:

- SGD; fixed intervals k = 1, 2, 4, 8, 16, 32, 64, 128 (k = 1: every step);
- λ = 0.1, 0.25, 0.5 with the raw Diff and with the noise-aware Diff (modulo, the paper's rule);
- λ = 0.25 with ``since_last``, raw and noise-aware;
- without kl_clip: fixed k = 4 and the raw λ whose clipped runs' traffic is nearest k = 4's;
- batch transfer (seed 0): λ = 0.25, raw and noise-aware, at global batches 64 and 512 for 2 epochs
  (learning rate scaled with the batch), every step logged.

Finished runs (summary.json present) are not run again, so the sweep resumes where it stopped. Writes
docs/results/pareto/{pareto.md,runs.json,front.png,transfer.png}.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench._common import REPO, train_on_two_ranks
from launch.record.reader import read_summary

ROOT = Path(REPO)

CONFIG = "configs/fashion_mnist/long_run.yaml"
FIXED = (1, 2, 4, 8, 16, 32, 64, 128)
LAMBDAS = (0.1, 0.25, 0.5)
TRANSFER_BATCHES = (64, 512)
Run = tuple[str, str, list[str]]  # name, label, overrides


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--runs-dir", default="runs/pareto")
    parser.add_argument("--out", default="docs/results/pareto")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="run only these run names (debugging)")
    return parser.parse_args()


def front_runs() -> list[Run]:
    runs: list[Run] = [("sgd", "SGD", ["optim.method=sgd"])]
    runs += [
        (
            f"fixed{k}",
            f"fixed k = {k}" if k > 1 else "every step (k = 1)",
            ["kfac.update_threshold=null", f"kfac.update_interval={k}"],
        )
        for k in FIXED
    ]
    for noise, tag in ((False, "raw"), (True, "noise")):
        for lam in LAMBDAS:
            runs.append(
                (
                    f"{tag}{lam}",
                    f"λ = {lam}, {tag} Diff",
                    [f"kfac.update_threshold={lam}", f"kfac.noise_aware_diff={str(noise).lower()}"],
                )
            )
        runs.append(
            (
                f"{tag}0.25_since_last",
                f"λ = 0.25, {tag} Diff, since_last",
                [
                    "kfac.update_threshold=0.25",
                    f"kfac.noise_aware_diff={str(noise).lower()}",
                    "kfac.interval_policy=since_last",
                ],
            )
        )
    return runs


def no_clip_runs(lam: float) -> list[Run]:
    return [
        (
            "noclip_fixed4",
            "fixed k = 4, no kl_clip",
            ["kfac.update_threshold=null", "kfac.update_interval=4", "kfac.kl_clip=null"],
        ),
        (
            f"noclip_raw{lam}",
            f"λ = {lam}, raw Diff, no kl_clip",
            [f"kfac.update_threshold={lam}", "kfac.kl_clip=null"],
        ),
    ]


def transfer_runs() -> list[Run]:
    runs = []
    for batch in TRANSFER_BATCHES:
        lr = 0.1 * batch / 512  # linear scaling from the long runs' lr 0.1 at 512
        common = [
            f"data.batch_size={batch // 2}",
            "train.epochs=2",
            "optim.poly_end_epoch=2.0",
            f"optim.lr={lr:g}",
            f"optim.warmup_init_lr={lr / 10:g}",
            "optim.warmup_epochs=0.25",
            "kfac.update_threshold=0.25",
            "train.eval_every=0",
        ]
        for noise, tag in ((False, "raw"), (True, "noise")):
            runs.append(
                (
                    f"transfer_b{batch}_{tag}",
                    f"batch {batch}, λ = 0.25, {tag} Diff",
                    common + [f"kfac.noise_aware_diff={str(noise).lower()}"],
                )
            )
    return runs


def run_one(args: argparse.Namespace, name: str, overrides: list[str], seed: int) -> Path:
    run_dir = ROOT / args.runs_dir / f"{name}_s{seed}"
    if (run_dir / "summary.json").exists() or args.report_only:
        return run_dir
    # 256 images per rank unless the run sets its own batch (the transfer runs).
    batch = [] if any(item.startswith("data.batch_size=") for item in overrides) else ["data.batch_size=256"]
    train_on_two_ranks(
        "pareto",
        f"{name} seed {seed}",
        str(run_dir),
        [
            "--config",
            CONFIG,
            *overrides,
            f"train.seed={seed}",
            f"log.dir={run_dir}",
            "train.world_size=2",
            *batch,
        ],
    )
    return run_dir


def ratio_of(run_dir: Path) -> float:
    summary = read_summary(str(run_dir))
    assert summary is not None  # only finished runs are asked
    return summary["fisher"]["ratio"]


def main() -> int:
    args = parse_args()
    os.environ.setdefault("MPLBACKEND", "Agg")
    runs: dict[tuple[str, int], tuple[str, Path]] = {}

    def do(plan: list[Run], seeds: list[int]) -> None:
        for name, label, overrides in plan:
            if args.only is not None and name not in args.only:
                continue
            for seed in seeds:
                path = run_one(args, name, overrides, seed)
                if (path / "summary.json").exists():
                    runs[(name, seed)] = (label, path)

    do(front_runs(), args.seeds)
    # The no-clip pair: fixed k = 4 against the raw λ whose (clipped) traffic is nearest k = 4's.
    fixed4 = [ratio_of(path) for (name, _), (_, path) in runs.items() if name == "fixed4"]
    if fixed4:
        target = sum(fixed4) / len(fixed4)
        candidates = {
            lam: [ratio_of(path) for (name, _), (_, path) in runs.items() if name == f"raw{lam}"]
            for lam in LAMBDAS
        }
        candidates = {lam: sum(r) / len(r) for lam, r in candidates.items() if r}
        if candidates:
            nearest = min(candidates, key=lambda lam: abs(candidates[lam] - target))
            do(no_clip_runs(nearest), args.seeds)
    do(transfer_runs(), args.seeds[:1])
    from bench.report_pareto import write_report

    write_report(runs, ROOT / args.out, ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
