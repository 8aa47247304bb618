"""K-FAC's checkpointable state: what ``KFAC.state_dict`` saves and ``KFAC.load_state_dict`` checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .preconditioner import KFAC

TensorGroups = dict[str, dict[str, torch.Tensor]]
GROUPS = ("factors", "previous", "inverses")


def _cpu(tensors: TensorGroups) -> TensorGroups:
    return {
        name: {kind: t.detach().cpu().clone() for kind, t in kinds.items()} for name, kinds in tensors.items()
    }


def save_kfac_state(kfac: KFAC) -> dict[str, Any]:
    """Step, intervals and t_last, factors, previous factors, inverses, the diagonal means behind π,
    the traffic counters; on the CPU."""
    # Without a running average the factors are the previous factors: saved once.
    factors = _cpu(kfac.factors) if kfac.options.factor_decay is not None else None
    return {
        "steps": kfac.steps,
        "scheduler": kfac.scheduler.state_dict(),
        "factors": factors,
        "previous": _cpu(kfac.previous),
        "inverses": _cpu(kfac.inverses),
        "diagonal_means": {name: dict(means) for name, means in kfac.diagonal_means.items()},
        "noise": {name: dict(noise) for name, noise in kfac.noise.items()},
        "traffic": kfac.traffic.state_dict(),
        "layer_names": kfac.layer_names,
    }


def load_kfac_state(kfac: KFAC, state: dict[str, Any]) -> None:
    """Check ``state`` against the model (ValueError naming what does not fit), then adopt it."""
    missing = {"steps", "scheduler", "factors", "previous", "inverses", "traffic"} - set(state)
    if missing:
        raise ValueError(f"K-FAC state lacks {sorted(missing)}")
    if list(state.get("layer_names", kfac.layer_names)) != kfac.layer_names:
        raise ValueError("K-FAC state was saved for a model with other layers than this one")
    state = dict(state)
    if state["factors"] is None:
        state["factors"] = state["previous"]
    unknown = {name for group in GROUPS for name in state[group]} - set(kfac.layers)
    if unknown:
        raise ValueError(f"K-FAC state names layers this model does not have: {sorted(unknown)[:3]}")
    for group in GROUPS:
        for name, kinds in state[group].items():
            for kind, tensor in kinds.items():
                expected = kfac.layers[name].factor_shapes()[kind]
                if tuple(tensor.shape) != tuple(expected):
                    raise ValueError(
                        f"K-FAC state {group}/{name}/{kind} has shape {tuple(tensor.shape)}, "
                        f"the model needs {tuple(expected)}"
                    )
    kfac.scheduler.load_state_dict(state["scheduler"])
    kfac.steps = int(state["steps"])
    for group in GROUPS:
        target = getattr(kfac, group)
        for name in kfac.layers:
            device = kfac.layers[name].module.weight.device
            dtype = kfac.layers[name].factor_dtype
            target[name] = {
                kind: t.to(device=device, dtype=dtype).clone()
                for kind, t in state[group].get(name, {}).items()
            }
    if kfac.options.factor_decay is None:
        kfac.factors = {name: dict(kinds) for name, kinds in kfac.previous.items()}
    means = state.get("diagonal_means")
    if means is None:  # a state saved before the means were kept: take them from the factors
        means = {
            name: {kind: torch.diagonal(t, dim1=-2, dim2=-1).mean().item() for kind, t in kinds.items()}
            for name, kinds in kfac.factors.items()
        }
    kfac.diagonal_means = {name: dict(means.get(name, {})) for name in kfac.layers}
    noise = state.get("noise") or {}
    kfac.noise = {name: dict(noise.get(name, {})) for name in kfac.layers}
    kfac.traffic.load_state_dict(state["traffic"])
