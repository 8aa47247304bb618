"""The record ``KFAC.step`` and ``KFAC.skip_step`` return (described in the README, "Methods and attributes")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .preconditioner import KFAC


def step_record(
    kfac: KFAC,
    step: int,
    due: dict[str, list[str]],
    diffs: dict[str, dict[str, float]],
    kl_scale: torch.Tensor | None,
) -> dict[str, Any]:
    """Per layer: due or not, its interval (the least of A's and G's, and both with separate
    intervals), each factor's Diff (and raw Diff with noise_aware_diff), the step's payload bytes."""
    options = kfac.options
    layers = {}
    for name, layer in kfac.layers.items():
        # The intervals that decide the next step (1 within a fixed interval's warm-up).
        intervals = [kfac.scheduler.interval_for(key, kfac.steps + 1) for key in kfac.keys.of(name)]
        entry: dict[str, Any] = {"due": name in due, "interval": min(intervals)}
        if options.separate_intervals:
            entry["intervals"] = dict(zip(layer.factor_kinds, intervals))
        for kind in layer.factor_kinds:
            entry[f"diff_{kind}"] = diffs.get(name, {}).get(kind)
            if options.noise_aware_diff:
                entry[f"raw_diff_{kind}"] = diffs.get(name, {}).get(f"raw_{kind}")
        entry["payload_bytes"] = _step_payload(kfac, name, due.get(name, []))
        layers[name] = entry
    return {"step": step, "layers": layers, "kl_scale": kl_scale, "mean_interval": kfac.mean_interval()}


def _step_payload(kfac: KFAC, name: str, kinds: list[str]) -> int:
    if kfac.comm.size == 1:
        return 0
    return kfac.layer_costs[name].update_payload_bytes(kinds)
