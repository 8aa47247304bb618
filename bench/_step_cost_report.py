"""The reading side of step_cost.py: raw per-rank measurements → summary, target checks, the formatters of
the Markdown tables (written by :mod:`_step_cost_document`)."""

from __future__ import annotations

from typing import Any

from bench._common import mean, median

TITLES = {
    "sgd": "SGD",
    "every": "K-FAC every step",
    "every_wide": "K-FAC every step, products of fp32 copies",
    "every_unbatched": "K-FAC every step, one inversion call per factor",
    "replay": "K-FAC, recorded schedule replayed",
    "lambda": "K-FAC λ = {lam}, factors held still",
    "floor": "preconditioning floor",
    "ours_nobn": "ours every step, no BN, factor_decay {decay}",
    "kfacpt_every": "kfac-pytorch every step (inverse)",
    "kfacpt_example": "kfac-pytorch 10/100 schedule",
    "kfacpt_every_eigen": "kfac-pytorch every step (eigen)",
}
PHASES = ("factor", "factor_comm", "schedule", "inverse", "inverse_comm", "precondition")
MEMORY = ("factors", "inverses", "capture_buffers", "communication_buffers", "caches", "total")
TARGET_VS_KFACPT, TARGET_LAMBDA, MAX_UPDATE_SYNCS = 0.8, 1.5, 3
EXAMPLE_PERIOD = 100  # kfac-pytorch's example: inverses every 100 steps, factors every 10


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def secs(value: float | None) -> str:
    """Seconds to three significant figures (a tiny smoke model's steps take milliseconds)."""
    return "–" if value is None else f"{value:.3g}"


def mib(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**20:.1f}"


# Summary ----------------------------------------------------------------------------------------
def step_kind(step: dict[str, Any]) -> str | None:
    if "kind" in step:
        return step["kind"]
    if "due" in step:
        return "update" if step["due"] else "idle"
    return None


