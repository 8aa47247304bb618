"""The step-cost report's tables of measured figures per configuration (kept apart from the summary and
the checks of :mod:`_step_cost_report`, whose formatters they use)."""

from __future__ import annotations

from bench._common import mean
from bench._step_cost_limits import EVERY_STEP
from bench._step_cost_report import EXAMPLE_PERIOD, MEMORY, PHASES, checks, fmt, label, mib, secs


def targets_table(data, summary) -> list[str]:
    lines = ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    return lines + [
        f"| {target} | {measured} | **{result}** |"
        for target, measured, result in checks(summary, data["settings"])
    ]


def steps_table(data, summary) -> list[str]:
    s = data["settings"]
    lines = [
        "",
        "## Seconds per step",
        "",
        "Median over the timed steps [min–max]; the λ row is its steady state (mean over its steady-state "
        "window). host reads: Python-level tensor reads in `kfac.step()` (or kfac-pytorch's `step()`) per "
        "kind of step, update / nothing due (kfac-pytorch: inverse / factor / plain), and in the whole step. "
        "K-FAC MiB: `kfac.memory_bytes()['total']` after the last step (rank 0).",
        "",
        "| ranks | configuration | s/step wall | CPU s/step | × SGD (wall / CPU) | × floor (wall / CPU) | "
        "host reads in step() | host reads, whole step | K-FAC MiB | timed steps |",
        "|" + "---|" * 10,
    ]
    for n, runs in summary.items():
        for key, run in runs.items():
            kinds = run["kinds"]
            reads = " / ".join(str(k["syncs_precond"]) for k in kinds.values())
            whole = " / ".join(str(k["syncs_step"]) for k in kinds.values())
            memory = run["first"].get("memory_after_step", {}).get("total")
            lo, hi = run["range"] or (None, None)
            what = {
                "lambda": " steady state, steps",
                "replay": " mean of the replayed steps, steps",
                "kfacpt_example": f" per step over {EXAMPLE_PERIOD}, steps",
            }
            spread = f"[{what.get(key.split('/')[1], '')} {secs(lo)}–{secs(hi)}]".replace("[ ", "[")
            lines.append(
                f"| {n} | {label(key, s)} | {secs(run['wall'])} {spread} | "
                f"{secs(run['cpu'])} | {fmt(run['x_sgd'])} / {fmt(run['cpu_x_sgd'])} | {fmt(run['x_floor'])} / "
                f"{fmt(run['cpu_x_floor'])} | {reads} | {whole} | {mib(memory)} | {run['timed']} |"
            )
    return lines


def work_table(data, summary) -> list[str]:
    """CPU seconds of each rank on an every-step update, beside what it inverts: where a rank's work goes."""
    rows = []
    for n, per_rank in data["raw"].items():
        for rank in per_rank:
            for key, run in rank["runs"].items():
                if key.split("/")[1] not in EVERY_STEP:
                    continue
                timed = [step for step in run["steps"] if step["timed"]]
                owned = run["assignment"]["layers_owned"][rank["rank"]]
                rows.append(
                    f"| {n} | {label(key, data['settings'])} | {rank['rank']} | {owned} + {run['local_layers']} | "
                    f"{secs(mean([step['fwd_bwd_cpu'] for step in timed]))} | "
                    f"{secs(mean([step['precond_cpu'] for step in timed]))} | "
                    f"{secs(mean([step['cpu'] for step in timed]))} | {secs(mean([step['wall'] for step in timed]))} |"
                )
    if not rows:
        return []
    return [
        "",
        "## Work per rank (K-FAC every step and its variants, mean of the timed steps)",
        "",
        "CPU seconds of each rank's training thread. Layers inverted here: those it owns (their inverses travel "
        "in the allgather) + those every rank inverts (max factor dim ≤ local_inverse_max_dim, and BatchNorm).",
        "",
        "| ranks | configuration | rank | layers inverted here | fwd+bwd CPU s (with factor capture) | "
        "kfac.step CPU s | step CPU s | step wall s |",
        "|" + "---|" * 8,
    ] + rows


