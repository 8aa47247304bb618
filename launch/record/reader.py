"""A run folder read back for its pictures: metrics.jsonl as arrays (steps × layers), summary.json and
config.yaml for the method. Read-only; a truncated metrics.jsonl (a killed job) gives what is complete."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from launch.record.writer import metrics_records


class NotARun(ValueError):
    """The folder holds no run (no metrics.jsonl) or nothing in it can be drawn."""


@dataclass
class RunLog:
    path: str
    name: str  # the folder's name, as the table shows it
    method: str  # report.method_label
    threshold: float | None  # λ, None without the adaptive interval
    summary: dict[str, Any] | None
    steps: np.ndarray  # training records' steps
    lr: np.ndarray
    loss: np.ndarray
    acc: np.ndarray
    train_time: np.ndarray  # cumulative step times at each record (s)
    evals: list[dict[str, Any]] = field(default_factory=list)
    # K-FAC: cumulative Fisher bytes per rank at each record; NaN where a record has none.
    wire_bytes: np.ndarray | None = None
    every_step_wire_bytes: np.ndarray | None = None
    ratio: np.ndarray | None = None
    fisher_payload_bytes: np.ndarray | None = None  # cumulative Fisher payload per rank at each record
    mean_interval: np.ndarray | None = None  # the records' mean interval over layers (NaN: none)
    # Per-layer records (log.layer_records), rows in model order; NaN where a record has no entry.
    layers: list[str] = field(default_factory=list)
    batchnorm: np.ndarray | None = None  # bool per layer (its Fisher block is unit-wise: diff_F)
    interval: np.ndarray | None = None  # layers × records
    due: np.ndarray | None = None  # layers × records, bool
    diff: np.ndarray | None = None  # max over the layer's factors of diff_X (NaN: none)
    raw_diff: np.ndarray | None = None  # the same of raw_diff_X (noise-aware runs)
    payload_bytes: np.ndarray | None = None  # layers × records
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.method})"


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, "config.yaml"), encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _method_source(summary: dict[str, Any] | None, cfg: dict[str, Any]) -> dict[str, Any]:
    """What method_label reads: the summary's, or (an unfinished run) the resolved config's."""
    if summary is not None:
        return summary
    optim, kfac = cfg.get("optim") or {}, cfg.get("kfac") or {}
    method = optim.get("method", "?")
    return {"method": method, "kfac": kfac if method == "kfac" else None}


def _lines(path: str, problems: list[str]) -> Iterator[dict[str, Any]]:
    bad: list[int] = []
    yield from metrics_records(path, bad)
    if bad:
        problems.append(
            f"metrics.jsonl: {len(bad)} line(s) not JSON (line {bad[0]}{', ...' if len(bad) > 1 else ''}; "
            "a killed job?), drawn without them"
        )


def _max_of(entry: dict[str, Any], prefix: str) -> float:
    values = [v for k, v in entry.items() if k.startswith(prefix) and isinstance(v, (int, float))]
    return max(values) if values else np.nan


def method_label(summary: dict) -> str:
    """The run's method as the table names it: ``sgd``, ``kfac, lambda=0.25``, ``kfac, every step``."""
    kfac = summary.get("kfac") or {}
    method = summary.get("method", "?")
    if method != "kfac":
        return method
    lam = kfac.get("update_threshold")
    if lam is not None:
        return f"kfac, lambda={lam}"
    every = kfac.get("update_interval") or 1
    return "kfac, every step" if every == 1 else f"kfac, every {every} steps"


