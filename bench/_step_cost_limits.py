"""Each phase of a K-FAC update step against the device's limits, for step_cost.py.

FLOPs and bytes come from the layer shapes (``kfac_hvd.analysis.timemodel.LayerProfile.phase_costs``, the same
cost rules as the step-time model); the peak rates from ``kfac_hvd.analysis.devices`` (datasheets) for a GPU,
and for the CPU from a large fp32 matrix product and a memory copy measured at the start of the run with
the ranks' thread count. A phase's limit is its roofline time, max(FLOP / peak FLOP/s, bytes / memory
bandwidth); the fraction of the limit is that time over the measured one (1 = at the device's limit).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any

# Library timer (kfac.collect_times) → phase of the table; "factor" is split into im2col and the rest.
PHASE_ROWS = (
    ("im2col", None),
    ("factor products", "factor"),
    ("factor allreduce", "factor_comm"),
    ("statistics", "schedule"),
    ("inversion", "inverse"),
    ("inverse allgather", "inverse_comm"),
    ("precondition", "precondition"),
)
EVERY_STEP = ("every", "every_wide", "every_unbatched")


def measure_cpu(threads: int) -> dict[str, Any]:
    """Peak rates of this CPU with ``threads`` torch threads: the best of three 2048³ fp32 products and
    of three copies of 256 MiB (read + write), timed in CPU seconds of the process, so that time spent
    waiting for a core on a shared machine does not lower them."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        source, target = torch.empty(2**26), torch.empty(2**26)
        a @ b
        target.copy_(source)
        matmul = copy = float("inf")
        for _ in range(3):
            started = time.process_time()
            a @ b
            matmul = min(matmul, (time.process_time() - started) / threads)
            started = time.process_time()
            target.copy_(source)
            copy = min(copy, time.process_time() - started)
    finally:
        torch.set_num_threads(previous)
    flops, bandwidth = 2 * 2048**3 / matmul, 2 * source.numel() * 4 / copy
    return {
        "name": "CPU",
        "fp32": flops,
        "memory_bandwidth": bandwidth,
        "link_bandwidth": bandwidth,
        "source": f"measured at the start of this run with {threads} torch thread(s), in CPU seconds: a 2048³ "
        f"fp32 product ({flops / 1e9:.1f} GFLOP/s) and a 256 MiB copy ({bandwidth / 1e9:.1f} GB/s read "
        "+ write); ranks on one host exchange through memory, so the copy rate stands for the link",
    }


def gpu_rates(device_name: str) -> dict[str, Any] | None:
    from kfac_hvd.analysis.devices import DEVICES, device_kind

    kind = device_kind(device_name)
    if kind is None:
        return None
    return asdict(DEVICES[kind])


def device_rates(data: dict[str, Any]) -> dict[str, Any] | None:
    if data.get("cpu_rates"):
        return data["cpu_rates"]
    per_rank = next((ranks for ranks in data["raw"].values() if ranks), None)
    name = per_rank[0].get("device_name") if per_rank else None
    return gpu_rates(name) if name else None


def layer_profile(settings: dict[str, Any]):
    """The model's layer shapes at the run's image size (torchvision on the meta device; 'tiny' as the worker builds it)."""
    import torch

    from bench._step_cost_worker import build_model
    from kfac_hvd.analysis.timemodel import profile_model

    args = argparse.Namespace(**dict(settings, channels_last=False))
    with torch.device("meta"):
        model = build_model(args, torch.device("meta"))
    return profile_model(model, image_size=settings["image_size"])


def phase_costs(profile, batch: int, ranks: int, *, input_bytes: int) -> dict[str, list[float]]:
    """[FLOP, bytes] per phase of an update step with every layer due, on one rank of ``ranks``."""
    totals = {phase: [0.0, 0.0] for phase, _ in PHASE_ROWS}
    for layer in profile.layers:
        for phase, (flop, nbytes) in layer.phase_costs(batch, input_bytes=input_bytes).items():
            totals[phase][0] += flop
            totals[phase][1] += nbytes
        cost = layer.cost()
        totals["factor allreduce"][1] += cost.allreduce_wire_bytes(ranks)
        totals["inverse allgather"][1] += cost.allgather_wire_bytes(ranks)
    return totals


