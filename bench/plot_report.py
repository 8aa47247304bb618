"""How long `python -m launch.report RUN --plot` takes on a run of the paper's size: a synthetic
ResNet-50 run folder (the 107 K-FAC layers of torchvision's ResNet-50 in model order, 2,814 steps,
one record per step with every layer's due flag, interval, Diffs and payload, the adaptive interval
of Algorithm 1 with λ = 0.25 driven by made-up Diffs, an evaluation every 78 steps) is written, then
read, drawn and saved a few times.

    python -m bench.plot_report [--out runs/bench_plot] [--steps 2814] [--repeats 3]

Prints the seconds (wall and CPU) of each phase, median of the repeats, then the whole command's; the
figure is OUT/run/report.png."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time

from bench._common import REPO
from kfac_hvd.analysis.units import format_bytes
from kfac_hvd.cost import allreduce_wire_bytes
from kfac_hvd.scheduler import IntervalScheduler
from launch.record import plots
from launch.record.reader import read_run

STEPS_PER_EPOCH = 78
RANKS = 128


def resnet50_layers():
    """(name, is_batchnorm, payload bytes of one update) of the K-FAC layers of ResNet-50, in model order."""
    import torchvision

    from kfac_hvd.analysis.traffic import model_layers
    from kfac_hvd.cost import layer_costs

    costs = layer_costs(model_layers(torchvision.models.resnet50(weights=None))).values()
    return [(cost.name, cost.kind == "batchnorm", cost.update_payload_bytes()) for cost in costs]


def lr_at(step: int, steps: int) -> float:
    epoch, end = step / STEPS_PER_EPOCH, steps / STEPS_PER_EPOCH * 53.5 / 36
    return 0.025 if epoch < 1 else 0.025 * max(0.0, 1 - (epoch - 1) / (end - 1)) ** 8


def eval_record(step: int, top1: float) -> dict:
    return {
        "eval": {
            "epoch": step / STEPS_PER_EPOCH,
            "step": step,
            "val_top1": top1,
            "val_loss": 1.0 + 5.9 * math.exp(-step / 800),
        },
        "step": step,
    }


def write_summary(
    folder: str, steps: int, threshold: float, top1: float, mean_interval: float, sent: int, every_step: int
) -> None:
    """summary.json of the synthetic run; its traffic modelled as allreduces of the payload at RANKS ranks."""
    summary = {
        "method": "kfac",
        "steps": steps,
        "final_top1": top1,
        "wall_time_s": steps * 0.95,
        "kfac": {"update_threshold": threshold, "update_interval": 1, "mean_interval": mean_interval},
        "fisher": {
            "wire_bytes": allreduce_wire_bytes(sent, RANKS),
            "every_step_wire_bytes": allreduce_wire_bytes(every_step * steps, RANKS),
            "ratio": sent / (every_step * steps),
        },
    }
    with open(os.path.join(folder, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh)


def write_run(folder: str, steps: int, threshold: float = 0.25, seed: int = 0) -> None:
    rng = random.Random(seed)
    layers = resnet50_layers()
    names = [name for name, _, _ in layers]
    scheduler = IntervalScheduler(names, update_threshold=threshold)
    # Made-up Diffs: large at first, decaying at a layer-dependent rate, noisy; BN layers settle sooner.
    scale = {name: rng.uniform(0.3, 2.0) * (0.5 if bn else 1.0) for name, bn, _ in layers}
    rate = {name: rng.uniform(100, 1500) for name in names}
    every_step = sum(p for _, _, p in layers)
    sent = 0
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w", encoding="utf-8") as fh:
        for step in range(1, steps + 1):
            records = {}
            step_sent = 0
            for name, bn, payload in layers:
                due = scheduler.is_due(name, step)
                diff = None
                if due and step > 1:
                    diff = scale[name] * (0.08 + math.exp(-step / rate[name])) * rng.lognormvariate(0, 0.4)
                if due:
                    scheduler.record(name, step, diff)
                    step_sent += payload
                entry = {
                    "due": due,
                    "interval": scheduler.interval[name],
                    "payload_bytes": payload if due else 0,
                }
                entry.update({"diff_F": diff} if bn else {"diff_A": diff and diff * 0.7, "diff_G": diff})
                records[name] = entry
            sent += step_sent
            loss = 6.9 * math.exp(-step / 900) + 1.2 + rng.gauss(0, 0.05)
            fh.write(
                json.dumps(
                    {
                        "step": step,
                        "epoch": step / STEPS_PER_EPOCH,
                        "lr": lr_at(step, steps),
                        "loss": loss,
                        "acc": min(1.0, max(0.0, 0.78 * (1 - math.exp(-step / 700)) + rng.gauss(0, 0.02))),
                        "step_time": 0.9 + rng.uniform(0, 0.1),
                        "fisher": {
                            "payload_bytes": sent,
                            "wire_bytes": allreduce_wire_bytes(sent, RANKS),
                            "every_step_payload_bytes": every_step * step,
                            "every_step_wire_bytes": allreduce_wire_bytes(every_step * step, RANKS),
                            "ratio": sent / (every_step * step),
                        },
                        "mean_interval": sum(scheduler.interval.values()) / len(names),
                        "kfac": {"step": step, "layers": records},
                    }
                )
                + "\n"
            )
            if step % STEPS_PER_EPOCH == 0 or step == steps:
                top1 = 0.759 * (1 - math.exp(-step / 800))
                fh.write(json.dumps(eval_record(step, top1)) + "\n")
    write_summary(
        folder, steps, threshold, top1, sum(scheduler.interval.values()) / len(names), sent, every_step
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench_plot")
    parser.add_argument("--steps", type=int, default=2814)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = os.path.join(args.out, "run")
    start = time.perf_counter()
    write_run(folder, args.steps)
    print(
        f"synthetic run: {args.steps} steps x {len(resnet50_layers())} layers, "
        f"metrics.jsonl {format_bytes(os.path.getsize(os.path.join(folder, 'metrics.jsonl')), digits=1)}, "
        f"written in {time.perf_counter() - start:.1f} s"
    )
    # Wall seconds and this process's CPU seconds: on a shared machine the CPU time is the steadier figure.
    phases = {phase: {"wall": [], "cpu": []} for phase in ("read", "build", "save")}
    out = os.path.join(folder, "report.png")
    for _ in range(args.repeats):
        marks = [(time.perf_counter(), time.process_time())]
        run = read_run(folder)
        marks.append((time.perf_counter(), time.process_time()))
        figure = plots.build_figure([run])
        marks.append((time.perf_counter(), time.process_time()))
        figure.savefig(out, dpi=plots.DPI)
        marks.append((time.perf_counter(), time.process_time()))
        for phase, before, after in zip(phases, marks, marks[1:]):
            phases[phase]["wall"].append(after[0] - before[0])
            phases[phase]["cpu"].append(after[1] - before[1])
    for clock in ("wall", "cpu"):
        medians = {phase: statistics.median(values[clock]) for phase, values in phases.items()}
        print(
            f"{clock} seconds (median of {args.repeats}): "
            + ", ".join(f"{phase} {value:.2f}" for phase, value in medians.items())
            + f", total {sum(medians.values()):.2f}"
        )
    # The command itself, imports included (torch comes with the table's byte formatter).
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "launch.report", folder, "--plot"],
        check=True,
        stdout=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        f"python -m launch.report {folder} --plot: {time.perf_counter() - start:.2f} s wall, "
        f"{after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime:.2f} s CPU; "
        f"figure {out} ({format_bytes(os.path.getsize(out), digits=0, unit='kB')})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
