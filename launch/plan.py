"""``--dry-run``: the experiment plan for the configured world size, without launching anything."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

import kfac_hvd
from kfac_hvd.analysis.traffic import every_step_traffic
from kfac_hvd.analysis.units import format_bytes
from launch.config.load import data_problems
from launch.training.data import steps_per_epoch, train_size
from launch.training.models import build_model


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if isinstance(module, nn.Linear):
        return "linear"
    return type(module).__name__


def make_plan(cfg) -> dict[str, Any]:
    """Build the model (and K-FAC's layer registry) in this process and compute the plan."""
    warnings = [str(p).replace("config error", "warning", 1) for p in data_problems(cfg)]
    world = cfg.train.world_size or 1
    if cfg.train.world_size is None:
        warnings.append("warning: train.world_size is not set; planning for 1 rank")
    d = cfg.data
    n_train = train_size(cfg)
    spe = steps_per_epoch(n_train, world, d.batch_size, d.drop_last)
    total = spe * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    plan: dict[str, Any] = {
        "config": cfg.path,
        "model": cfg.model.name,
        "parameters": n_params,
        "method": cfg.optim.method,
        "world_size": world,
        "batch_per_rank": d.batch_size,
        "micro_batches": cfg.train.accumulation_steps,
        "global_batch": d.batch_size * world,
        "dataset": d.dataset,
        "train_images": n_train,
        "epochs": cfg.train.epochs,
        "steps_per_epoch": spe,
        "steps": total,
        "steps_continuous": n_train * cfg.train.epochs / (d.batch_size * world),
        "warnings": warnings,
    }
    if cfg.optim.method == "kfac":
        kfac = kfac_hvd.KFAC(model, options=cfg.kfac_options(spe))
        names = list(kfac.layer_names)
        modules = dict(model.named_modules())
        kinds: dict[str, int] = {}
        for name in names:
            kind = _kind(modules[name]) if name in modules else "other"
            kinds[kind] = kinds.get(kind, 0) + 1
        costs = kfac.inversion_costs()
        local = list(kfac.local_layers)
        # Only the layers whose inverses travel are partitioned; every rank inverts the local ones.
        assignment = kfac.assign(world)
        load = [float(x) for x in assignment.load]
        per_rank_layers = [0] * world
        for owner in assignment.owner.values():
            per_rank_layers[owner] += 1
        traffic = every_step_traffic(kfac.layer_costs.values(), world, total)
        plan["kfac"] = {
            "layers": len(names),
            "layer_kinds": kinds,
            "update_threshold": cfg.kfac.update_threshold,
            "update_interval": cfg.kfac.update_interval,
            "interval_warmup_epochs": cfg.kfac.interval_warmup_epochs,
            "interval_policy": cfg.kfac.interval_policy,
            "damping": cfg.kfac.damping,
            "local_inverse_max_dim": kfac.options.local_inverse_max_dim,
            "locally_inverted_layers": len(local),
            "local_inversion_load": float(sum(costs[name] for name in local)),
            "assigned_layers": len(assignment.owner),
            "inversion_load_per_rank": load,
            "layers_per_rank": per_rank_layers,
            "ranks_without_layers": sum(1 for c in per_rank_layers if c == 0),
            "imbalance": float(assignment.imbalance),
            "every_step_traffic": {k: v for k, v in traffic.items() if _jsonable(v)},
        }
    return plan


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def format_plan(plan: dict[str, Any]) -> str:
    lines = [f"plan for {plan['config']} (dry run: nothing launched)"]
    row = lambda k, v: lines.append(f"  {k:<22} {v}")  # noqa: E731
    row("model", f"{plan['model']} ({plan['parameters']:,} parameters)")
    row("method", plan["method"])
    row("ranks", plan["world_size"])
    micro = plan["micro_batches"]
    row(
        "batch",
        f"{plan['batch_per_rank']} per rank, {plan['global_batch']} global"
        + (
            f"; {micro} micro-batches of {plan['batch_per_rank'] // micro} per rank a step"
            if micro > 1
            else ""
        ),
    )
    row("data", f"{plan['dataset']}, {plan['train_images']} training images")
    row(
        "steps",
        f"{plan['steps_per_epoch']} per epoch x {plan['epochs']} epochs -> {plan['steps']} "
        f"(epochs x images / global batch = {plan['steps_continuous']:.1f})",
    )
    k = plan.get("kfac")
    if k:
        kinds = ", ".join(f"{v} {n}" for n, v in sorted(k["layer_kinds"].items()))
        row("K-FAC layers", f"{k['layers']} ({kinds})")
        lam = k["update_threshold"]
        every = k.get("update_interval", 1)
        if lam is None:
            warmup = k.get("interval_warmup_epochs") or 0.0
            row(
                "factor updates",
                "every step"
                if every == 1
                else f"every {every} steps (fixed interval)"
                + (f" after every step for {warmup:g} epochs" if warmup > 0 and every > 1 else ""),
            )
        else:
            row(
                "factor updates",
                f"adaptive, lambda = {lam} ({k['interval_policy']} rule"
                + (f", starting interval {every})" if every > 1 else ")"),
            )
        row("damping", k["damping"])
        load = k["inversion_load_per_rank"]
        mean = sum(load) / len(load) if load else 0.0
        row(
            "inverted on every rank",
            f"{k['locally_inverted_layers']} layers (BatchNorm, and Kronecker layers with "
            f"both factors <= {k['local_inverse_max_dim']} wide), load "
            f"{k['local_inversion_load']:.3g} per rank; their inverses never travel",
        )
        row(
            "inverted by an owner",
            f"{k['assigned_layers']} layers, partitioned over {len(load)} ranks by dim(A)^3 + dim(G)^3",
        )
        row(
            "inversion load",
            f"max {max(load):.3g}, mean {mean:.3g}, imbalance (max/mean) "
            f"{k['imbalance']:.3f}; ranks without layers: {k['ranks_without_layers']}",
        )
        ranks = list(enumerate(zip(k["layers_per_rank"], load)))
        if len(ranks) > 16:
            lines.append("  heaviest ranks (rank: layers, load):")
            ranks = sorted(ranks, key=lambda r: (-r[1][1], r[0]))[:8]
        else:
            lines.append("  per-rank inversion load (rank: layers, load):")
        cells = [f"{r}: {n}, {x:.3g}" for r, (n, x) in ranks]
        for i in range(0, len(cells), 4):
            lines.append("    " + " | ".join(cells[i : i + 4]))
        _traffic_rows(row, k["every_step_traffic"], plan["steps"])
    for w in plan["warnings"]:
        lines.append(w)
    return "\n".join(lines)


def _traffic_rows(row: Callable[[str, Any], None], t: dict[str, Any], steps: int) -> None:
    """The every-step Fisher traffic of the plan (wire model), one decimal."""
    wire = t.get("wire_bytes_per_rank")
    if wire is not None:
        row(
            "every-step Fisher",
            f"{format_bytes(wire, digits=1)} per rank over {steps} steps "
            f"({format_bytes(wire / max(steps, 1), digits=1)} per step; factor "
            f"allreduce + one inverse allgather, wire model)",
        )
        row(
            "",
            f"factor allreduce {format_bytes(t['factor_allreduce_wire_bytes_per_rank'], digits=1)}, "
            f"inverse allgather {format_bytes(t['inverse_allgather_wire_bytes_per_rank'], digits=1)} "
            f"({t['travelling_layers']} layers' inverses)",
        )
        dense = t.get("allreduce_only_dense_wire_bytes_per_rank")
        if dense is not None:
            row("", f"{format_bytes(dense, digits=1)} as a dense fp32 factor allreduce alone")


def dry_run(cfg, plan_json: str | None = None) -> int:
    plan = make_plan(cfg)
    for w in plan["warnings"]:
        print(w, file=sys.stderr)
    text = format_plan({**plan, "warnings": []})
    print(text)
    if plan_json:
        with open(plan_json, "w", encoding="utf-8") as fh:
            json.dump(plan, fh, indent=2)
    return 0