def product_precision(precision: str, narrow: bool, device: str) -> str:
    """What the factor products multiply in: the autocast dtype on CUDA with the narrow path, else fp32."""
    return "bf16" if precision == "bf16" and narrow and device == "cuda" else "fp32"


def limit_rows(data: dict[str, Any], summary: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (ranks, every-step configuration, phase): FLOP, bytes, measured s, limit s, fraction."""
    rates = device_rates(data)
    if rates is None:
        return []
    settings = data["settings"]
    profile = layer_profile(settings)
    rows = []
    for n, runs in summary.items():
        for key, run in runs.items():
            precision, name = key.split("/")
            update = run["kinds"].get("update")
            if name not in EVERY_STEP or update is None:
                continue
            first = run["first"]
            narrow = first.get("options", {}).get("narrow_factor_products", False)
            products = product_precision(precision, narrow, settings["device"])
            batch = data["raw"][n][0]["rank_batch"]
            costs = phase_costs(profile, batch, int(n), input_bytes=4 if products == "fp32" else 2)
            im2col = first.get("im2col_seconds")
            for phase, timer in PHASE_ROWS:
                measured = im2col if timer is None else update["phases"].get(timer)
                if phase == "factor products" and measured is not None and im2col is not None:
                    measured = max(0.0, measured - im2col)
                flop, nbytes = costs[phase]
                bandwidth = (
                    rates["link_bandwidth"]
                    if phase.endswith(("allreduce", "allgather"))
                    else rates["memory_bandwidth"]
                )
                peak = rates.get(products) if phase == "factor products" else rates["fp32"]
                limit = max(flop / peak if peak else 0.0, nbytes / bandwidth)
                rows.append(
                    {
                        "ranks": n,
                        "config": key,
                        "phase": phase,
                        "flop": flop,
                        "bytes": nbytes,
                        "cpu_share": update["cpu"] / update["wall"] if update["wall"] else None,
                        "measured": measured,
                        "limit": limit,
                        "precision": products if flop else "–",
                        "fraction": limit / measured if measured and limit else None,
                    }
                )
    return rows


def limits_table(data: dict[str, Any], summary, label) -> list[str]:
    rows = limit_rows(data, summary)
    rates = device_rates(data)
    if not rows:
        return []
    lines = [
        "",
        f"## Each phase against the device's limit ({rates['name']}, update step, rank 0)",
        "",
        f"Limits: {rates['source']}. FLOP and bytes of an update step with every layer due, from the layer "
        "shapes (`LayerProfile.phase_costs`: the least memory traffic any implementation has); limit = "
        "max(FLOP / peak, bytes / bandwidth) at the peak of the phase's precision (the factor products': "
        "bf16 tensor cores on the narrow path under bf16 autocast on CUDA, else fp32; every other phase "
        "fp32); the collectives' bytes at the link rate. Measured: the library's phase timers; im2col timed "
        "alone after the run (each k×k convolution's input of one forward pass unfolded as the hook does), "
        "and taken out of the factor timer, whose rest is the factor products (with BatchNorm's sums and "
        "the casts).",
        "",
        "| ranks | configuration | phase | precision | GFLOP | GB | measured s | limit s | fraction of the limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if data["settings"]["device"] == "cpu":
        shares = ", ".join(sorted({f"{100 * row['cpu_share']:.0f}%" for row in rows if row["cpu_share"]}))
        lines[4:4] = [
            f"On the CPU the timers count wall seconds: the update steps ran for {shares} of their wall "
            "time (CPU s / wall s of the step) on a shared machine, so a phase's fraction understates "
            "what it reaches while it runs by about that share.",
            "",
        ]
    for row in rows:
        fraction = "–" if row["fraction"] is None else f"{row['fraction']:.3f}"
        measured = "–" if row["measured"] is None else f"{row['measured']:.4g}"
        lines.append(
            f"| {row['ranks']} | {label(row['config'], data['settings'])} | {row['phase']} | "
            f"{row['precision']} | {row['flop'] / 1e9:.3g} | {row['bytes'] / 1e9:.3g} | {measured} | "
            f"{row['limit']:.3g} | {fraction} |"
        )
    return lines
