"""Layer capture: module hooks that compute factor contributions, only for armed layers.

A layer is *armed* for the factor kinds due on the coming step. An unarmed layer's hooks return at
once: no activation is kept, no matrix product is computed. Contributions are summed with their sample
counts, so several forward/backward passes before one ``step`` (gradient accumulation) average
correctly. When a factor has seen ``accumulation_steps`` passes it is final and is handed over at once
(``on_final``), from inside the hook: A during the forward pass, G (BatchNorm: F) during the backward
pass, so that its allreduce overlaps the rest of the backward pass.

Factors are computed in the layer's factor dtype (fp32 or fp64) with autocast off, whatever precision
the model runs in.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .layers import BatchNormLayer, Layer
from .timing import PhaseTimer

Key = Tuple[str, str]
OnFinal = Callable[[str, str, torch.Tensor, bool], None]


class FactorCapture:
    def __init__(self, layers: Dict[str, Layer], *, on_final: OnFinal, timer: PhaseTimer,
                 accumulation_steps: int = 1, chunk_bytes: int) -> None:
        self.layers = layers
        self.on_final = on_final
        self.timer = timer
        self.accumulation_steps = accumulation_steps
        self.chunk_bytes = chunk_bytes
        self.armed: Dict[str, frozenset] = {name: frozenset() for name in layers}
        self.sums: Dict[Key, torch.Tensor] = {}
        self.samples: Dict[Key, int] = {}
        self.passes: Dict[Key, int] = {}
        self.handed_over: Set[Key] = set()
        self._handles: List[RemovableHandle] = []
        for name, layer in layers.items():
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(name)))

    def arm(self, due: Dict[str, Iterable[str]]) -> None:
        """Arm each layer for the kinds in ``due`` (missing layers: none) and drop stale sums."""
        self.armed = {name: frozenset(due.get(name, ())) for name in self.layers}
        self.sums.clear()
        self.samples.clear()
        self.passes.clear()
        self.handed_over.clear()

    def finish(self) -> None:
        """Hand over the factors that saw fewer passes than ``accumulation_steps``."""
        for key in list(self.sums):
            self._hand_over(key, from_step=True)

    def missing(self) -> List[Key]:
        """Armed factors that were never captured since :meth:`arm`."""
        return [(name, kind) for name, kinds in self.armed.items() for kind in sorted(kinds)
                if (name, kind) not in self.handed_over and (name, kind) not in self.sums]

    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # Hooks --------------------------------------------------------------------------------------
    def _accumulate(self, name: str, kind: str, contribution: Tuple[torch.Tensor, int]) -> None:
        total, samples = contribution
        key = (name, kind)
        if key in self.handed_over:
            raise RuntimeError(
                f"K-FAC layer '{name}': more than accumulation_steps={self.accumulation_steps} passes captured "
                f"its {kind} factor before kfac.step(); set accumulation_steps to the number of micro-batches "
                "per optimiser step")
        if key in self.sums:
            self.sums[key] += total
            self.samples[key] += samples
            self.passes[key] += 1
        else:
            self.sums[key], self.samples[key], self.passes[key] = total, samples, 1
        if self.passes[key] == self.accumulation_steps:
            self._hand_over(key)

    def _hand_over(self, key: Key, from_step: bool = False) -> None:
        total = self.sums.pop(key)
        samples = self.samples.pop(key)
        del self.passes[key]
        self.handed_over.add(key)
        # Gradient-side sums hold grad_output², and δ = N · grad_output (see kfac_hvd.layers).
        factor = total.div_(samples) if key[1] == "A" else total.mul_(samples)
        self.on_final(key[0], key[1], factor, from_step)

    def _forward_hook(self, name: str):
        layer = self.layers[name]

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            armed = self.armed[name]
            if not armed or not module.training or not torch.is_grad_enabled():
                return
            x = inputs[0]
            if "A" in armed:
                with self._computing(x.device):
                    self._accumulate(name, "A", layer.a_contribution(x, chunk_bytes=self.chunk_bytes))
            wants_backward = "G" in armed or "F" in armed
            if wants_backward and output.requires_grad:
                # A tensor hook registered before any in-place op on the output (ResNet's ReLU) still
                # receives the gradient w.r.t. this module's own output.
                output.register_hook(self._output_grad_hook(name, x if isinstance(layer, BatchNormLayer) else None))

        return hook

    def _output_grad_hook(self, name: str, inputs: Optional[torch.Tensor]):
        layer = self.layers[name]

        def hook(grad_output: torch.Tensor) -> None:
            with self._computing(grad_output.device):
                if isinstance(layer, BatchNormLayer):
                    contribution = layer.f_contribution(inputs, grad_output, chunk_bytes=self.chunk_bytes)
                    self._accumulate(name, "F", contribution)
                else:
                    self._accumulate(name, "G", layer.g_contribution(grad_output, chunk_bytes=self.chunk_bytes))

        return hook

    @contextmanager
    def _computing(self, device: torch.device) -> Iterator[None]:
        """No autograd, autocast off, and the time counted as the "factor" phase."""
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False), \
                self.timer.phase("factor", device):
            yield
