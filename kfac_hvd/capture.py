"""Layer capture: module hooks that accumulate factor contributions, only for armed layers.

A layer is *armed* for the factor kinds due on the coming step. An unarmed layer's hooks return at
once: no activation is kept, no matrix product is computed. Contributions are summed with their sample
counts, so several forward/backward passes before one ``step`` (gradient accumulation) average
correctly.
"""
from __future__ import annotations

import time
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .layers import BatchNormLayer, Layer


class FactorCapture:
    def __init__(self, layers: Dict[str, Layer]) -> None:
        self.layers = layers
        self.armed: Dict[str, frozenset] = {name: frozenset() for name in layers}
        self.sums: Dict[Tuple[str, str], torch.Tensor] = {}
        self.samples: Dict[Tuple[str, str], int] = {}
        self.factor_seconds = 0.0
        self._handles: List[RemovableHandle] = []
        for name, layer in layers.items():
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(name)))

    def arm(self, due: Dict[str, Iterable[str]]) -> None:
        """Arm each layer for the kinds in ``due`` (missing layers: none) and drop stale sums."""
        self.armed = {name: frozenset(due.get(name, ())) for name in self.layers}
        self.sums.clear()
        self.samples.clear()

    def take(self, name: str, kind: str) -> Optional[torch.Tensor]:
        """The captured factor (mean over captured samples), or ``None`` if nothing was captured."""
        key = (name, kind)
        if key not in self.sums:
            return None
        return self.sums.pop(key) / self.samples.pop(key)

    def take_seconds(self) -> float:
        seconds, self.factor_seconds = self.factor_seconds, 0.0
        return seconds

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # Hooks --------------------------------------------------------------------------------------
    def _accumulate(self, name: str, kind: str, contribution: Tuple[torch.Tensor, int]) -> None:
        total, samples = contribution
        key = (name, kind)
        if key in self.sums:
            self.sums[key] += total
            self.samples[key] += samples
        else:
            self.sums[key] = total
            self.samples[key] = samples

    def _forward_hook(self, name: str):
        layer = self.layers[name]

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            armed = self.armed[name]
            if not armed or not module.training or not torch.is_grad_enabled():
                return
            x = inputs[0]
            if "A" in armed:
                start = time.perf_counter()
                self._accumulate(name, "A", layer.a_contribution(x))
                self.factor_seconds += time.perf_counter() - start
            wants_backward = "G" in armed or "F" in armed
            if wants_backward and output.requires_grad:
                # A tensor hook registered before any in-place op on the output (ResNet's ReLU) still
                # receives the gradient w.r.t. this module's own output.
                output.register_hook(self._output_grad_hook(name, x if isinstance(layer, BatchNormLayer) else None))

        return hook

    def _output_grad_hook(self, name: str, inputs: Optional[torch.Tensor]):
        layer = self.layers[name]

        def hook(grad_output: torch.Tensor) -> None:
            start = time.perf_counter()
            if isinstance(layer, BatchNormLayer):
                self._accumulate(name, "F", layer.f_contribution(inputs, grad_output))
            else:
                self._accumulate(name, "G", layer.g_contribution(grad_output))
            self.factor_seconds += time.perf_counter() - start

        return hook
