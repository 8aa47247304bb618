"""K-FAC's per-layer state, and its checkpoint: what ``KFAC.state_dict`` saves and ``load_state_dict``
checks.

Checkpoint formats: version 1 adds ``format_version`` to the layout of the unversioned format
(version 0), which still loads; a state without ``diagonal_means`` (saved before π's means were kept)
takes them from its factors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .factors import pi_from_diagonal_means

if TYPE_CHECKING:  # pragma: no cover
    from .preconditioner import KFAC

FORMAT_VERSION = 1
TensorGroups = dict[str, dict[str, torch.Tensor]]
GROUPS = ("factors", "previous", "inverses")


@dataclass
class LayerState:
    """What K-FAC keeps of one layer between steps, by factor kind ("A" and "G", or "F" for BatchNorm).

    Without ``factor_decay`` the factors are the previous factors (the same tensors, held once).
    """

    factors: dict[str, torch.Tensor] = field(default_factory=dict)  # what is inverted
    previous: dict[str, torch.Tensor] = field(default_factory=dict)  # X_pre: the last fresh factors
    inverses: dict[str, torch.Tensor] = field(default_factory=dict)
    diagonal_means: dict[str, float] = field(default_factory=dict)  # of the factors, for π
    noise: dict[str, float] = field(default_factory=dict)  # estimated E‖X − E X‖² of each X_pre

    def adopt(
        self, kind: str, fresh: torch.Tensor, diagonal_mean: float, noise: float, factor_decay: float | None
    ) -> None:
        """The fresh factor becomes X_pre; with ``factor_decay`` the running average follows it."""
        self.previous[kind] = fresh
        self.noise[kind] = noise
        running = self.factors.get(kind)
        if factor_decay is None:
            self.factors[kind] = fresh
            self.diagonal_means[kind] = diagonal_mean
        elif running is None:
            self.factors[kind] = fresh.clone()  # X_pre is overwritten in place on the next update
            self.diagonal_means[kind] = diagonal_mean
        else:
            running.mul_(factor_decay).add_(fresh, alpha=1 - factor_decay)
            old = self.diagonal_means[kind]
            self.diagonal_means[kind] = factor_decay * old + (1 - factor_decay) * diagonal_mean

    def pi(self) -> float:
        """π from the factors' diagonal means; 1 before both A and G are known (and for BatchNorm)."""
        if "A" not in self.diagonal_means or "G" not in self.diagonal_means:
            return 1.0
        return pi_from_diagonal_means(self.diagonal_means["A"], self.diagonal_means["G"])


def held_bytes(states: Iterable[LayerState], parts: Sequence[str], seen: set[int]) -> int:
    """Bytes of the storages behind ``parts`` ("factors", "previous", "inverses") of the layers' states,
    each storage counted once across calls that share ``seen``."""
    total = 0
    for state in states:
        for part in parts:
            for tensor in getattr(state, part).values():
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def _cpu(tensors: TensorGroups) -> TensorGroups:
    return {
        name: {kind: t.detach().cpu().clone() for kind, t in kinds.items()} for name, kinds in tensors.items()
    }


def save_kfac_state(kfac: KFAC) -> dict[str, Any]:
    """Step, intervals and t_last, factors, previous factors, inverses, the diagonal means behind π,
    the noise estimates, the traffic counters; on the CPU."""
    layers = kfac.layer_state
    return {
        "format_version": FORMAT_VERSION,
        "steps": kfac.steps,
        "scheduler": kfac.scheduler.state_dict(),
        # Without a running average the factors are the previous factors: saved once.
        "factors": _cpu(kfac.factors) if kfac.options.factor_decay is not None else None,
        "previous": _cpu(kfac.previous),
        "inverses": _cpu(kfac.inverses),
        "diagonal_means": {name: dict(state.diagonal_means) for name, state in layers.items()},
        "noise": {name: dict(state.noise) for name, state in layers.items()},
        "traffic": kfac.traffic.state_dict(),
        "layer_names": kfac.layer_names,
    }


def load_kfac_state(kfac: KFAC, state: dict[str, Any]) -> None:
    """Check ``state`` against the model (ValueError naming what does not fit), then adopt it."""
    version = state.get("format_version", 0)
    if not isinstance(version, int) or not 0 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"K-FAC state has format version {version!r}; this kfac_hvd reads versions 0 to {FORMAT_VERSION}"
            " (a newer kfac_hvd wrote it?)"
        )
    _check(kfac, state)
    kfac.scheduler.load_state_dict(state["scheduler"])
    kfac.steps = int(state["steps"])
    groups = {group: state[group] for group in GROUPS}
    if groups["factors"] is None:
        groups["factors"] = groups["previous"]
    means = state.get("diagonal_means")
    noise = state.get("noise") or {}
    for name, layer in kfac.layers.items():
        device, dtype = layer.module.weight.device, layer.factor_dtype
        loaded = {
            group: {
                kind: t.to(device=device, dtype=dtype).clone()
                for kind, t in groups[group].get(name, {}).items()
            }
            for group in GROUPS
        }
        if kfac.options.factor_decay is None:
            loaded["factors"] = dict(loaded["previous"])
        if means is None:  # a state saved before the means were kept: take them from the factors
            layer_means = {
                kind: torch.diagonal(t, dim1=-2, dim2=-1).mean().item()
                for kind, t in loaded["factors"].items()
            }
        else:
            layer_means = dict(means.get(name, {}))
        kfac.layer_state[name] = LayerState(
            diagonal_means=layer_means, noise=dict(noise.get(name, {})), **loaded
        )
    kfac.traffic.load_state_dict(state["traffic"])


def _check(kfac: KFAC, state: dict[str, Any]) -> None:
    missing = {"steps", "scheduler", "factors", "previous", "inverses", "traffic"} - set(state)
    if missing:
        raise ValueError(f"K-FAC state lacks {sorted(missing)}")
    if list(state.get("layer_names", kfac.layer_names)) != kfac.layer_names:
        raise ValueError("K-FAC state was saved for a model with other layers than this one")
    groups = [group for group in GROUPS if state[group] is not None]
    unknown = {name for group in groups for name in state[group]} - set(kfac.layers)
    if unknown:
        raise ValueError(f"K-FAC state names layers this model does not have: {sorted(unknown)[:3]}")
    for group in groups:
        for name, kinds in state[group].items():
            for kind, tensor in kinds.items():
                expected = kfac.layers[name].factor_shapes()[kind]
                if tuple(tensor.shape) != tuple(expected):
                    raise ValueError(
                        f"K-FAC state {group}/{name}/{kind} has shape {tuple(tensor.shape)}, "
                        f"the model needs {tuple(expected)}"
                    )
