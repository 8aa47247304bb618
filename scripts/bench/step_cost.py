#!/usr/bin/env python
"""What a K-FAC step costs next to SGD, and where the time goes.

ResNet-50 (torchvision, random initialisation) on synthetic data, under ``horovodrun --gloo`` with 1 and
with 2 ranks. For each rank count, one process group runs, in turn and from the same initial weights:

  sgd      hvd.DistributedOptimizer alone (momentum SGD)
  every    K-FAC, every factor of every layer recomputed, communicated and inverted on every step
  lambda   K-FAC with the adaptive interval (update_threshold = λ, default 0.25), timed over a whole run;
           its cost is amortised: total seconds / number of steps. By default (--lambda-mode static)
           this run holds the factors still (learning rate 0, one batch reused), so every Diff is 0 and
           every interval grows on each due step: the fastest growth the schedule allows, i.e. the
           cheapest λ run of that length. From random initialisation the factors change far more than
           λ per step (see the Diff statistics the every-step run records), so on the training
           trajectory no interval grows within an affordable number of steps (--lambda-mode train)
  floor    the preconditioning-only floor: a K-FAC whose schedule is frozen after its first step
           (every interval set to 10**9), so no factor, inverse or Fisher traffic remains; the first
           2 steps are discarded

Each step is ``zero_grad; forward; backward; optimizer.synchronize(); kfac.step(); optimizer.step()``
(under ``skip_synchronize``), and is broken down into forward/backward, factor computation (the capture
hooks, which run inside forward/backward and are subtracted from it), gradient allreduce (the wait in
``synchronize``), factor communication, inversion, inverse communication, preconditioning and the rest.
Besides wall-clock seconds it records the CPU seconds of each rank's training thread per phase (and inside
the library's inversion): with one torch thread that is where the computation runs, so these count the
work done whatever the time a rank spent waiting for the other or for a core that other jobs held.

The parent process launches ``horovodrun -np N --gloo -H localhost:N`` on this same script in worker mode
for each N; every rank writes a JSON file, and the parent writes the summary (default
``docs/results/step_cost.json`` and ``docs/results/step_cost.md``).

    .venv/bin/python scripts/bench/step_cost.py                       # the documented run: 15-30 min on 2 shared cores
    .venv/bin/python scripts/bench/step_cost.py --model resnet18 --num-classes 10 --batch 2 --image-size 32 \\
        --sgd-steps 1 --every-steps 1 --lambda-steps 4 --floor-steps 1 --out /tmp/step_cost   # a smoke test

``--device cuda`` puts each rank on ``cuda:<local rank>`` and synchronises the device around every
timed phase; Horovod must then be built with GPU support (see README, "Building Horovod").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (REPO, command_line, git_revision, load_average, machine_info, mean, median,  # noqa: E402
                     spread)

CONFIGS = ("sgd", "every", "lambda", "floor")
CONFIG_TITLES = {"sgd": "SGD", "every": "K-FAC, every step", "lambda": "K-FAC, λ = {lam}",
                 "floor": "preconditioning-only floor"}
FROZEN_INTERVAL = 10 ** 9
PAPER_RATIO = 0.119  # λ = 0.25 in the paper's Table 1: 357 GB of Fisher traffic vs 3.0 TB every step
PHASES = ("fwd_bwd", "factor", "allreduce", "factor_comm", "inverse", "inverse_comm", "precondition", "other")
CPU_KEYS = ("cpu_total", "cpu_fwd_bwd", "cpu_allreduce", "cpu_kfac_step", "cpu_inverse", "cpu_opt_step")
PHASE_TITLES = {"fwd_bwd": "fwd+bwd", "factor": "factor comp.", "allreduce": "grad allreduce",
                "factor_comm": "factor comm", "inverse": "inversion", "inverse_comm": "inverse comm",
                "precondition": "precondition", "other": "other"}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="torchvision model name (default resnet50)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8, help="samples per rank per step (default 8)")
    p.add_argument("--image-size", type=int, default=64,
                   help="square input side (default 64; factor sizes do not depend on it)")
    p.add_argument("--data", choices=("random", "fixed"), default="random",
                   help="random: a fresh Gaussian batch per step and rank (default); fixed: one batch reused "
                        "(the static λ run always reuses one)")
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts, each its own horovodrun (default 1,2)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sgd-steps", type=int, default=3, help="timed SGD steps, after --warmup (default 3)")
    p.add_argument("--every-steps", type=int, default=3,
                   help="timed every-step K-FAC steps, after --warmup (default 3)")
    p.add_argument("--lambda-steps", type=int, default=8,
                   help="steps of the λ run, all of them timed and amortised (default 8)")
    p.add_argument("--lambda-mode", choices=("static", "train"), default="static",
                   help="static: the λ run holds the factors still (lr 0, one batch), so intervals grow as fast "
                        "as the schedule allows (default); train: same lr and data as the other runs")
    p.add_argument("--floor-steps", type=int, default=3,
                   help="timed floor steps, after the 2 discarded ones (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps of sgd and every (default 1)")
    p.add_argument("--update-threshold", type=float, default=0.25, help="λ of the adaptive run (default 0.25)")
    p.add_argument("--policy", choices=("modulo", "since_last"), default="modulo",
                   help="interval policy of the λ run (default modulo, the paper's)")
    p.add_argument("--damping", type=float, default=3e-3)
    p.add_argument("--kl-clip", type=float, default=1e-3, help="0 turns it off (default 1e-3)")
    p.add_argument("--inverse-method", choices=("cholesky", "eigen"), default="cholesky")
    p.add_argument("--symmetric-comm", choices=("on", "off"), default="on",
                   help="on: factors and inverses travel as triangles (the library's default); off: dense")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed to each horovodrun (default none)")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "results", "step_cost"),
                   help="output path without extension: writes OUT.json and OUT.md (default docs/results/step_cost)")
    p.add_argument("--rerender", action="store_true",
                   help="measure nothing: rewrite OUT.md (and the summary in OUT.json) from OUT.json's raw data")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(args.config_list) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    args.rank_list = [int(n) for n in args.ranks.split(",") if n.strip()]
    if any(n < 1 for n in args.rank_list):
        p.error("--ranks must be positive")
    for name in ("sgd_steps", "every_steps", "lambda_steps", "floor_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# Worker ---------------------------------------------------------------------------------------------
def process_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def worker(args: argparse.Namespace) -> None:
    import torch
    import horovod.torch as hvd

    hvd.init()
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if args.device == "cuda":
        device = torch.device("cuda", hvd.local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    rank = hvd.rank()
    out: Dict[str, Any] = {"rank": rank, "size": hvd.size(), "pid": os.getpid(), "device": str(device),
                           "torch_threads": torch.get_num_threads(),
                           "torch_interop_threads": torch.get_num_interop_threads(), "configs": {}}
    path = os.path.join(args.worker_dir, f"rank{rank}.json")
    for name in args.config_list:
        hvd.barrier()
        started, cpu_started = time.perf_counter(), process_cpu_seconds()
        out["configs"][name] = run_config(name, args, hvd, device)
        out["configs"][name]["wall_s"] = time.perf_counter() - started
        # CPU seconds this process got (all its threads, Horovod's included) per second of wall time:
        # about the thread count when the rank had its cores to itself, less when it was descheduled.
        out["configs"][name]["cpu_per_wall"] = (process_cpu_seconds() - cpu_started) / out["configs"][name]["wall_s"]
        with open(path, "w") as f:  # after each configuration, so that a crash keeps what was measured
            json.dump(out, f)
        if rank == 0:
            print(f"[step_cost] {hvd.size()} rank(s), {name}: {out['configs'][name]['wall_s']:.1f} s", flush=True)
    hvd.barrier()


class InverseCpuTimer:
    """Thread-CPU seconds spent in the library's inversion function, summed per step.

    Wraps the function the preconditioner calls to invert a layer (instrumentation only; the library is
    unchanged). With one torch thread the whole inversion runs on the calling thread, so this is the
    inversion work of this rank, free of the time it spent descheduled when other jobs share the cores.
    """

    NAMES = ("robust_damped_inverses", "damped_inverses")

    def __init__(self, kfac_hvd) -> None:
        import kfac_hvd.preconditioner as module
        self.module = module
        self.seconds = 0.0
        self.name = next((n for n in self.NAMES if hasattr(module, n)), None)
        self.hooked = self.name is not None
        if not self.hooked:
            return
        self.original = getattr(module, self.name)

        def timed(*a, **k):
            start = time.thread_time()
            try:
                return self.original(*a, **k)
            finally:
                self.seconds += time.thread_time() - start

        setattr(module, self.name, timed)

    def unhook(self) -> None:
        if self.hooked:
            setattr(self.module, self.name, self.original)


def run_config(name: str, args: argparse.Namespace, hvd, device) -> Dict[str, Any]:
    import torch
    import torch.nn.functional as F
    import torchvision
    import kfac_hvd

    static = name == "lambda" and args.lambda_mode == "static"
    lr = 0.0 if static else args.lr
    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, args.model)(num_classes=args.num_classes).to(device).train()
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    optimizer = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    kfac = None
    common = dict(damping=args.damping, kl_clip=args.kl_clip or None, inverse_method=args.inverse_method,
                  symmetric_comm=args.symmetric_comm == "on")
    if name == "every":
        kfac = kfac_hvd.KFAC(model, **common)
    elif name == "lambda":
        kfac = kfac_hvd.KFAC(model, update_threshold=args.update_threshold, interval_policy=args.policy, **common)
    elif name == "floor":
        # since_last: due when t - t_last >= interval, so an interval of 10**9 set after step 1 is never due.
        kfac = kfac_hvd.KFAC(model, update_threshold=args.update_threshold, interval_policy="since_last", **common)
    inverse_cpu = InverseCpuTimer(kfac_hvd)
    discard = {"sgd": args.warmup, "every": args.warmup, "lambda": 0, "floor": 2}[name]
    timed = {"sgd": args.sgd_steps, "every": args.every_steps, "lambda": args.lambda_steps,
             "floor": args.floor_steps}[name]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    generator = torch.Generator().manual_seed(args.seed * 1000 + hvd.rank())

    def batch():
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator)
        y = torch.randint(args.num_classes, (args.batch,), generator=generator)
        return x.to(device), y.to(device)

    fixed = batch() if args.data == "fixed" or static else None
    steps: List[Dict[str, Any]] = []
    for t in range(1, discard + timed + 1):
        x, y = fixed if fixed is not None else batch()
        sync()
        t0, c0 = time.perf_counter(), time.thread_time()
        inverse_cpu.seconds = 0.0
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        sync()
        t1, c1 = time.perf_counter(), time.thread_time()
        optimizer.synchronize()
        sync()
        t2, c2 = time.perf_counter(), time.thread_time()
        record = kfac.step(lr=lr) if kfac is not None else None
        sync()
        t3, c3 = time.perf_counter(), time.thread_time()
        with optimizer.skip_synchronize():
            optimizer.step()
        sync()
        t4, c4 = time.perf_counter(), time.thread_time()
        if name == "floor" and t == 1:
            for key in kfac.scheduler.keys:
                kfac.scheduler.set_interval(key, FROZEN_INTERVAL)
        entry: Dict[str, Any] = {"step": t, "timed": t > discard, "total": t4 - t0, "fwd_bwd_wall": t1 - t0,
                                 "allreduce": t2 - t1, "kfac_step": t3 - t2, "opt_step": t4 - t3,
                                 "loss": float(loss.detach()),
                                 # CPU seconds of the training thread (with one torch thread, where the
                                 # computation runs): work done, whatever the time spent descheduled or waiting.
                                 "cpu_total": c4 - c0, "cpu_fwd_bwd": c1 - c0, "cpu_allreduce": c2 - c1,
                                 "cpu_kfac_step": c3 - c2, "cpu_opt_step": c4 - c3,
                                 "cpu_inverse": inverse_cpu.seconds if inverse_cpu.hooked else None}
        seconds = record["time"] if record is not None else {}
        for phase in ("factor", "factor_comm", "inverse", "inverse_comm", "precondition"):
            entry[phase] = float(seconds.get(phase, 0.0))
        entry["fwd_bwd"] = entry["fwd_bwd_wall"] - entry["factor"]  # capture hooks run inside fwd/bwd
        entry["other"] = entry["total"] - sum(entry[p] for p in PHASES if p != "other")
        if record is not None:
            entry["due_layers"] = sum(1 for layer in record["layers"].values() if layer["due"])
            entry["mean_interval"] = record["mean_interval"]
            entry["numerics"] = record.get("numerics") or {}
            diffs = [max(d for k, d in layer.items() if k.startswith("diff_") and d is not None)
                     for layer in record["layers"].values()
                     if any(k.startswith("diff_") and d is not None for k, d in layer.items())]
            if diffs:  # Algorithm 1's Diff of each layer that was due (max over its factors)
                diffs.sort()
                entry["diff_median"] = diffs[len(diffs) // 2]
                entry["diff_min"] = diffs[0]
                entry["layers_below_threshold"] = sum(1 for d in diffs if d < args.update_threshold)
                entry["layers_with_diff"] = len(diffs)
        steps.append(entry)

    result: Dict[str, Any] = {"discarded": discard, "timed": timed, "lr": lr, "fixed_batch": fixed is not None,
                              "steps": steps}
    if kfac is not None:
        stats = kfac.comm_stats()
        stats.pop("per_layer", None)
        result["comm_stats"] = stats
        result["layers"] = len(kfac.layer_names)
        result["mean_interval"] = kfac.mean_interval()
        intervals = [kfac.scheduler.interval[key] for key in kfac.scheduler.keys]
        result["interval_histogram"] = {str(i): intervals.count(i) for i in sorted(set(intervals))}
        assignment = kfac.assignment
        result["assignment"] = {"load": assignment.load, "imbalance": assignment.imbalance,
                                "layers_per_rank": [len(assignment.layers_of(r)) for r in range(len(assignment.load))],
                                "my_layers": assignment.layers_of(hvd.rank())}
        kfac.remove_hooks()
    inverse_cpu.unhook()
    return result


# Parent ---------------------------------------------------------------------------------------------
def worker_argv(args: argparse.Namespace, worker_dir: str) -> List[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", "--worker-dir", worker_dir,
            "--configs", ",".join(args.config_list)]
    for key in ("model", "num_classes", "batch", "image_size", "data", "threads", "device", "sgd_steps",
                "every_steps", "lambda_steps", "lambda_mode", "floor_steps", "warmup", "update_threshold", "policy",
                "damping", "kl_clip", "inverse_method", "symmetric_comm", "lr", "momentum", "weight_decay", "seed"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return argv


def horovodrun() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    found = local if os.path.exists(local) else shutil.which("horovodrun")
    if not found:
        sys.exit("step_cost: horovodrun not found next to this Python nor on PATH; run 'make setup' first")
    return found


def launch(args: argparse.Namespace, ranks: int) -> Dict[str, Any]:
    worker_dir = tempfile.mkdtemp(prefix=f"step_cost_np{ranks}_")
    cmd = [horovodrun(), "-np", str(ranks), "--gloo", "-H", f"localhost:{ranks}", *worker_argv(args, worker_dir)]
    env = dict(os.environ)
    threads = str(args.threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    print(f"[step_cost] {ranks} rank(s): {' '.join(cmd[:6])} ...", flush=True)
    started = time.time()
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, timeout=args.timeout)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        returncode = "timeout"
    wall = time.time() - started
    per_rank = []
    for r in range(ranks):
        path = os.path.join(worker_dir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                per_rank.append(json.load(f))
    shutil.rmtree(worker_dir, ignore_errors=True)
    if returncode != 0 or len(per_rank) != ranks:
        print(f"[step_cost] {ranks} rank(s): horovodrun ended with {returncode}, {len(per_rank)} rank file(s)",
              file=sys.stderr, flush=True)
    return {"ranks": ranks, "returncode": returncode, "wall_s": wall, "per_rank": per_rank}


def summarise_config(name: str, per_rank: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    runs = [r["configs"].get(name) for r in per_rank]
    if not runs or any(run is None for run in runs):
        return None
    n_steps = min(len(run["steps"]) for run in runs)
    # The ranks run in lockstep (collectives every step): a step lasts as long as its slowest rank.
    step_total = [max(run["steps"][i]["total"] for run in runs) for i in range(n_steps)]
    timed_idx = [i for i in range(n_steps) if runs[0]["steps"][i]["timed"]]
    timed_total = [step_total[i] for i in timed_idx]
    out: Dict[str, Any] = {"steps_run": n_steps, "steps_timed": len(timed_idx),
                           "cpu_per_wall_per_rank": [run.get("cpu_per_wall") for run in runs],
                           "step_seconds": step_total, "median_s": median(timed_total),
                           "min_max_s": spread(timed_total)}
    if name == "lambda":
        out["amortised_s"] = sum(timed_total) / len(timed_total)
        out["headline_s"] = out["amortised_s"]
    else:
        out["headline_s"] = out["median_s"]
    # Breakdown: mean per timed step, per rank (means, unlike medians, add up to the total).
    out["breakdown_per_rank"] = []
    for run in runs:
        rows = [run["steps"][i] for i in timed_idx]
        entry = {p: mean([row[p] for row in rows]) for p in PHASES + ("total",)}
        for key in CPU_KEYS:
            values = [row.get(key) for row in rows]
            entry[key] = mean(values) if values and all(v is not None for v in values) else None
        out["breakdown_per_rank"].append(entry)
    first = runs[0]
    if "comm_stats" in first:
        stats = first["comm_stats"]
        rows = [first["steps"][i] for i in timed_idx]
        out["kfac"] = {
            "layers": first["layers"], "mean_interval_end": first["mean_interval"],
            "interval_histogram_end": first["interval_histogram"],
            "compute_ratio": stats.get("compute_ratio"), "traffic_ratio": stats.get("ratio"),
            "payload_bytes_rank0": stats.get("payload_bytes"), "wire_bytes_rank0": stats.get("wire_bytes"),
            "every_step_wire_bytes_rank0": stats.get("every_step_wire_bytes"),
            "due_layers_per_step": [s.get("due_layers") for s in first["steps"]],
            "mean_interval_per_step": [s.get("mean_interval") for s in first["steps"]],
            "timed_steps_with_factor_work": sum(1 for row in rows if row.get("due_layers")),
            "numerics_events": sum(len(s.get("numerics") or {}) for s in first["steps"]),
            "diff_per_step": [{k: s.get(k) for k in ("step", "diff_median", "diff_min", "layers_below_threshold",
                                                     "layers_with_diff")}
                              for s in first["steps"] if s.get("layers_with_diff")],
            "assignment": {k: first["assignment"][k] for k in ("load", "imbalance", "layers_per_rank")},
        }
        out["loss_per_step_rank0"] = [s["loss"] for s in first["steps"]]
    return out


def summarise(args: argparse.Namespace, launches: List[Dict[str, Any]]) -> Dict[str, Any]:
    summary: Dict[str, Any] = {}
    projection: Dict[str, Any] = {}
    for run in launches:
        n = str(run["ranks"])
        summary[n] = {name: summarise_config(name, run["per_rank"]) for name in args.config_list}
        base = summary[n].get("sgd")
        every = summary[n].get("every")
        for name, cfg in summary[n].items():
            if cfg is None:
                continue
            cfg["x_sgd"] = cfg["headline_s"] / base["headline_s"] if base else None
            cfg["x_every"] = cfg["headline_s"] / every["headline_s"] if every else None
            # The same ratios on rank 0's CPU seconds per step, which other jobs on the cores do not inflate.
            cpu = cfg["breakdown_per_rank"][0]["cpu_total"]
            cfg["cpu_x_sgd"] = cpu / base["breakdown_per_rank"][0]["cpu_total"] if base and cpu else None
            cfg["cpu_x_every"] = cpu / every["breakdown_per_rank"][0]["cpu_total"] if every and cpu else None
        floor = summary[n].get("floor")
        lam = summary[n].get("lambda")
        if every and floor:
            # A schedule that does the Fisher work on a fraction c of the layer-steps costs about
            # floor + c * (every - floor): checked against the λ run, and applied to the paper's ratio.
            def predict(c: float) -> float:
                return floor["headline_s"] + c * (every["headline_s"] - floor["headline_s"])
            projection[n] = {"paper_ratio": PAPER_RATIO, "paper_s": predict(PAPER_RATIO),
                             "paper_x_sgd": predict(PAPER_RATIO) / base["headline_s"] if base else None,
                             "paper_x_every": predict(PAPER_RATIO) / every["headline_s"]}
            cpu_every = every["breakdown_per_rank"][0]["cpu_total"]
            cpu_floor = floor["breakdown_per_rank"][0]["cpu_total"]
            cpu_sgd = base["breakdown_per_rank"][0]["cpu_total"] if base else None
            if cpu_every and cpu_floor is not None:
                paper_cpu = cpu_floor + PAPER_RATIO * (cpu_every - cpu_floor)
                projection[n].update(paper_cpu_s=paper_cpu, paper_cpu_x_every=paper_cpu / cpu_every,
                                     paper_cpu_x_sgd=paper_cpu / cpu_sgd if cpu_sgd else None)
            if lam and lam["kfac"]["compute_ratio"] is not None:
                c = lam["kfac"]["compute_ratio"]
                projection[n]["lambda_ratio"] = c
                projection[n]["lambda_predicted_s"] = predict(c)
                projection[n]["lambda_measured_s"] = lam["headline_s"]
                cpu = {name: cfg["breakdown_per_rank"][0]["cpu_total"] for name, cfg in
                       (("every", every), ("floor", floor), ("lambda", lam))}
                if all(v is not None for v in cpu.values()):
                    projection[n]["lambda_predicted_cpu_s"] = cpu["floor"] + c * (cpu["every"] - cpu["floor"])
                    projection[n]["lambda_measured_cpu_s"] = cpu["lambda"]
    # Inversion per rank (every-step K-FAC) against the 1-rank total.
    one = summary.get("1", {}).get("every")
    one_inverse = one["breakdown_per_rank"][0]["inverse"] if one else None
    one_inverse_cpu = one["breakdown_per_rank"][0]["cpu_inverse"] if one else None
    inversion = []
    for run in launches:
        cfg = summary[str(run["ranks"])].get("every")
        if cfg is None:
            continue
        load = cfg["kfac"]["assignment"]["load"]
        for r, row in enumerate(cfg["breakdown_per_rank"]):
            inversion.append({"ranks": run["ranks"], "rank": r,
                              "layers_owned": cfg["kfac"]["assignment"]["layers_per_rank"][r],
                              "load_share": load[r] / sum(load), "inverse_s": row["inverse"],
                              "inverse_comm_s": row["inverse_comm"],
                              "x_one_rank_total": row["inverse"] / one_inverse if one_inverse else None,
                              "inverse_cpu_s": row["cpu_inverse"],
                              "cpu_x_one_rank_total": (row["cpu_inverse"] / one_inverse_cpu
                                                       if one_inverse_cpu and row["cpu_inverse"] is not None
                                                       else None)})
    return {"per_ranks": summary, "projection": projection, "inversion_per_rank": inversion}


def fmt(value: Optional[float], digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def ranks_word(n: Any) -> str:
    return "1 rank" if int(n) == 1 else f"{n} ranks"


def titles(args: argparse.Namespace) -> Dict[str, str]:
    lam = f"{args.update_threshold:g}"
    out = {k: v.format(lam=lam) for k, v in CONFIG_TITLES.items()}
    out["lambda"] += (" (factors held still)" if args.lambda_mode == "static" else " (training)")
    return out


def observations(data: Dict[str, Any]) -> List[str]:
    """A few sentences read off the numbers of this run."""
    out = []
    for n, cfgs in data["summary"]["per_ranks"].items():
        every, floor, sgd = cfgs.get("every"), cfgs.get("floor"), cfgs.get("sgd")
        if every:
            row = every["breakdown_per_rank"][0]
            shares = {p: row[p] / row["total"] for p in PHASES if row["total"]}
            top = sorted(shares.items(), key=lambda kv: -kv[1])[:3]
            out.append(f"{ranks_word(n)}, K-FAC every step: " + ", ".join(
                f"{PHASE_TITLES[p]} {100 * v:.0f}%" for p, v in top) + " of the step (rank 0).")
        if floor and sgd:
            out.append(f"{ranks_word(n)}: the preconditioning-only floor is "
                       f"{floor['headline_s'] / sgd['headline_s']:.1f}× "
                       f"SGD and {100 * floor['x_every']:.0f}% of every-step K-FAC." if floor["x_every"] else "")
    inv = data["summary"]["inversion_per_rank"]
    multi = [row for row in inv if row["ranks"] > 1]
    if multi and any(row["ranks"] == 1 for row in inv):
        out.append("Inversion per rank against the 1-rank total: " + "; ".join(
            f"{row['ranks']} ranks, rank {row['rank']}: {fmt(row['cpu_x_one_rank_total'])}× in CPU seconds, "
            f"{fmt(row['x_one_rank_total'])}× by the wall clock (cost share {row['load_share']:.2f})"
            for row in multi) + ".")
    outside = {}
    for n, cfgs in data["summary"]["per_ranks"].items():
        row = cfgs["every"]["breakdown_per_rank"][0] if cfgs.get("every") else None
        if row and row["cpu_kfac_step"] is not None and row["cpu_inverse"] is not None:
            outside[n] = row["cpu_kfac_step"] - row["cpu_inverse"]
    if len(outside) > 1:
        out.append("K-FAC every step, CPU seconds of `kfac.step()` outside the inversion (rank 0): " + ", ".join(
            f"{ranks_word(n)} {v:.2f}" for n, v in outside.items()) + "; the growth with ranks is work only "
            "multi-rank runs do (packing and unpacking the factor and inverse triangles, handing them to Horovod).")
    diffs = {n: cfgs["every"]["kfac"]["diff_per_step"] for n, cfgs in data["summary"]["per_ranks"].items()
             if cfgs.get("every") and cfgs["every"].get("kfac", {}).get("diff_per_step")}
    if len(diffs) > 1:
        out.append("Median Diff on the training trajectory: " + ", ".join(
            f"{ranks_word(n)} {mean([row['diff_median'] for row in rows]):.2f}" for n, rows in diffs.items())
            + " (mean over the recorded steps); factors averaged over more ranks are estimated from more "
              "samples and move less from step to step.")
    return [line for line in out if line]


def write_markdown(path: str, data: Dict[str, Any], args: argparse.Namespace) -> None:
    s = data["summary"]["per_ranks"]
    machine = data["machine"]
    title = titles(args)
    lam = f"{args.update_threshold:g}"
    per_launch = ", ".join("{}: {:.1f} min".format(ranks_word(r["ranks"]), r["wall_s"] / 60) for r in data["launches"])
    lines = [
        "# Step cost: K-FAC against SGD, and where the time goes",
        "",
        f"{args.model} (torchvision, random initialisation), synthetic data ({args.data} Gaussian batches), "
        f"batch {args.batch} per rank, {args.image_size}×{args.image_size} images (factor sizes do not depend "
        f"on the resolution), {args.num_classes} classes, on {args.device.upper()}, "
        f"{args.threads} torch thread(s) per rank with 1 rank and with 2 ranks alike, so that both use the "
        f"same compute per rank. Generated by:",
        "",
        "```bash",
        data["command"],
        "```",
        "",
        f"Machine: {machine.get('nproc')} cores ({machine.get('cpu')}), {machine.get('memory_gib')} GiB, "
        f"torch {machine.get('torch')}, Horovod {machine.get('horovod')} (Gloo controller and transport); "
        f"torch threads per rank: {data['threads_seen']}. Load average at start {machine.get('load_average')}, "
        f"at end {data['load_average_end']} (it includes this benchmark's own ranks). Code revision "
        f"{data.get('git')}. Total run time {data['total_wall_s'] / 60:.1f} min ({per_launch}).",
        "",
        "**Read the ratios, not the seconds, and prefer the CPU-seconds ratios.** The machine was shared with "
        "other jobs while this ran, so absolute seconds move from run to run, by tens of per cent and more for "
        "short steps such as SGD's; the ratios compare configurations measured in the same process group "
        "minutes apart. Where a row's CPU/wall is well below 1, other work held the cores during it and its "
        "wall-clock seconds are inflated; the CPU seconds of the training thread (the CPU-seconds table) count "
        "the work itself and are the most stable figures across repeated runs.",
        "",
        "## Seconds per step",
        "",
        "Median over the timed steps [min–max]; the λ run is amortised: the total seconds of all its steps "
        "/ its number of steps. With 2 ranks a step lasts as long as its slower rank. CPU/wall: CPU seconds "
        "each rank's process got per second of the whole configuration's wall time (all its threads): about "
        f"{args.threads} when the rank had its thread's core to itself, less when other work took the cores.",
        "",
        "| ranks | configuration | s/step | × SGD | × K-FAC every step | steps timed | CPU/wall per rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, cfgs in s.items():
        for name in args.config_list:
            cfg = cfgs.get(name)
            if cfg is None:
                lines.append(f"| {n} | {title[name]} | failed | | | | |")
                continue
            lo, hi = cfg["min_max_s"]
            value = (f"{cfg['headline_s']:.2f} amortised [{lo:.2f}–{hi:.2f}]" if name == "lambda"
                     else f"{cfg['headline_s']:.2f} [{lo:.2f}–{hi:.2f}]")
            cpu = " / ".join(fmt(c) for c in cfg["cpu_per_wall_per_rank"])
            lines.append(f"| {n} | {title[name]} | {value} | {fmt(cfg['x_sgd'])} | {fmt(cfg['x_every'])} | "
                         f"{cfg['steps_timed']} | {cpu} |")
    projection = data["summary"].get("projection", {})
    if projection:
        lines += [
            "",
            "### Amortised cost at other schedules",
            "",
            "A schedule that does the Fisher work (factors, their allreduce, inversion, inverse broadcast) for a "
            "fraction c of the layer-steps costs about floor + c · (every step − floor) per step. The λ row checks "
            "this against the measured λ run (c = its `compute_ratio`), by the wall clock and in rank 0's CPU "
            "seconds (see below); the paper row applies it to the "
            f"paper's λ = 0.25 traffic ratio, c = {PAPER_RATIO} (357 GB of 3.0 TB): a projection, not a measurement.",
            "",
            "| ranks | c | from | predicted s/step | measured s/step | predicted CPU s/step | measured CPU s/step "
            "| × SGD (wall / CPU) | × K-FAC every step (wall / CPU) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n, proj in projection.items():
            if "lambda_ratio" in proj:
                lines.append(f"| {n} | {proj['lambda_ratio']:.3f} | this λ run | {proj['lambda_predicted_s']:.2f} | "
                             f"{proj['lambda_measured_s']:.2f} | {fmt(proj.get('lambda_predicted_cpu_s'))} | "
                             f"{fmt(proj.get('lambda_measured_cpu_s'))} | | |")
            lines.append(f"| {n} | {proj['paper_ratio']:.3f} | paper, λ = 0.25 | {proj['paper_s']:.2f} | – | "
                         f"{fmt(proj.get('paper_cpu_s'))} | – | {fmt(proj['paper_x_sgd'])} / "
                         f"{fmt(proj.get('paper_cpu_x_sgd'))} | {fmt(proj['paper_x_every'])} / "
                         f"{fmt(proj.get('paper_cpu_x_every'))} |")
    lines += [
        "",
        "## Breakdown (mean seconds per timed step, rank 0)",
        "",
        "fwd+bwd excludes the factor computation, which runs in K-FAC's capture hooks during forward and "
        "backward and is listed on its own. grad allreduce is the wait in `optimizer.synchronize()` (Horovod "
        "starts the allreduces during backward, so only what does not overlap shows). factor comm and inverse "
        "comm are the waits for K-FAC's collectives, including unpacking the triangles; with 2 ranks every "
        "wait also holds the time one rank spends waiting for the other (inverse comm: the owner still "
        "inverting). other: the rest of `kfac.step()` (packing, Diff norms, bookkeeping) and the optimiser "
        "step. Means add up to the total; medians would not.",
        "",
        "| ranks | configuration | " + " | ".join(PHASE_TITLES[p] for p in PHASES) + " | total |",
        "|---|---|" + "---|" * (len(PHASES) + 1),
    ]
    for n, cfgs in s.items():
        for name in args.config_list:
            cfg = cfgs.get(name)
            if cfg is None:
                continue
            row = cfg["breakdown_per_rank"][0]
            lines.append(f"| {n} | {title[name]} | " + " | ".join(fmt(row[p]) for p in PHASES) +
                         f" | {fmt(row['total'])} |")
    lines += [
        "",
        "## CPU seconds per step (rank 0's training thread)",
        "",
        "With one torch thread the computation runs on the training thread, so its CPU seconds count the work "
        "a step does, not the time the rank waited for the other rank or for a core. Same steps as above "
        "(means). Horovod's own threads, which do the reductions and copies of the collectives, are not "
        "counted. The ratios on these figures are the ones least disturbed by other jobs on the machine.",
        "",
        "| ranks | configuration | total | fwd+bwd (incl. factor comp.) | kfac.step | of which inversion | "
        "× SGD | × K-FAC every step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, cfgs in s.items():
        for name in args.config_list:
            cfg = cfgs.get(name)
            if cfg is None:
                continue
            row = cfg["breakdown_per_rank"][0]
            lines.append(f"| {n} | {title[name]} | {fmt(row['cpu_total'])} | {fmt(row['cpu_fwd_bwd'])} | "
                         f"{fmt(row['cpu_kfac_step'])} | {fmt(row['cpu_inverse'])} | {fmt(cfg['cpu_x_sgd'])} | "
                         f"{fmt(cfg['cpu_x_every'])} |")
    inversion = data["summary"]["inversion_per_rank"]
    if inversion:
        lines += [
            "",
            "## Inversion work per rank (K-FAC every step)",
            "",
            "Layers are partitioned over ranks by inversion cost, dim(A)³ + dim(G)³ (`kfac.assignment`); each "
            "rank inverts its own layers and broadcasts their inverses. cost share = the rank's "
            "`assignment.load` / the total; × 1-rank = the rank's inversion seconds / the 1-rank run's "
            "inversion seconds (all layers), by wall clock and by the CPU seconds of the rank's training thread "
            "inside the inversion (immune to time spent descheduled while other jobs used the cores).",
            "",
            "| ranks | rank | layers owned | cost share | inversion s/step (wall) | × 1-rank | "
            "inversion CPU s/step | × 1-rank (CPU) | inverse comm s/step |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in inversion:
            lines.append(f"| {row['ranks']} | {row['rank']} | {row['layers_owned']} | {row['load_share']:.3f} | "
                         f"{row['inverse_s']:.2f} | {fmt(row['x_one_rank_total'])} | {fmt(row['inverse_cpu_s'])} | "
                         f"{fmt(row['cpu_x_one_rank_total'])} | {row['inverse_comm_s']:.2f} |")
    lam_rows = [(n, cfgs["lambda"]) for n, cfgs in s.items() if cfgs.get("lambda")]
    if lam_rows:
        lines += [
            "",
            f"## The λ = {lam} run ({args.policy} policy, {args.lambda_mode} mode)",
            "",
            "compute ratio: factor elements computed / what every-step K-FAC would have computed in the same "
            "steps (`kfac.comm_stats()['compute_ratio']`); traffic ratio: the same for Fisher wire bytes "
            "(nothing travels with 1 rank).",
            "",
            "| ranks | steps | layers due, per step | mean interval at the end | "
            "intervals at the end (interval: layers) | "
            "compute ratio | traffic ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, cfg in lam_rows:
            k = cfg["kfac"]
            hist = ", ".join(f"{i}: {c}" for i, c in k["interval_histogram_end"].items())
            due = " ".join(str(d) for d in k["due_layers_per_step"])
            lines.append(f"| {n} | {cfg['steps_run']} | {due} | {k['mean_interval_end']:.2f} | {hist} | "
                         f"{fmt(k['compute_ratio'], 3)} | {fmt(k['traffic_ratio'], 3)} |")
    diff_rows = [(n, cfgs["every"]) for n, cfgs in s.items()
                 if cfgs.get("every") and cfgs["every"]["kfac"]["diff_per_step"]]
    if diff_rows:
        lines += [
            "",
            "## Diff on the training trajectory (every-step run)",
            "",
            f"Algorithm 1's Diff of each layer (max over its factors of ‖X − X_pre‖_F / ‖X_pre‖_F) on the "
            f"every-step run, which trains (lr {args.lr:g}) from random initialisation: an interval grows only "
            f"when Diff < λ = {lam}.",
            "",
            "| ranks | step | median Diff | smallest Diff | layers with Diff < λ |",
            "|---|---|---|---|---|",
        ]
        for n, cfg in diff_rows:
            for row in cfg["kfac"]["diff_per_step"]:
                lines.append(f"| {n} | {row['step']} | {row['diff_median']:.3f} | {row['diff_min']:.3f} | "
                             f"{row['layers_below_threshold']} of {row['layers_with_diff']} |")
    obs = observations(data)
    if obs:
        lines += ["", "## Observations", ""] + [f"- {line}" for line in obs]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in data["notes"]] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def notes(args: argparse.Namespace, data: Dict[str, Any]) -> List[str]:
    out = [
        f"Timed steps: SGD and every-step K-FAC after {args.warmup} untimed warm-up step(s); the floor after "
        "2 discarded steps (step 1 computes and inverts every factor, step 2 still captures the factors armed "
        "before the freeze); the λ run from its first step, since a run pays for its early every-layer steps.",
        f"Optimiser: momentum SGD (lr {args.lr:g}, momentum {args.momentum:g}, weight decay "
        f"{args.weight_decay:g}) under `hvd.DistributedOptimizer`; K-FAC damping {args.damping:g}, kl_clip "
        f"{args.kl_clip:g}, {args.inverse_method} inverses, fp32 factors, "
        + ("triangle-packed" if args.symmetric_comm == "on" else "dense (unpacked)") + " communication.",
    ]
    if args.lambda_mode == "static":
        out.append("λ run, static mode: learning rate 0 and one batch reused, so the factors never change, "
                   "every Diff is 0 and every interval grows on each due step: the cheapest λ run of this "
                   "length, with every layer due on the same steps. It measures what the schedule saves once "
                   "intervals grow, not how fast they grow in training (that needs a real run: see "
                   "docs/RESULTS.md).")
    else:
        out.append("λ run, train mode: same learning rate and data as the other runs, from random "
                   "initialisation.")
    if args.policy == "modulo":
        out.append("With the paper's modulo rule (due when t is a multiple of the interval) a layer whose Diff "
                   "stays below λ is due at t = 1, 2, 4, 6, 8, …, every even step for good, so this policy "
                   "saves at most half the Fisher work; `since_last` gives 1, 2, 4, 7, 11, 16, … "
                   "(`--policy since_last`).")
    out.append(f"Data: synthetic Gaussian images and uniform labels ({args.data}: "
               + ("a fresh batch per step and rank" if args.data == "random" else "one batch per rank, reused")
               + "); the cost of a step does not depend on the values.")
    if args.model == "resnet50":
        out.append("The floor is what K-FAC costs with no factor, inverse or Fisher communication work at all; "
                   "it is mostly the preconditioning products G⁻¹·∇W·A⁻¹ of the layers with the largest "
                   "factors "
                   "(layer4's 3×3 convolutions: A is 4608×4608, about 22 GFLOP each per step).")
    out.append("Two ranks on two cores with one thread each leave no core for Horovod's background threads, "
               "and other jobs ran at the same time: with 2 ranks, time a rank spends descheduled shows up as "
               "the other rank's wait in grad allreduce, factor comm or inverse comm.")
    if args.threads > 1:
        out.append(f"With {args.threads} torch threads per rank the CPU-seconds figures count the training thread "
                   "only and undercount the work done by the other threads; read the wall-clock tables.")
    out.append("`--device cuda` (each rank on cuda:<local rank>, the device synchronised around every phase "
               "this script times) has not been run here: this machine has no GPU. The library's own phase "
               "timers inside `kfac.step()` do not synchronise the device, so on CUDA their split of "
               "`kfac.step()` is approximate (the step totals are exact), and the CPU-seconds tables count "
               "host work only. Horovod must be built with GPU support for CUDA tensors.")
    for n, cfgs in data["summary"]["per_ranks"].items():
        floor = cfgs.get("floor")
        if floor and floor["kfac"]["timed_steps_with_factor_work"]:
            out.append(f"{ranks_word(n)}: {floor['kfac']['timed_steps_with_factor_work']} timed floor step(s) still "
                       "had layers due; the floor figure includes some factor work.")
    events = sum((cfg or {}).get("kfac", {}).get("numerics_events", 0)
                 for cfgs in data["summary"]["per_ranks"].values() for cfg in cfgs.values())
    if events:
        out.append(f"The library reported {events} numerics event(s) (retried or skipped inversions) on "
                   "rank 0; see the JSON.")
    return out


def write_outputs(data: Dict[str, Any], args: argparse.Namespace, launches: List[Dict[str, Any]]) -> None:
    data["summary"] = summarise(args, launches)
    data["notes"] = notes(args, data)
    data["raw"] = {str(run["ranks"]): run["per_rank"] for run in launches}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(data, f, indent=1)
    write_markdown(args.out + ".md", data, args)


def rerender(args: argparse.Namespace) -> None:
    """Rewrite OUT.md and OUT.json's summary from the raw measurements OUT.json already holds."""
    with open(args.out + ".json") as f:
        data = json.load(f)
    saved = parse_args([])  # defaults for settings that older files lack
    vars(saved).update(data["settings"])
    saved.out = args.out
    saved.config_list = [c for c in saved.configs.split(",") if c]
    saved.rank_list = [int(n) for n in saved.ranks.split(",") if n]
    walls = {str(run["ranks"]): run for run in data["launches"]}
    launches = [{**walls[n], "per_rank": per_rank} for n, per_rank in data["raw"].items()]
    write_outputs(data, saved, launches)
    print(f"[step_cost] rewrote {args.out}.md and the summary in {args.out}.json from its raw measurements")


def parent(args: argparse.Namespace) -> None:
    if args.rerender:
        rerender(args)
        return
    started = time.time()
    data: Dict[str, Any] = {"command": command_line(), "git": git_revision(), "machine": machine_info(),
                            "settings": {k: v for k, v in vars(args).items()
                                         if k not in ("worker", "worker_dir", "config_list", "rank_list",
                                                      "rerender")}}
    launches = [launch(args, n) for n in args.rank_list]
    data["launches"] = [{k: run[k] for k in ("ranks", "returncode", "wall_s")} for run in launches]
    data["threads_seen"] = sorted({r["torch_threads"] for run in launches for r in run["per_rank"]})
    data["load_average_end"] = load_average()
    data["total_wall_s"] = time.time() - started
    write_outputs(data, args, launches)
    print(f"[step_cost] wrote {args.out}.json and {args.out}.md in {data['total_wall_s'] / 60:.1f} min")
    with open(args.out + ".md") as f:
        print(f.read())
    if any(run["returncode"] != 0 for run in launches):
        sys.exit(1)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