def merged_steps(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step i over the ranks: they run in lockstep, so a step lasts (and works) as long as its slowest rank."""
    merged = []
    for i in range(min(len(run["steps"]) for run in runs)):
        row = dict(runs[0]["steps"][i])
        for key in ("wall", "cpu", "precond_cpu", "syncs_step", "syncs_precond"):
            row[key] = max(run["steps"][i][key] for run in runs)
        merged.append(row)
    return merged


def collectives(step: dict[str, Any]) -> dict[str, int] | None:
    return step.get("collectives")


def count_collectives(found: dict[tuple[str, str], list[int]]) -> dict[str, int]:
    """One step's part of the timeline (``read_collectives``: (op, name) → [count, bytes]) by kind."""
    out = dict(
        kfac_allreduce=0,
        kfac_allreduce_bytes=0,
        inverse_allgather=0,
        inverse_allgather_bytes=0,
        broadcast=0,
        other=0,
    )
    for (op, name), (count, size) in found.items():
        if name.startswith("mark."):
            continue
        if op == "allreduce" and name.startswith("kfac."):
            out["kfac_allreduce"] += count
            out["kfac_allreduce_bytes"] += size
        elif op == "allgather" and name == "kfac.inverses":
            out["inverse_allgather"] += count
            out["inverse_allgather_bytes"] += size
        elif op == "broadcast":
            out["broadcast"] += count
        else:
            out["other"] += count
    return out


def summarise_run(name: str, runs: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    steps = merged_steps(runs)
    timed = [s for s in steps if s["timed"]]
    out: dict[str, Any] = {
        "wall": median([s["wall"] for s in timed]),
        "cpu": median([s["cpu"] for s in timed]),
        "range": [min(s["wall"] for s in timed), max(s["wall"] for s in timed)] if timed else None,
        "precond_cpu": median([s["precond_cpu"] for s in timed]),
        "timed": len(timed),
        "first": runs[0],
        "kinds": {},
    }
    for kind in sorted({step_kind(s) for s in timed} - {None}) or [None]:
        chosen = [s for s in timed if step_kind(s) == kind]
        out["kinds"][kind or "step"] = {
            "count": len(chosen),
            "wall": median([s["wall"] for s in chosen]),
            "cpu": median([s["cpu"] for s in chosen]),
            "syncs_precond": max(s["syncs_precond"] for s in chosen),
            "syncs_step": max(s["syncs_step"] for s in chosen),
            "started": chosen[0].get("started"),
            "collectives": distinct([collectives(s) for s in chosen]),
            "phases": {p: mean([s.get("phases", {}).get(p, 0.0) for s in chosen]) for p in PHASES},
        }
    if name == "replay":  # the steady state of a real schedule: every replayed step counts
        out.update(
            wall=mean([s["wall"] for s in timed]),
            cpu=mean([s["cpu"] for s in timed]),
            due_fraction=mean([s["due"] / runs[0]["layers"] for s in timed]),
        )
    if name == "lambda":
        window = [s for s in steps if s["t"] >= settings["lambda_steady_from"]]
        out.update(
            wall=mean([s["wall"] for s in window]),
            cpu=mean([s["cpu"] for s in window]),
            window=[window[0]["t"], window[-1]["t"]],
            due_pattern=[s.get("due") for s in steps],
        )
    if name == "kfacpt_example" and len(timed) >= EXAMPLE_PERIOD:
        period = timed[:EXAMPLE_PERIOD]  # one whole period: 9 factor steps, 90 plain, 1 inverse step
        out.update(period_wall=mean([s["wall"] for s in period]), period_cpu=mean([s["cpu"] for s in period]))
    return out


def distinct(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if value not in out:
            out.append(value)
    return out


def example_amortised(example: dict[str, Any], every: dict[str, Any] | None, key: str) -> float | None:
    """kfac-pytorch's 10/100 schedule per step over one period: 1 inverse step (its every-step cost),
    9 factor steps and 90 plain steps, from the medians of each kind (or measured over a whole period)."""
    if f"period_{key}" in example:
        return example[f"period_{key}"]
    kinds = example["kinds"]
    if every is None or "plain" not in kinds or "factor" not in kinds:
        return None
    return (every[key] + 9 * kinds["factor"][key] + 90 * kinds["plain"][key]) / EXAMPLE_PERIOD


def summarise(data: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{ranks: {"precision/config": summary}}, with ratios to SGD and the floor of the same launch."""
    settings = data["settings"]
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for n, per_rank in data["raw"].items():
        if not per_rank:
            continue
        runs = {
            key: summarise_run(
                key.split("/")[1], [rank["runs"][key] for rank in per_rank if key in rank["runs"]], settings
            )
            for key in per_rank[0]["runs"]
            if all(key in rank["runs"] for rank in per_rank)
        }
        for key, run in runs.items():  # kfac-pytorch's 10/100 schedule: its cost per step over a period
            if key.endswith("/kfacpt_example"):
                every = runs.get(key.replace("kfacpt_example", "kfacpt_every"))
                run["wall"], run["cpu"] = (
                    example_amortised(run, every, "wall"),
                    example_amortised(run, every, "cpu"),
                )
        for key, run in runs.items():
            precision = key.split("/")[0]
            for base in ("sgd", "floor"):
                other = runs.get(f"{precision}/{base}")
                run[f"x_{base}"] = ratio(run["wall"], other["wall"]) if other else None
                run[f"cpu_x_{base}"] = ratio(run["cpu"], other["cpu"]) if other else None
        summary[n] = runs
    return summary


# Target checks ----------------------------------------------------------------------------------
def verdict(wall_ok: bool | None, cpu_ok: bool | None) -> str:
    if wall_ok is None:
        return "not measured"
    if cpu_ok is None or cpu_ok == wall_ok:
        return "PASS" if wall_ok else "MISS"
    return f"{'PASS' if wall_ok else 'MISS'} by wall clock, {'PASS' if cpu_ok else 'MISS'} by CPU seconds"


def at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def check_vs_kfacpt(summary) -> list[tuple[str, str, str]]:
    out = []
    for key, run in summary.get("1", {}).items():
        if not key.endswith("/ours_nobn"):
            continue
        theirs = summary["1"].get(key.replace("ours_nobn", "kfacpt_every"))
        wall = ratio(run["wall"], theirs["wall"]) if theirs else None
        cpu = ratio(run["cpu"], theirs["cpu"]) if theirs else None
        out.append(
            (
                f"ours every step ≤ {TARGET_VS_KFACPT}× kfac-pytorch every step (1 rank, same features, "
                f"{key.split('/')[0]})",
                f"{fmt(wall)}× wall, {fmt(cpu)}× CPU s",
                verdict(at_most(wall, TARGET_VS_KFACPT), at_most(cpu, TARGET_VS_KFACPT)),
            )
        )
    return out or [("ours every step ≤ 0.8× kfac-pytorch every step", "no kfac-pytorch run", "not measured")]


def check_lambda(summary) -> list[tuple[str, str, str]]:
    out = []
    for n, runs in summary.items():
        for key, run in runs.items():
            floor = runs.get(key.replace("lambda", "floor"))
            if not key.endswith("/lambda") or floor is None:
                continue
            out.append(
                (
                    f"λ steady state ≤ {TARGET_LAMBDA}× floor ({n} rank{'s' * (n != '1')}, {key.split('/')[0]})",
                    f"{fmt(run['x_floor'])}× wall, {fmt(run['cpu_x_floor'])}× CPU s",
                    verdict(
                        at_most(run["x_floor"], TARGET_LAMBDA), at_most(run["cpu_x_floor"], TARGET_LAMBDA)
                    ),
                )
            )
    return out


def check_collectives(summary, settings) -> list[tuple[str, str, str]]:
    out = []
    for n, runs in summary.items():
        for key, run in runs.items():
            name = key.split("/")[1]
            if n == "1" or name not in ("every", "lambda"):
                continue
            travels = run["first"]["layers"] > run["first"]["local_layers"] or name == "lambda"
            for kind, expect_inverse in (("update", int(travels)), ("idle", 0)):
                entry = run["kinds"].get(kind)
                if entry is None:
                    continue
                seen = [c for c in entry["collectives"] if c is not None]
                factors = sum((entry["started"] or {}).values())
                ok = bool(seen) and all(
                    c["kfac_allreduce"] == factors
                    and c["inverse_allgather"] == expect_inverse
                    and c["broadcast"] == 0
                    for c in seen
                )
                shown = (
                    "; ".join(
                        f"{c['kfac_allreduce']} kfac allreduces, {c['inverse_allgather']} inverse allgather, "
                        f"{c['broadcast']} broadcasts"
                        for c in seen
                    )
                    or "no timeline"
                )
                step = "update step" if kind == "update" else "step with nothing due"
                out.append(
                    (
                        f"{step}: {factors} factor allreduces + {expect_inverse} inverse collective, no broadcast "
                        f"({n} ranks, {label(key, settings)})",
                        shown,
                        "PASS" if ok else "MISS",
                    )
                )
    return out


def check_host_syncs(summary) -> list[tuple[str, str, str]]:
    out = []
    for n, runs in summary.items():
        worst = {"update": None, "idle": None}
        whole = {"update": None, "idle": None}
        for key, run in runs.items():
            if key.split("/")[1] not in ("every", "lambda", "floor"):
                continue
            for kind in worst:
                entry = run["kinds"].get(kind)
                if entry:
                    worst[kind] = max(worst[kind] or 0, entry["syncs_precond"])
                    whole[kind] = max(whole[kind] or 0, entry["syncs_step"])
        if worst["idle"] is not None:
            out.append(
                (
                    f"0 host reads in kfac.step on a step with nothing due ({n} rank{'s' * (n != '1')})",
                    f"{worst['idle']} (whole step {whole['idle']})",
                    "PASS" if worst["idle"] == 0 else "MISS",
                )
            )
        if worst["update"] is not None:
            out.append(
                (
                    f"≤ {MAX_UPDATE_SYNCS} host reads in kfac.step on an update step ({n} rank{'s' * (n != '1')})",
                    f"{worst['update']} (whole step {whole['update']})",
                    "PASS" if worst["update"] <= MAX_UPDATE_SYNCS else "MISS",
                )
            )
    return out


def checks(summary, settings) -> list[tuple[str, str, str]]:
    return (
        check_vs_kfacpt(summary)
        + check_lambda(summary)
        + check_collectives(summary, settings)
        + check_host_syncs(summary)
    )


# Markdown ---------------------------------------------------------------------------------------
def label(key: str, settings: dict[str, Any]) -> str:
    precision, name = key.split("/")
    title = TITLES[name].format(
        lam=f"{settings['update_threshold']:g}", decay=f"{settings['factor_decay']:g}"
    )
    return f"{title} ({precision})" if "," in settings["precisions"] else title


def header(data: dict[str, Any]) -> list[str]:
    s, m = data["settings"], data["machine"]
    batches = ", ".join(
        f"{n} rank{'s' * (n != '1')}: {ranks[0]['rank_batch']}" for n, ranks in data["raw"].items() if ranks
    )
    launches = ", ".join(
        f"{r['ranks']} rank(s) via {r['launcher']}: {r['wall_s'] / 60:.1f} min" for r in data["launches"]
    )
    gpu = f", {', '.join(m['cuda_devices'])}" if m.get("cuda_devices") else ""
    return [
        f"# Step cost: {s['model']} on {s['device'].upper()} at {', '.join(data['raw'])} rank(s)",
        "",
        f"{s['model']} (torchvision, random initialisation), synthetic data, {s['image_size']}×{s['image_size']} "
        f"images, {s['num_classes']} classes, batch per rank ({batches}: a global batch of {s['batch']} split over "
        f"the ranks{', per rank' if s['per_rank_batch'] else ''}), {s['threads']} torch thread(s) per rank, "
        f"precision {s['precisions']}{', channels-last' if s['channels_last'] else ''}; K-FAC damping "
        f"{s['damping']:g}, kl_clip {s['kl_clip']:g}, {s['inverse_method']} inverses. Generated by:",
        "",
        "```bash",
        data["command"],
        "```",
        "",
        f"Machine: {m.get('nproc')} cores ({m.get('cpu')}){gpu}, {m.get('memory_gib')} GiB, torch {m.get('torch')}, "
        f"Horovod {m.get('horovod')}. Load average at start {m.get('load_average')}, at end "
        f"{data.get('load_average_end')}. Code {data.get('git')}; kfac_hvd measured from the "
        f"{data['library']['source']} (sha256 {data['library']['sha256']}), copied once for every launch"
        + (f"; kfac-pytorch checkout {data['kfac_pytorch']}" if data.get("kfac_pytorch") else "")
        + f". Total {data['total_wall_s'] / 60:.1f} min ({launches}).",
        "",
        reading(s["device"]),
    ]


def reading(device: str) -> str:
    if device == "cuda":
        return (
            "Each step is timed between two `torch.cuda.synchronize` calls, so its wall seconds are the device's; "
            "the CPU seconds are the host thread's, including its wait in the synchronisation, and say little."
        )
    return (
        "**Read the ratios, not the seconds.** The machine is shared; each ratio compares configurations of one "
        "launch, minutes apart. CPU seconds (of each rank's training thread, which with one torch thread does "
        "the computation; the busiest rank) count the work whatever the time spent descheduled or waiting."
    )


def notes(data) -> list[str]:
    s = data["settings"]
    out = ["", "## Not measured", ""]
    for n, ranks in data["raw"].items():
        for name, options in (ranks[0].get("not_in_library", {}) if ranks else {}).items():
            out.append(f"- {TITLES[name]} ({n} rank(s)): the measured library has no {', '.join(options)}.")
    if s["device"] == "cpu":
        out.append(
            "- GPUs: this run is on CPU. The GPU path (`--device cuda`: steps timed between "
            "`torch.cuda.synchronize` calls, `torch.cuda.max_memory_allocated`, `--precisions fp32,bf16`, "
            "`--channels-last`) is measured only where one is present; see the docstring for the one-liner."
        )
    if any(launch["launcher"] == "direct" for launch in data["launches"]):
        out.append(
            "- Horovod, where a launch ran without it (launcher `direct`: Horovod did not import, so 1 rank ran "
            "with the library's local communicator and a plain optimiser): no collectives, no timeline."
        )
    if not data.get("kfac_pytorch"):
        out.append("- kfac-pytorch: no checkout given (`--kfac-pytorch PATH`).")
    else:
        out.append(
            "- kfac-pytorch at more than one rank (it needs torch.distributed; compared in a world of one)."
        )
    if s["device"] == "cuda" and max(int(n) for n in data["raw"]) == 1:
        out.append("- More than one GPU: this run has 1 rank.")
    out += [
        "- The λ schedule on this model's own training trajectory: the λ run holds the factors still (the "
        "modulo rule's worst case); the replay imposes the due pattern another model recorded "
        "(--schedule-trace), mapped by layer type and depth.",
        "- Host reads inside C++ (e.g. implicit device syncs of some CUDA ops): the counter sees Python-level "
        "tensor reads (`item`, `tolist`, `bool`, `float`, `int`, `numpy`) only.",
        "",
        "## Notes",
        "",
        f"- Timed steps: SGD, every-step K-FAC and the kfac-pytorch every-step rows after {s['warmup']} untimed "
        f"step(s); the floor after 2 discarded steps (step 1 inverts everything, step 2 still captures what was "
        f"armed before the freeze); the λ run from step 1 (steady state from step {s['lambda_steady_from']}); "
        "kfac-pytorch's 10/100 run after its step 0.",
        f"- With several ranks on {data['machine'].get('nproc')} cores, each rank may get less than a core and "
        "Horovod's background threads compete with them: wall seconds then include waiting for a core; CPU "
        "seconds do not.",
        "- Horovod collectives are read from `HOROVOD_TIMELINE` (rank 0 writes it), split at a one-value "
        "allreduce (`mark.*`) issued before each step outside its timing; 1 rank issues no collective.",
    ]
    return out