def read_summary(path: str) -> dict[str, Any] | None:
    """The folder's summary.json, None where the run has none (it did not finish)."""
    try:
        with open(os.path.join(path, "summary.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def read_run(path: str) -> RunLog:
    """Everything the pictures need from one run folder; NotARun when there is nothing to draw."""
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isdir(path):
        raise NotARun(f"{path}: not a folder")
    if not os.path.isfile(metrics):
        raise NotARun(f"{path}: not a run folder (no metrics.jsonl)")
    problems: list[str] = []
    summary = None
    try:
        summary = read_summary(path)
        if summary is None:
            problems.append("no summary.json (an unfinished run?): drawn from metrics.jsonl")
    except (OSError, json.JSONDecodeError) as exc:
        problems.append(f"summary.json unreadable ({exc}): drawn from metrics.jsonl")
    cfg = _read_config(path)
    source = _method_source(summary, cfg)
    threshold = (source.get("kfac") or {}).get("update_threshold")

    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for entry in _lines(metrics, problems):
        if isinstance(entry.get("eval"), dict):
            evals.append(dict(entry["eval"], step=entry.get("step", entry["eval"].get("step"))))
        elif isinstance(entry.get("step"), int) and "loss" in entry:
            train.append(entry)
    if not train:
        raise NotARun(f"{path}: metrics.jsonl holds no training step")
    train.sort(key=lambda e: e["step"])

    def column(key: str) -> np.ndarray:
        return np.array(
            [e.get(key) if isinstance(e.get(key), (int, float)) else np.nan for e in train], float
        )

    steps = np.array([e["step"] for e in train])
    # A record's step time stands for every step since the previous record (log.every_steps).
    gaps = np.diff(steps, prepend=0)
    train_time = np.cumsum(np.nan_to_num(column("step_time")) * gaps)
    log = RunLog(
        path=path,
        name=os.path.basename(os.path.normpath(path)),
        method=method_label(source),
        threshold=threshold,
        summary=summary,
        steps=steps,
        lr=column("lr"),
        loss=column("loss"),
        acc=column("acc"),
        train_time=train_time,
        evals=evals,
        problems=problems,
    )
    fisher: list[dict[str, Any]] = [f if isinstance(f := e.get("fisher"), dict) else {} for e in train]
    if any(fisher):

        def fisher_column(key: str) -> np.ndarray:
            return np.array(
                [f.get(key) if isinstance(f.get(key), (int, float)) else np.nan for f in fisher], float
            )

        log.wire_bytes = fisher_column("wire_bytes")
        log.every_step_wire_bytes = fisher_column("every_step_wire_bytes")
        log.ratio = fisher_column("ratio")
        log.fisher_payload_bytes = fisher_column("payload_bytes")
    if any("mean_interval" in e for e in train):
        log.mean_interval = column("mean_interval")
    _read_layers(log, [k if isinstance(k := e.get("kfac"), dict) else {} for e in train])
    return log


def _read_layers(log: RunLog, records: list[dict[str, Any]]) -> None:
    names: dict[str, None] = {}
    for record in records:
        if isinstance(record.get("layers"), dict):
            names.update(dict.fromkeys(record["layers"]))
    if not names:
        return
    log.layers = list(names)
    row = {name: i for i, name in enumerate(log.layers)}
    shape = (len(log.layers), len(records))
    interval, diff, raw, payload = (np.full(shape, np.nan) for _ in range(4))
    due = np.zeros(shape, bool)
    batchnorm = np.zeros(len(log.layers), bool)
    for j, record in enumerate(records):
        for name, entry in (record.get("layers") or {}).items():
            i = row[name]
            if isinstance(entry.get("interval"), (int, float)):
                interval[i, j] = entry["interval"]
            due[i, j] = bool(entry.get("due"))
            diff[i, j] = _max_of(entry, "diff_")
            raw[i, j] = _max_of(entry, "raw_diff_")
            if isinstance(entry.get("payload_bytes"), (int, float)):
                payload[i, j] = entry["payload_bytes"]
            batchnorm[i] = batchnorm[i] or "diff_F" in entry
    log.interval, log.due, log.diff, log.payload_bytes, log.batchnorm = (
        interval,
        due,
        diff,
        payload,
        batchnorm,
    )
    log.raw_diff = raw if np.isfinite(raw).any() else None


def layer_groups(names: list[str]) -> list[str]:
    """The stage of each layer, from its module name: ``layer3.4.conv2`` -> ``layer3`` (torchvision
    ResNet), ``stages.1.0.bn1`` -> ``stages.1`` (nested Sequentials), top-level layers before the first
    stage -> ``stem``, after it -> ``head``."""
    stages: list[str | None] = []
    for name in names:
        parts = name.split(".")
        first = next((i for i, p in enumerate(parts) if re.fullmatch(r"\d+", p)), None)
        if first is None or first == 0:
            stages.append(None)
        elif first + 1 < len(parts) and re.fullmatch(r"\d+", parts[first + 1]):
            stages.append(".".join(parts[: first + 1]))
        else:
            stages.append(".".join(parts[:first]))
    seen = False
    groups = []
    for stage in stages:
        seen = seen or stage is not None
        groups.append(stage if stage is not None else ("head" if seen else "stem"))
    return groups