def comparison_table(data, summary) -> list[str]:
    runs = summary.get("1", {})
    if not any(key.split("/")[1].startswith("kfacpt") for key in runs):
        return []
    s = data["settings"]
    lines = [
        "",
        "## Ours against kfac-pytorch (1 rank)",
        "",
        "kfac-pytorch (gpauloski/kfac-pytorch, imported from the checkout) uses torch.distributed for several "
        "ranks, so the comparison is in a world of one, no process group. It registers Linear and Conv2d only "
        "(no BatchNorm blocks) and keeps running-average factors (factor_decay 0.95), so the like-for-like row "
        "of ours is `include_batchnorm=False, factor_decay=0.95`; both use the same damping value (kfac-pytorch "
        "adds it to each factor, ours splits √γ with π), kl_clip and lr, and explicit inverses (its "
        "`compute_method='inverse'`: torch.linalg.inv; ours: Cholesky). The 10/100 row is its ImageNet example's "
        "schedule (factors every 10 steps, inverses every 100) per step over one period: 1 inverse step (its "
        "every-step median), 9 factor steps and 90 plain steps (their medians in this run), unless the run "
        "covered a whole period.",
        "",
        "| configuration | s/step wall | CPU s/step | CPU s in step() | host reads in step() | memory MiB |",
        "|---|---|---|---|---|---|",
    ]
    for key, run in runs.items():
        name = key.split("/")[1]
        if name not in ("every", "floor", "ours_nobn") and not name.startswith("kfacpt"):
            continue
        first = run["first"]
        memory = (first.get("memory_after_step") or {}).get("total") or (
            first.get("theirs_memory") or {}
        ).get("total")
        reads = " / ".join(f"{k} {v['syncs_precond']}" for k, v in run["kinds"].items())
        if name == "kfacpt_example":
            for kind, entry in run["kinds"].items():
                lines.append(
                    f"| {label(key, s)}: {kind} step | {secs(entry['wall'])} | {secs(entry['cpu'])} | – | "
                    f"{entry['syncs_precond']} | {mib(memory)} |"
                )
            lines.append(
                f"| {label(key, s)}: per step over {EXAMPLE_PERIOD} | {secs(run['wall'])} | "
                f"{secs(run['cpu'])} | – | – | |"
            )
            continue
        lines.append(
            f"| {label(key, s)} | {secs(run['wall'])} | {secs(run['cpu'])} | {secs(run['precond_cpu'])} | "
            f"{reads} | {mib(memory)} |"
        )
    return lines


def collectives_table(data, summary) -> list[str]:
    rows = [
        (n, key, kind, entry)
        for n, runs in summary.items()
        if n != "1"
        for key, run in runs.items()
        for kind, entry in run["kinds"].items()
        if any(c for c in entry["collectives"])
    ]
    if not rows:
        return []
    lines = [
        "",
        "## Collectives per step (Horovod timeline, rank 0)",
        "",
        "Counted per tensor row (Horovod fuses the factor allreduces of a step into few operations, but names "
        "each tensor). factors started: the library's `factor_allreduces_started` (from the capture hooks / "
        "from `kfac.step`). gradient: the optimiser's allreduces. Bytes as the timeline reports them.",
        "",
        "| ranks | configuration | step | kfac.* allreduces (MiB) | factors started (hooks / step) | "
        "kfac.inverses allgathers (MiB) | broadcasts | gradient allreduces |",
        "|" + "---|" * 8,
    ]
    for n, key, kind, entry in rows:
        started = entry["started"] or {}
        for c in (c for c in entry["collectives"] if c):
            lines.append(
                f"| {n} | {label(key, data['settings'])} | {kind} | {c['kfac_allreduce']} "
                f"({mib(c['kfac_allreduce_bytes'])}) | {started.get('hooks', '–')} / {started.get('step', '–')} | "
                f"{c['inverse_allgather']} ({mib(c['inverse_allgather_bytes'])}) | {c['broadcast']} | "
                f"{c['other']} |"
            )
    return lines


def memory_table(data, summary) -> list[str]:
    lines = [
        "",
        "## K-FAC memory (rank 0, MiB)",
        "",
        "`kfac.memory_bytes()` after the last step, and (in flight) after the last backward pass, when the "
        "factors' allreduce buffers are held; CUDA peak: `torch.cuda.max_memory_allocated` over the "
        "configuration (model, activations and K-FAC).",
        "",
        "| ranks | configuration | "
        + " | ".join(MEMORY)
        + " | in flight: communication buffers | CUDA peak |",
        "|---|---|" + "---|" * (len(MEMORY) + 2),
    ]
    for n, runs in summary.items():
        for key, run in runs.items():
            first = run["first"]
            after = first.get("memory_after_step")
            if after is None and first.get("cuda_max_memory_allocated") is None:
                continue
            flight = (first["steps"][-1].get("memory_in_flight") or {}).get("communication_buffers")
            lines.append(
                f"| {n} | {label(key, data['settings'])} | "
                + " | ".join(mib((after or {}).get(c)) for c in MEMORY)
                + f" | {mib(flight)} | {mib(first.get('cuda_max_memory_allocated'))} |"
            )
    return lines


def phases_table(data, summary) -> list[str]:
    lines = [
        "",
        "## Where K-FAC's time goes (library phase timers, update steps, rank 0, s)",
        "",
        '`kfac.collect_times()` per step: "factor" runs in the capture hooks during forward and backward; the '
        "rest inside `kfac.step()`. On CUDA these are CUDA-event times.",
        "",
        "| ranks | configuration | " + " | ".join(PHASES) + " | step wall |",
        "|---|---|" + "---|" * (len(PHASES) + 1),
    ]
    for n, runs in summary.items():
        for key, run in runs.items():
            entry = run["kinds"].get("update")
            if entry is not None:
                lines.append(
                    f"| {n} | {label(key, data['settings'])} | "
                    + " | ".join(secs(entry["phases"][p]) for p in PHASES)
                    + f" | {secs(entry['wall'])} |"
                )
    return lines
