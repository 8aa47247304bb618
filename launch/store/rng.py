"""Every process's RNG states (torch, CUDA, numpy, Python) as tensors and plain numbers, which
``torch.load(weights_only=True)`` accepts: what a checkpoint and an elastic commit keep so that a run
continues drawing what it would have drawn; and the one function that seeds them all."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def plain_rng_states(numpy_state: tuple, python_state: tuple) -> dict[str, Any]:
    """numpy's and Python's RNG state tuples as dicts of tensors and numbers."""
    kind, keys, pos, has_gauss, cached = numpy_state
    version, internal, gauss_next = python_state
    return {
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers (what ``weights_only`` loading accepts)."""
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # the global generator is MT19937, whose legacy state is a tuple
    state = {"torch": torch.get_rng_state(), **plain_rng_states(numpy_state, random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_every_rng(seed: int) -> None:
    """Seed torch's generators (CPU and every CUDA device), numpy's global one and Python's from ``seed``.

    (A data loader's workers seed numpy and Python from the seed torch gave them: training.data.)"""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):
            pass
