"""The worker side of step_cost.py: one rank of a ``horovodrun``, or one process without Horovod.

Runs every configuration in turn, each from the same initial weights, and writes ``rank<r>.json`` into
the worker folder after each one (a crash keeps what was measured). A step is

    zero_grad; forward (autocast when bf16); backward; gradient allreduce wait; precondition; optimiser step

timed as a whole: wall seconds (on CUDA between two ``torch.cuda.synchronize``), CPU seconds of the
training thread, and the host reads made in the whole step and in the preconditioner's step.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
import warnings
from typing import Any

from bench._step_cost_backends import make_backend
from kfac_hvd.diagnostics import HostSyncCounter
from kfac_hvd.layers import sample_chunks

FROZEN_INTERVAL = 10**9
ONE_RANK_ONLY = ("ours_nobn", "kfacpt_every", "kfacpt_example", "kfacpt_every_eigen")
# Every-step K-FAC with one of the library's faster paths turned off: the factor products of fp32 copies
# of the captured activations and gradients, and one inversion call per factor.
VARIANT_OPTIONS = {
    "every": {},
    "every_wide": {"narrow_factor_products": False},
    "every_unbatched": {"batched_inversion": False},
}


# Model, data, preconditioners -------------------------------------------------------------------
def build_model(args, device):
    import torch
    import torchvision
    from torch import nn

    torch.manual_seed(args.seed)
    if args.model == "tiny":
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, args.num_classes),
        )
    else:
        model = getattr(torchvision.models, args.model)(num_classes=args.num_classes)
    model = model.to(device).train()
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def make_batches(args, rank: int, device, count: int):
    """``count`` synthetic batches made once, on the device (the cost of a step does not depend on values)."""
    import torch

    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    batches = []
    for _ in range(count):
        x = torch.randn(args.rank_batch, 3, args.image_size, args.image_size, generator=generator).to(device)
        y = torch.randint(args.num_classes, (args.rank_batch,), generator=generator).to(device)
        batches.append((x.contiguous(memory_format=torch.channels_last) if args.channels_last else x, y))
    return batches


def import_kfac_pytorch(path: str):
    """gpauloski/kfac-pytorch from a checkout (not installed: its __init__ asks for its own version)."""
    import importlib.metadata as metadata
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "kfac",
        os.path.join(path, "kfac", "__init__.py"),
        submodule_search_locations=[os.path.join(path, "kfac")],
    )
    if spec is None or spec.loader is None:
        sys.exit(f"step_cost: --kfac-pytorch {path} has no kfac/__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kfac"] = module
    original = metadata.version
    metadata.version = lambda name: (
        "0+checkout" if name in ("kfac-pytorch", "kfac_pytorch") else original(name)
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "NVIDIA Apex is not installed"
            spec.loader.exec_module(module)
    finally:
        metadata.version = original
    return module


def build_theirs(name: str, model, args):
    """kfac-pytorch's KFACPreconditioner: every step, or its ImageNet example's 10/100 schedule."""
    kfac = import_kfac_pytorch(args.kfac_pytorch)
    factor_steps, inverse_steps = (10, 100) if name == "kfacpt_example" else (1, 1)
    method = "eigen" if name.endswith("eigen") else "inverse"
    return kfac.preconditioner.KFACPreconditioner(
        model,
        factor_update_steps=factor_steps,
        inv_update_steps=inverse_steps,
        damping=args.damping,
        factor_decay=args.factor_decay,
        kl_clip=args.kl_clip or None,
        lr=args.lr,
        compute_method=method,
    )


def _library_defaults() -> dict[str, Any]:
    """Every option of the measured library (KFACOptions' fields) with its default."""
    import dataclasses

    import kfac_hvd

    return {f.name: f.default for f in dataclasses.fields(kfac_hvd.KFACOptions)}


def unsupported_options(name: str) -> list[str]:
    """Options of a configuration that the measured library does not have (an older revision)."""
    accepted = _library_defaults()
    return [option for option in VARIANT_OPTIONS.get(name, {}) if option not in accepted]


def variant_options(name: str) -> dict[str, Any]:
    """The values of the options the variants switch in configuration ``name``: its own, else the measured
    library's defaults (an option absent from this revision is left out)."""
    accepted = _library_defaults()
    defaults = {
        option: accepted[option]
        for options in VARIANT_OPTIONS.values()
        for option in options
        if option in accepted
    }
    return {**defaults, **VARIANT_OPTIONS.get(name, {})}


def replay_pattern(kfac, path: str, steps: int) -> list[set]:
    """The due layers of each of the last ``steps`` steps of a recorded run (a metrics.jsonl), each of this
    model's layers taking the due flags of the recorded layer of its type at the same relative depth."""
    from kfac_hvd.analysis.replay import load_trace, map_layers, trace_kinds

    records = load_trace(path)[-steps:]
    kinds = {
        name: "batchnorm" if "F" in layer.factor_kinds else "kronecker" for name, layer in kfac.layers.items()
    }
    mapping = map_layers(kinds, trace_kinds(records[0]))
    return [
        {name for name, source in mapping.items() if record["layers"][source]["due"]} for record in records
    ]


def build_ours(name: str, model, args):
    import kfac_hvd

    common = dict(damping=args.damping, kl_clip=args.kl_clip or None, inverse_method=args.inverse_method)
    if name in VARIANT_OPTIONS:
        return kfac_hvd.KFAC(model, **common, **VARIANT_OPTIONS[name])
    if name == "replay":  # the due pattern is imposed step by step (Run.before_step)
        return kfac_hvd.KFAC(model, interval_policy="since_last", **common)
    if name == "lambda":
        return kfac_hvd.KFAC(
            model, update_threshold=args.update_threshold, interval_policy=args.policy, **common
        )
    if name == "floor":  # since_last: an interval of 10**9 set after step 1 is never due again
        return kfac_hvd.KFAC(
            model, update_threshold=args.update_threshold, interval_policy="since_last", **common
        )
    if name == "ours_nobn":  # the features kfac-pytorch has: no BatchNorm blocks, running-average factors
        return kfac_hvd.KFAC(model, include_batchnorm=False, factor_decay=args.factor_decay, **common)
    return None


def step_counts(name: str, args) -> dict[str, int]:
    """Untimed first steps and recorded steps of a configuration."""
    if name == "lambda":
        return {"discard": 0, "timed": args.lambda_steps}
    if name == "floor":  # step 1 inverts everything; step 2 still captures what was armed before the freeze
        return {"discard": 2, "timed": args.steps}
    if name == "replay":  # step 1 inverts everything; then the recorded pattern
        return {"discard": 1, "timed": args.replay_steps}
    if name == "kfacpt_example":  # its step 0 computes and inverts everything
        return {"discard": 1, "timed": args.kfacpt_example_steps - 1}
    return {"discard": args.warmup, "timed": args.steps}


class Run:
    """One configuration: model, optimiser and preconditioner (ours, kfac-pytorch's, or none)."""

    def __init__(self, name: str, args, backend, device) -> None:
        import torch

        self.name, self.args, self.backend, self.device = name, args, backend, device
        self.static = name == "lambda"  # λ: factors held still (lr 0, one batch), so intervals grow fast
        self.lr = 0.0 if self.static else args.lr
        self.model = build_model(args, device)
        base = torch.optim.SGD(
            self.model.parameters(), lr=self.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
        self.optimizer = backend.wrap(base, self.model)
        backend.broadcast(self.model)
        self.ours = build_ours(name, self.model, args)
        self.theirs = build_theirs(name, self.model, args) if name.startswith("kfacpt") else None
        self.pattern = (
            replay_pattern(self.ours, args.schedule_trace, args.replay_steps) if name == "replay" else None
        )

    def before_step(self, t: int) -> None:
        """Replay: make exactly the recorded layers due on step t + 1 (timed step t + 1 is the pattern's
        t-th step). With interval_policy since_last and no λ, interval 1 is due on the next step and the
        frozen interval never; set before step t, whose kfac.step() arms step t + 1."""
        if self.pattern is None:
            return
        due = self.pattern[t - 1] if t - 1 < len(self.pattern) else set()
        for name in self.ours.layers:
            for key in self.ours.keys.of(name):
                self.ours.scheduler.set_interval(key, 1 if name in due else FROZEN_INTERVAL)

    def precondition(self) -> dict[str, Any]:
        if self.ours is not None:
            record = self.ours.step(lr=self.lr)
            return {
                "due": sum(1 for layer in record["layers"].values() if layer["due"]),
                "started": record["factor_allreduces_started"],
                "numerics": len(record["numerics"]),
                "mean_interval": record["mean_interval"],
            }
        if self.theirs is not None:
            steps = self.theirs.steps
            kind = (
                "inverse"
                if steps % self.theirs.inv_update_steps == 0
                else "factor"
                if steps % self.theirs.factor_update_steps == 0
                else "plain"
            )
            self.theirs.step()
            return {"kind": kind}
        return {}

    def after_step(self, t: int) -> None:
        if self.name == "floor" and t == 1:
            for key in self.ours.scheduler.keys:
                self.ours.scheduler.set_interval(key, FROZEN_INTERVAL)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lr": self.lr, "fixed_batch": self.static}
        if self.pattern is not None:
            out["replayed"] = {
                "trace": self.args.schedule_trace,
                "due_per_step": [len(due) for due in self.pattern],
            }
        if self.ours is not None:
            out["options"] = variant_options(self.name)
            stats = self.ours.comm_stats()
            stats.pop("per_layer", None)
            intervals = list(self.ours.scheduler.interval.values())
            assignment = self.ours.assignment
            out.update(
                layers=len(self.ours.layers),
                local_layers=len(self.ours.local_layers),
                comm_stats=stats,
                memory_after_step=self.ours.memory_bytes(),
                mean_interval=self.ours.mean_interval(),
                intervals={str(i): intervals.count(i) for i in sorted(set(intervals))},
                assignment={
                    "load": assignment.load,
                    "imbalance": assignment.imbalance,
                    "layers_owned": [len(assignment.layers_of(r)) for r in range(len(assignment.load))],
                },
            )
            self.ours.remove_hooks()
        if self.theirs is not None:
            out.update(layers=len(self.theirs._layers), theirs_memory=dict(self.theirs.memory_usage()))
        return out


# Timing -----------------------------------------------------------------------------------------
def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(args, device, precision: str):
    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure_step(run: Run, batch, precision: str, probe_memory: bool):
    """One training step, timed as a whole. Returns (entry, loss tensor); the loss is read later."""
    import torch.nn.functional as F

    x, y = batch
    entry: dict[str, Any] = {}
    synchronize(run.device)
    with HostSyncCounter() as whole:
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        run.optimizer.zero_grad()
        with autocast(run.args, run.device, precision):
            loss = F.cross_entropy(run.model(x), y)
        loss.backward()
        if probe_memory and run.ours is not None:  # the factors in flight (host bookkeeping only)
            entry["memory_in_flight"] = run.ours.memory_bytes()
        wall1, cpu1 = time.perf_counter(), time.thread_time()
        run.backend.synchronize(run.optimizer)
        wall2, cpu2 = time.perf_counter(), time.thread_time()
        with HostSyncCounter() as inner:
            entry.update(run.precondition())
        wall3, cpu3 = time.perf_counter(), time.thread_time()
        run.backend.optimizer_step(run.optimizer)
        with whole.paused():  # the timing's own synchronisation
            synchronize(run.device)
        wall4, cpu4 = time.perf_counter(), time.thread_time()
    # On CUDA only the step's total is a device time; the parts are the host's (queueing) seconds.
    entry.update(
        wall=wall4 - wall0,
        cpu=cpu4 - cpu0,
        fwd_bwd_wall=wall1 - wall0,
        fwd_bwd_cpu=cpu1 - cpu0,
        allreduce_wall=wall2 - wall1,
        precond_wall=wall3 - wall2,
        precond_cpu=cpu3 - cpu2,
        opt_wall=wall4 - wall3,
        syncs_step=whole.count,
        syncs_precond=inner.count,
    )
    return entry, loss.detach()


def run_config(name: str, precision: str, args, backend, device) -> dict[str, Any]:
    import torch

    gc.collect()  # the previous configuration's model, hooks and factors (reference cycles)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run = Run(name, args, backend, device)
    counts = step_counts(name, args)
    if run.pattern is not None:
        counts["timed"] = len(run.pattern)
    batches = make_batches(args, backend.rank, device, 1 if run.static else 2)
    total = counts["discard"] + counts["timed"]
    steps: list[dict[str, Any]] = []
    losses = []
    backend.barrier()
    started = time.perf_counter()
    for t in range(1, total + 1):
        mark = f"mark.{precision}.{name}.{t}"
        backend.mark(mark, device)
        run.before_step(t)
        entry, loss = measure_step(run, batches[t % len(batches)], precision, probe_memory=t == total)
        run.after_step(t)
        if run.ours is not None:
            entry["phases"] = run.ours.collect_times()  # CUDA events on a GPU: waits for the last one
        entry.update(t=t, timed=t > counts["discard"], mark=mark)
        steps.append(entry)
        losses.append(loss)
    backend.mark(f"mark.{precision}.{name}.end", device)  # the last step's part of the timeline ends here
    result = {
        "steps": steps,
        **counts,
        "wall_s": time.perf_counter() - started,
        "losses": [float(loss) for loss in losses],
        **run.describe(),
    }  # describe() removes the hooks
    if name in VARIANT_OPTIONS:
        result["im2col_seconds"] = time_im2col(run, batches[0], precision, result["options"])
    if device.type == "cuda":
        result["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    return result


def time_im2col(run: Run, batch, precision: str, options: dict[str, Any]) -> float:
    """Seconds to unfold every k×k convolution's input of one forward pass as the capture hook does
    (chunk by chunk, in the dtype of the factor path: the captured bf16/fp16 on the narrow path, else a
    copy in the factor dtype; the library's own rule decides). Run after the configuration, its hooks
    removed."""
    import torch

    from kfac_hvd.precision import takes_narrow_inputs

    enabled = options.get("narrow_factor_products", False)
    inputs: dict[str, Any] = {}
    unfolding = {
        name: layer
        for name, layer in run.ours.layers.items()
        if hasattr(layer, "_pointwise") and not layer._pointwise
    }
    handles = [
        layer.module.register_forward_pre_hook(
            lambda _m, args, name=name: inputs.__setitem__(name, args[0].detach())
        )
        for name, layer in unfolding.items()
    ]
    with torch.no_grad(), autocast(run.args, run.device, precision):
        run.model(batch[0])
    for handle in handles:
        handle.remove()
    synchronize(run.device)
    started = time.perf_counter()
    for name, layer in unfolding.items():
        x = inputs[name]
        narrow = takes_narrow_inputs(x, layer.factor_dtype, enabled)
        per_sample = layer._input_sample_bytes(x, narrow)
        for chunk in sample_chunks(x, per_sample, run.ours.capture.chunk_bytes):
            layer._input_columns(chunk if narrow else chunk.to(layer.factor_dtype))
    synchronize(run.device)
    return time.perf_counter() - started


# Entry ------------------------------------------------------------------------------------------
def configs_for(args, size: int) -> list[str]:
    """The comparison with kfac-pytorch (and ours_nobn, its like-for-like row) runs at 1 rank, given a checkout;
    a variant whose option the measured library lacks is left out."""
    return [
        name
        for name in args.config_list
        if (name not in ONE_RANK_ONLY or (size == 1 and args.kfac_pytorch)) and not unsupported_options(name)
    ]


def pick_device(args, backend):
    import torch

    if args.device == "cuda":
        device = torch.device("cuda", backend.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def main(args) -> None:
    import torch

    backend = make_backend(args)
    warnings.filterwarnings(
        "ignore", message="Full backward hook is firing"
    )  # kfac-pytorch's hooks, harmless
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    device = pick_device(args, backend)
    out: dict[str, Any] = {
        "rank": backend.rank,
        "size": backend.size,
        "horovod": backend.horovod,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rank_batch": args.rank_batch,
        "runs": {},
        "not_in_library": {
            name: unsupported_options(name) for name in args.config_list if unsupported_options(name)
        },
    }
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    path = os.path.join(args.worker_dir, f"rank{backend.rank}.json")
    for precision in args.precision_list:
        for name in configs_for(args, backend.size):
            started = time.perf_counter()
            out["runs"][f"{precision}/{name}"] = run_config(name, precision, args, backend, device)
            with open(path, "w") as handle:
                json.dump(out, handle)
            if backend.rank == 0:
                print(
                    f"[step_cost] {backend.size} rank(s), {precision}/{name}: "
                    f"{time.perf_counter() - started:.1f} s",
                    flush=True,
                )
    backend.barrier()
