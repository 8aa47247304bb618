#!/usr/bin/env python
"""What a K-FAC step costs: seconds, host syncs, Horovod collectives and memory, at several rank counts.

ResNet-50 (torchvision, random initialisation) on synthetic data. Each rank count runs in its own
``horovodrun -np N --gloo -H localhost:N``; inside it, one configuration after another from the same
initial weights:

  sgd        hvd.DistributedOptimizer alone (momentum SGD)
  every      K-FAC, every factor of every layer recomputed, communicated and inverted on every step
  lambda     K-FAC with λ (default 0.25) and the factors held still: learning rate 0 and one batch
             reused, so every Diff is 0 and every interval grows on each due step (the fastest growth the
             schedule allows). Its steady-state cost per step is the mean over steps --lambda-steady-from
             to the end; with the paper's modulo rule held-still factors are due on every even step
             (1, 2, 4, 6, …), so that window alternates an update step and a step with nothing due
  every_wide       every, with the factor products of fp32 copies of the captured tensors
                   (``narrow_factor_products=False``: the path before the autocast-dtype products)
  every_unbatched  every, with one inversion call per factor (``batched_inversion=False``)
  replay     K-FAC with the due pattern of a recorded run (--schedule-trace, a metrics.jsonl as ``make demo``
             or bench/pareto.py write it) imposed step by step: its last --replay-steps steps, each of
             this model's layers due when the recorded layer of its type at the same relative depth was; the
             real-schedule steady state is the mean over those steps (step 1, which inverts everything, is
             discarded). The λ run above is the held-still worst case beside it
  floor      the preconditioning floor: the schedule is frozen after step 1 (every interval 10**9), so only
             preconditioning remains; steps 1 and 2 are discarded
and, at 1 rank when ``--kfac-pytorch PATH`` names a checkout of gpauloski/kfac-pytorch (imported from
there; it uses torch.distributed for several ranks, so it is compared in a world of one):
  ours_nobn        ours every step with its features: no BatchNorm blocks, factor_decay 0.95
  kfacpt_every     KFACPreconditioner, factor_update_steps = inv_update_steps = 1, compute_method inverse
  kfacpt_example   its ImageNet example's schedule: factors every 10 steps, inverses every 100
  (kfacpt_every_eigen, not run unless asked: every step with its default eigendecomposition)

A variant whose option the measured library lacks (an older --library-rev) is left out and named in the
report. The every-step configurations also get a table of each phase against the device's limits: FLOPs and
bytes from the layer shapes, peak rates from kfac_hvd.analysis.devices (datasheets) or, on the CPU, measured
at the start of the run (a 2048³ fp32 product and a 256 MiB copy, with --threads threads).

Per step: wall seconds (on CUDA between ``torch.cuda.synchronize`` calls around the whole step), CPU seconds
of the training thread, host reads in the whole step and in ``kfac.step()`` (the counter
``kfac_hvd.diagnostics.HostSyncCounter``), Horovod collectives (``HOROVOD_TIMELINE``, split at a one-value
allreduce issued before each step and read with ``kfac_hvd.timeline.read_collectives``),
``kfac.memory_bytes()``, and on CUDA ``torch.cuda.max_memory_allocated`` per configuration. Writes OUT/step_cost.json and OUT/step_cost.md.

    .venv/bin/python -m bench.step_cost --kfac-pytorch /work/kfac-pytorch   # the CPU run (20 min here)
    .venv/bin/python -m bench.step_cost --smoke                              # tiny model, under 1 min

The GPU check (scripts/gpu_check.sh): 1 rank, ResNet-50, 224 px, batch 128, in bf16 and fp32 (sgd/every/
lambda/floor took 45 s on an H200; the variants and the replay are not timed there yet); writes
DIR/step_cost.json and DIR/step_cost.md, and bench/step_cost_summary.py reads the JSON:

    python3 -m bench.step_cost --device cuda --ranks 1 --launcher direct --image-size 224 --batch 128 \
        --precisions bf16,fp32 --configs sgd,every,every_wide,every_unbatched,lambda,replay,floor --out DIR

Without an importable Horovod a 1-rank run starts the worker directly (``--launcher auto``), with the
library's local communicator and a plain optimiser, so the GPU check gives step costs even where Horovod
failed to build. ``--batch`` is the global batch, split over the ranks (``--per-rank-batch`` to keep it
per rank).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench._common import REPO, command_line, git_revision, horovodrun, load_average, machine_info

CONFIGS = (
    "sgd",
    "every",
    "every_wide",
    "every_unbatched",
    "lambda",
    "replay",
    "floor",
    "ours_nobn",
    "kfacpt_every",
    "kfacpt_example",
    "kfacpt_every_eigen",
)
DEFAULT_CONFIGS = (
    "sgd,every,every_wide,every_unbatched,lambda,replay,floor,ours_nobn,kfacpt_every,kfacpt_example"
)
TRACE = os.path.join(REPO, "docs", "results", "step_cost_trace.jsonl")
# Defaults that depend on the device: CPU steps take seconds to tens of seconds, GPU steps well under one.
DEVICE_DEFAULTS = {
    "cpu": dict(warmup=1, steps=2, lambda_steps=6, kfacpt_example_steps=11, replay_steps=12),
    "cuda": dict(warmup=3, steps=10, lambda_steps=12, kfacpt_example_steps=101, replay_steps=60),
}
SMOKE = dict(
    model="tiny",
    num_classes=10,
    image_size=16,
    batch=4,
    ranks="1,2",
    warmup=1,
    steps=2,
    lambda_steps=6,
    kfacpt_example_steps=11,
    replay_steps=6,
)


def add_schedule_arguments(p: argparse.ArgumentParser) -> None:
    """How long each configuration runs, and the schedules of the λ and replay runs."""
    p.add_argument(
        "--warmup",
        type=int,
        help="untimed first steps of sgd/every/ours_nobn/kfacpt_every (default 1 on CPU, 3 on CUDA)",
    )
    p.add_argument("--steps", type=int, help="timed steps of sgd/every/floor/ours_nobn/kfacpt_every (2 / 10)")
    p.add_argument("--lambda-steps", type=int, help="steps of the λ run, all recorded (6 / 12)")
    p.add_argument("--lambda-steady-from", type=int, default=3, help="first step of the λ steady state (3)")
    p.add_argument(
        "--kfacpt-example-steps", type=int, help="steps of kfacpt_example, the first untimed (11 / 101)"
    )
    p.add_argument(
        "--schedule-trace",
        default=TRACE,
        help="metrics.jsonl whose due pattern the replay run imposes "
        "(default docs/results/step_cost_trace.jsonl)",
    )
    p.add_argument("--replay-steps", type=int, help="steps of the replay run after its first (12 / 60)")
    p.add_argument(
        "--keep-trace",
        metavar="METRICS",
        help="measure nothing: write the due flags and Diffs of a metrics.jsonl to --schedule-trace",
    )
    p.add_argument("--update-threshold", type=float, default=0.25, help="λ (default 0.25)")
    p.add_argument(
        "--policy",
        choices=("modulo", "since_last"),
        default="modulo",
        help="interval policy of the λ run (default modulo, the paper's and the library's)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="resnet50", help="torchvision model name, or 'tiny' (default resnet50)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64, help="square input side (default 64)")
    p.add_argument("--batch", type=int, default=32, help="global batch, split over the ranks (default 32)")
    p.add_argument("--per-rank-batch", action="store_true", help="--batch is per rank instead")
    p.add_argument("--ranks", default="1,2,4", help="rank counts, each its own horovodrun (default 1,2,4)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"subset of {','.join(CONFIGS)}")
    p.add_argument(
        "--kfac-pytorch", metavar="PATH", help="a checkout of gpauloski/kfac-pytorch to compare with"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--precisions", default="fp32", help="comma list of fp32, bf16 (autocast; factors stay fp32)"
    )
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels-last layout")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument(
        "--launcher",
        choices=("auto", "horovodrun", "direct"),
        default="auto",
        help="auto: horovodrun when Horovod imports, else (1 rank only) the worker directly",
    )
    add_schedule_arguments(p)
    p.add_argument("--damping", type=float, default=3e-3, help="K-FAC damping, ours and kfac-pytorch (3e-3)")
    p.add_argument("--kl-clip", type=float, default=1e-3, help="both libraries; 0 turns it off (1e-3)")
    p.add_argument("--factor-decay", type=float, default=0.95, help="of ours_nobn and kfac-pytorch (0.95)")
    p.add_argument("--inverse-method", choices=("cholesky", "eigen"), default="cholesky")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--library-rev",
        help="measure kfac_hvd as committed at this git revision (default: the "
        "working tree, copied once at the start so every rank count runs the same)",
    )
    p.add_argument("--timeout", type=float, help="seconds allowed to each launch")
    p.add_argument(
        "--smoke", action="store_true", help="tiny model, few steps, 1 and 2 ranks, a temporary --out"
    )
    p.add_argument("--out", help="output folder (default docs/results)")
    p.add_argument(
        "--rerender", action="store_true", help="measure nothing: rewrite OUT/step_cost.md from its JSON"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    resolve(p, args, argv)
    return args


def resolve(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> None:
    """Fill the presets and derived settings; reject what cannot run."""
    given = {arg.split("=")[0] for arg in (sys.argv[1:] if argv is None else argv) if arg.startswith("--")}
    if args.smoke:
        for key, value in SMOKE.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
        if not args.worker and not args.out:
            args.out = tempfile.mkdtemp(prefix="step_cost_smoke_")
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = os.path.abspath(args.out or os.path.join(REPO, "docs", "results"))
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.rank_list = [int(n) for n in args.ranks.split(",") if n.strip()]
    args.precision_list = [c.strip() for c in args.precisions.split(",") if c.strip()]
    if set(args.config_list) - set(CONFIGS):
        p.error(f"unknown configs {sorted(set(args.config_list) - set(CONFIGS))}; choose from {CONFIGS}")
    if set(args.precision_list) - {"fp32", "bf16"}:
        p.error("--precisions takes fp32 and/or bf16")
    if (
        any(n < 1 for n in args.rank_list)
        or min(args.warmup, args.steps, args.lambda_steps) < 0
        or args.steps < 1
    ):
        p.error("rank counts and --steps must be >= 1")
    if args.lambda_steady_from > args.lambda_steps:
        p.error("--lambda-steady-from is after the last λ step")
    if args.kfac_pytorch:
        args.kfac_pytorch = os.path.abspath(args.kfac_pytorch)
    args.schedule_trace = os.path.abspath(args.schedule_trace)
    if (
        "replay" in args.config_list
        and not args.keep_trace
        and not args.rerender
        and not os.path.exists(args.schedule_trace)
    ):
        p.error(
            f"--schedule-trace {args.schedule_trace} does not exist (the replay run needs a metrics.jsonl)"
        )
    if not args.worker:
        return
    ranks = args.rank_list[0]
    if not args.per_rank_batch and args.batch % ranks:
        p.error(f"--batch {args.batch} does not split over {ranks} ranks")
    args.rank_batch = args.batch if args.per_rank_batch else args.batch // ranks


# Launching --------------------------------------------------------------------------------------
def horovod_importable() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True)
    return probe.returncode == 0


def launcher_for(args: argparse.Namespace, ranks: int) -> str:
    if args.launcher != "auto":
        chosen = args.launcher
    else:
        chosen = "horovodrun" if horovod_importable() else "direct"
    if chosen == "direct" and ranks > 1:
        sys.exit(f"step_cost: {ranks} ranks need horovodrun, and Horovod does not import here")
    return chosen


def snapshot_library(args: argparse.Namespace, root: str) -> dict[str, str]:
    """Copy kfac_hvd once (working tree, or --library-rev), so that every launch measures the same code."""
    target = os.path.join(root, "library")
    os.makedirs(target)
    if args.library_rev:
        archive = subprocess.run(
            ["git", "archive", args.library_rev, "kfac_hvd"], cwd=REPO, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    else:
        shutil.copytree(
            os.path.join(REPO, "kfac_hvd"),
            os.path.join(target, "kfac_hvd"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    digest = hashlib.sha256()
    for name in sorted(os.listdir(os.path.join(target, "kfac_hvd"))):
        if name.endswith(".py"):
            with open(os.path.join(target, "kfac_hvd", name), "rb") as handle:
                digest.update(name.encode() + handle.read())
    source = args.library_rev or "working tree"
    if not args.library_rev:
        changed = subprocess.run(
            ["git", "status", "--porcelain", "kfac_hvd"], cwd=REPO, capture_output=True, text=True
        )
        source += " (kfac_hvd as committed)" if changed.returncode == 0 and not changed.stdout.strip() else ""
    return {"path": target, "source": source, "sha256": digest.hexdigest()[:12]}


def launch(args: argparse.Namespace, ranks: int, library: str, argv: list[str]) -> dict[str, Any]:
    worker_dir = tempfile.mkdtemp(prefix=f"step_cost_np{ranks}_")
    how = launcher_for(args, ranks)
    worker = [
        sys.executable,
        "-m",
        "bench.step_cost",
        *argv,
        "--worker",
        "--worker-dir",
        worker_dir,
        "--ranks",
        str(ranks),
        "--launcher",
        how,
    ]
    cmd = worker if how == "direct" else [*horovodrun(ranks), *worker]
    env = dict(os.environ)
    threads = str(args.threads)
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        OPENBLAS_NUM_THREADS=threads,
        PYTHONPATH=os.pathsep.join(filter(None, [library, REPO, env.get("PYTHONPATH")])),
    )
    timeline = os.path.join(worker_dir, "timeline.json")
    if how == "horovodrun" and ranks > 1:
        env["HOROVOD_TIMELINE"] = timeline
    print(f"[step_cost] {ranks} rank(s), {how}: {' '.join(cmd[:7])} ...", flush=True)
    started = time.time()
    try:
        returncode = subprocess.run(cmd, env=env, timeout=args.timeout, cwd=worker_dir).returncode
    except subprocess.TimeoutExpired:
        returncode = "timeout"
    per_rank = []
    for rank in range(ranks):
        path = os.path.join(worker_dir, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as handle:
                per_rank.append(json.load(handle))
    if per_rank and os.path.exists(timeline):
        attach_collectives(per_rank[0], timeline)
    shutil.rmtree(worker_dir, ignore_errors=True)
    if returncode != 0 or len(per_rank) != ranks:
        print(
            f"[step_cost] {ranks} rank(s): ended with {returncode}, {len(per_rank)} rank file(s)",
            file=sys.stderr,
        )
    return {
        "ranks": ranks,
        "launcher": how,
        "returncode": returncode,
        "wall_s": time.time() - started,
        "per_rank": per_rank,
    }


# Horovod's timeline, step by step ---------------------------------------------------------------
def load_timeline(path: str) -> list[dict[str, Any]]:
    with open(path) as handle:
        text = handle.read().strip().rstrip(",")
    return json.loads(text if text.endswith("]") else text + "]")


def attach_collectives(rank0: dict[str, Any], path: str) -> None:
    """Split the timeline at the marker allreduce before each step; each step's part is written as a
    timeline of its own (with every row's name) and read back with kfac_hvd.timeline.read_collectives."""
    from bench._step_cost_report import count_collectives
    from kfac_hvd.timeline import read_collectives

    events = load_timeline(path)
    rows = {
        e["pid"]: e["args"].get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    header = [e for e in events if e.get("ph") == "M"]
    starts: dict[str, float] = {}
    for event in events:
        name = rows.get(event.get("pid"), "").partition(".")[2]
        if name.startswith("mark.") and "ts" in event:
            starts.setdefault(name, event["ts"])
    bounds = sorted((ts, mark) for mark, ts in starts.items())
    steps = {step["mark"]: step for run in rank0["runs"].values() for step in run["steps"]}
    with tempfile.TemporaryDirectory() as folder:
        for index, (start, mark) in enumerate(bounds):
            end = bounds[index + 1][0] if index + 1 < len(bounds) else float("inf")
            part = header + [e for e in events if "ts" in e and start <= e["ts"] < end]
            segment = os.path.join(folder, "segment.json")
            with open(segment, "w") as handle:
                json.dump(part, handle)
            if mark in steps:
                steps[mark]["collectives"] = count_collectives(read_collectives(segment, prefix=""))


# Parent -----------------------------------------------------------------------------------------
def settings(args: argparse.Namespace) -> dict[str, Any]:
    hidden = {"worker", "worker_dir", "rerender", "config_list", "rank_list", "precision_list"}
    return {k: v for k, v in vars(args).items() if k not in hidden}


def external_revision(path: str | None) -> str | None:
    if not path:
        return None
    result = subprocess.run(
        ["git", "-C", path, "log", "-1", "--format=%h %cs"], capture_output=True, text=True
    )
    return result.stdout.strip() or None


def parent(args: argparse.Namespace, argv: list[str]) -> None:
    import bench._step_cost_document as document

    os.makedirs(args.out, exist_ok=True)
    if args.rerender:
        document.rerender(args.out)
        return
    if args.keep_trace:
        keep_trace(args.keep_trace, args.schedule_trace)
        return
    started = time.time()
    root = tempfile.mkdtemp(prefix="step_cost_")
    library = snapshot_library(args, root)
    data: dict[str, Any] = {
        "command": command_line(),
        "git": git_revision(),
        "library": {k: v for k, v in library.items() if k != "path"},
        "kfac_pytorch": external_revision(args.kfac_pytorch),
        "machine": machine_info(),
        "settings": settings(args),
    }
    if args.device == "cpu":
        from bench._step_cost_limits import measure_cpu

        data["cpu_rates"] = measure_cpu(args.threads)
    launches = [launch(args, n, library["path"], argv) for n in args.rank_list]
    shutil.rmtree(root, ignore_errors=True)
    data["launches"] = [
        {k: run[k] for k in ("ranks", "launcher", "returncode", "wall_s")} for run in launches
    ]
    data["raw"] = {str(run["ranks"]): run["per_rank"] for run in launches}
    data["load_average_end"] = load_average()
    data["total_wall_s"] = time.time() - started
    paths = document.write(data, args.out)
    print(f"[step_cost] wrote {' and '.join(paths)} in {data['total_wall_s'] / 60:.1f} min", flush=True)
    with open(paths[1]) as handle:
        print(handle.read())
    if any(run["returncode"] != 0 for run in launches):
        sys.exit(1)


def keep_trace(metrics: str, target: str) -> None:
    """The K-FAC part of a metrics.jsonl that the replays need (each layer's due flag and Diffs, to 4 digits),
    one step a line; the Diffs of layers that were not due are left out after step 1 (whose keys say each
    layer's type)."""
    from kfac_hvd.analysis.replay import load_trace

    try:
        records = load_trace(metrics)
    except (OSError, ValueError) as error:
        sys.exit(f"step_cost: {error}")
    with open(target, "w") as handle:
        for record in records:
            layers = {
                name: {
                    key: (round(value, 4) if isinstance(value, float) else value)
                    for key, value in entry.items()
                    if key == "due"
                    or (key.startswith("diff_") and (value is not None or record is records[0]))
                }
                for name, entry in record["layers"].items()
            }
            handle.write(json.dumps({"step": record["step"], "layers": layers}, separators=(",", ":")) + "\n")
    print(f"[step_cost] wrote {len(records)} steps of {metrics} to {target}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        from bench import _step_cost_worker

        _step_cost_worker.main(args)
    else:
        parent(args, argv)


if __name__ == "__main__":
    main()
