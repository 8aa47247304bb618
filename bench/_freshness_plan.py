"""The sweep of freshness.py: its regimes, its schedules, the order they run in, where each run's folder
is and what a finished run gives the report (read by freshness.py and report_freshness.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from launch.record.reader import read_summary

CONFIG = "configs/fashion_mnist/small_resnet_kfac_every_step.yaml"
BASE = [
    "train.world_size=1",
    "data.batch_size=128",
    "data.train_subset=10000",
    "data.val_subset=null",
    "data.fashion_mnist_pool=2",
    "optim.lr=0.05",
    "optim.warmup_init_lr=0.005",
    "optim.warmup_epochs=0.2",
    "optim.poly_power=1.0",
    "optim.poly_start_epoch=0.0",
    "optim.poly_end_epoch=3.0",
    "optim.momentum=0.9",
    "kfac.kl_clip=null",
    "train.epochs=3",
    "train.eval_every=0",
    "checkpoint.every_epochs=0",
    "log.tensorboard=false",
    "log.progress=false",
    "train.threads=1",
]
COLLAPSED_TOP1 = 0.20  # a finished run below this top-1 has collapsed
DECISION_SPREAD = 0.02  # seed-0 top-1 range (over the K-FAC schedules) that calls for more seeds
NICE = 10


@dataclass(frozen=True)
class Regime:
    name: str
    label: str
    overrides: tuple[str, ...] = ()
    ranks: int = 1


REGIMES = (
    Regime("base", "14x14, batch 128, 1 process, lr 0.05, no kl_clip"),
    Regime("clip", "kl_clip 1e-3", ("kfac.kl_clip=0.001",)),
    Regime("b512", "batch 512 (57 steps)", ("data.batch_size=512",)),
    Regime("lr2", "lr 0.1", ("optim.lr=0.1", "optim.warmup_init_lr=0.01")),
    Regime("np2", "2 ranks x 64", ("data.batch_size=64", "train.world_size=2"), ranks=2),
    Regime("full28", "28x28 images (not pooled)", ("data.fashion_mnist_pool=1",)),
)


def _fixed(k: int, warmup: float = 0.0) -> tuple[str, ...]:
    return (
        "kfac.update_threshold=null",
        f"kfac.update_interval={k}",
        f"kfac.interval_warmup_epochs={warmup:g}",
    )


def _adaptive(lam: float, noise: bool, policy: str = "modulo") -> tuple[str, ...]:
    return (
        f"kfac.update_threshold={lam}",
        f"kfac.noise_aware_diff={str(noise).lower()}",
        f"kfac.interval_policy={policy}",
    )


# name -> (label, overrides); the name's prefix is the family the report groups by.
SCHEDULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "sgd": ("SGD", ("optim.method=sgd",)),
    "fixed1": ("every step (k = 1)", _fixed(1)),
    "fixed2": ("fixed k = 2", _fixed(2)),
    "fixed5": ("fixed k = 5", _fixed(5)),
    "fixed10": ("fixed k = 10", _fixed(10)),
    "fixed20": ("fixed k = 20", _fixed(20)),
    "warm1_k5": ("1 epoch every step, then k = 5", _fixed(5, 1.0)),
    "warm1_k20": ("1 epoch every step, then k = 20", _fixed(20, 1.0)),
    "warm0.2_k20": ("0.2 epoch every step, then k = 20", _fixed(20, 0.2)),
    "raw0.25": ("λ = 0.25, raw Diff", _adaptive(0.25, False)),
    "raw0.5": ("λ = 0.5, raw Diff", _adaptive(0.5, False)),
    "noise0.25": ("λ = 0.25, noise-aware Diff", _adaptive(0.25, True)),
    "noise0.5": ("λ = 0.5, noise-aware Diff", _adaptive(0.5, True)),
    "since0.5": ("λ = 0.5, raw Diff, since_last", _adaptive(0.5, False, "since_last")),
}
# The base regime's runs, most telling first (an interrupted sweep keeps these).
BASE_ORDER = (
    "fixed1",
    "fixed5",
    "fixed20",
    "raw0.5",
    "noise0.5",
    "warm1_k20",
    "warm0.2_k20",
    "fixed2",
    "raw0.25",
    "noise0.25",
    "since0.5",
    "warm1_k5",
    "sgd",
    "fixed10",
)
# Seeds 1 and 2 of the base regime: the fixed front and the schedules near the adaptive runs' work.
BASE_SEEDED = (
    "fixed1",
    "fixed2",
    "fixed5",
    "fixed10",
    "fixed20",
    "warm1_k20",
    "warm0.2_k20",
    "raw0.5",
    "noise0.25",
    "noise0.5",
)
BASE_SEEDED_LAST = ("since0.5", "raw0.25", "warm1_k5")
# A variation runs the fixed front, the short warm-up and λ = 0.5; 2 ranks (two processes and a horovodrun
# start each) the fewest of them that still decide.
VARIATION_SCHEDULES = (
    "fixed1",
    "fixed2",
    "fixed5",
    "fixed10",
    "fixed20",
    "warm0.2_k20",
    "raw0.5",
    "noise0.5",
    "warm1_k20",
)
TWO_RANK_SCHEDULES = ("fixed5", "fixed10", "fixed20", "raw0.5", "noise0.5")
DECIDING = (
    "fixed5",
    "fixed10",
    "fixed20",
    "warm0.2_k20",
    "warm1_k20",
    "raw0.5",
    "noise0.5",
)  # seeds 1-2 of a variation
FULL_SIZE_SCHEDULES = (
    "sgd",
    "fixed2",
    "fixed5",
    "fixed10",
    "fixed20",
    "warm0.2_k20",
    "raw0.5",
    "noise0.5",
    "warm1_k20",
)


def run_dir(runs_dir: Path, regime: str, schedule: str, seed: int) -> Path:
    return runs_dir / f"{regime}__{schedule}_s{seed}"


def finished(path: Path) -> bool:
    return (path / "summary.json").exists() or (path / "outcome.json").exists()


def outcome(path: Path) -> dict | None:
    """What a finished run gives the report: top-1, factor work, and whether it diverged or collapsed."""
    summary = read_summary(str(path))
    if summary is not None:
        top1 = summary.get("final_top1")
        fisher = summary.get("fisher") or {}
        finite = all(summary.get("rank_state_finite") or [True])
        status = "diverged" if not finite or top1 is None else "collapsed" if top1 < COLLAPSED_TOP1 else "ok"
        return {
            "status": status,
            "top1": top1,
            "work": fisher.get("compute_ratio"),
            "traffic": fisher.get("ratio"),
            "skipped_steps": summary.get("skipped_step_count", 0),
            "wall_s": summary.get("wall_time_s"),
            "mean_interval": (summary.get("kfac") or {}).get("mean_interval"),
            "steps": summary.get("steps"),
        }
    if (path / "outcome.json").exists():
        return json.loads((path / "outcome.json").read_text())
    return None
