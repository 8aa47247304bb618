"""Layer capture: module hooks that compute factor contributions, only for armed layers.

A layer is *armed* for the factor kinds due on the coming step. An unarmed layer's hooks return at
once: no activation is kept, no matrix product is computed. Contributions are summed with their sample
counts, so several forward/backward passes before one ``step`` (gradient accumulation) average
correctly. When a factor has seen ``accumulation_steps`` passes it is final and is handed over at once
(``on_final``), from inside the hook: A during the forward pass, G (BatchNorm: F) during the backward
pass, so that its allreduce overlaps the rest of the backward pass.

Factors are summed in the layer's factor dtype (fp32 or fp64) with autocast off, whatever precision
the model runs in; with ``narrow_products``, bf16/fp16 activations and gradients on CUDA enter the
products as they are (exact products, fp32 accumulation: :mod:`kfac_hvd.precision`). fp32 products run
at ``matmul_precision`` ("highest", or "high" for TF32), set around them and restored.

With ``split_halves`` every pass's samples are summed in two halves (the same products, split): the
factor is their combination and the gap between the halves' means estimates the factor's sampling noise
(:func:`kfac_hvd.factors.split_half_noise`), handed over with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .factors import split_half_noise
from .layers import BatchNormLayer, KroneckerLayer, Layer
from .precision import fp32_matmul_precision
from .timing import PhaseTimer

Key = tuple[str, str]
Part = tuple[torch.Tensor, int]  # a sum over samples, and their number
OnFinal = Callable[[str, str, torch.Tensor, torch.Tensor | None, bool], None]


class FactorCapture:
    def __init__(
        self,
        layers: dict[str, Layer],
        *,
        on_final: OnFinal,
        timer: PhaseTimer,
        accumulation_steps: int = 1,
        chunk_bytes: int,
        split_halves: bool = False,
        narrow_products: bool = True,
        matmul_precision: str = "highest",
    ) -> None:
        self.layers = layers
        self.on_final = on_final
        self.timer = timer
        self.accumulation_steps = accumulation_steps
        self.chunk_bytes = chunk_bytes
        self.split_halves = split_halves
        self.narrow_products = narrow_products
        self.matmul_precision = matmul_precision
        self.armed: dict[str, frozenset] = {name: frozenset() for name in layers}
        self.sums: dict[Key, list[torch.Tensor]] = {}
        self.samples: dict[Key, list[int]] = {}
        self.passes: dict[Key, int] = {}
        self.handed_over: set[Key] = set()
        self._handles: list[RemovableHandle] = []
        for name, layer in layers.items():
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(name)))

    def arm(self, due: dict[str, Iterable[str]]) -> None:
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

    def missing(self) -> list[Key]:
        """Armed factors that were never captured since :meth:`arm`."""
        return [
            (name, kind)
            for name, kinds in self.armed.items()
            for kind in sorted(kinds)
            if (name, kind) not in self.handed_over and (name, kind) not in self.sums
        ]

    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for parts in self.sums.values() for t in parts)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # Hooks --------------------------------------------------------------------------------------
    def _accumulate(self, name: str, kind: str, parts: list[Part]) -> None:
        key = (name, kind)
        if key in self.handed_over:
            raise RuntimeError(
                f"K-FAC layer '{name}': more than accumulation_steps={self.accumulation_steps} passes captured "
                f"its {kind} factor before kfac.step(); set accumulation_steps to the number of micro-batches "
                "per optimiser step"
            )
        if key in self.sums:
            for held, (total, _) in zip(self.sums[key], parts):
                held += total
            self.samples[key] = [held + samples for held, (_, samples) in zip(self.samples[key], parts)]
            self.passes[key] += 1
        else:
            self.sums[key] = [total for total, _ in parts]
            self.samples[key] = [samples for _, samples in parts]
            self.passes[key] = 1
        if self.passes[key] == self.accumulation_steps:
            self._hand_over(key)

    def _hand_over(self, key: Key, from_step: bool = False) -> None:
        totals, counts = self.sums.pop(key), self.samples.pop(key)
        del self.passes[key]
        self.handed_over.add(key)
        samples = sum(counts)
        # Gradient-side sums hold grad_output², and δ = N · grad_output (see kfac_hvd.layers): a part's
        # mean is (1/n_part)·Σ for A and (N²/n_part)·Σ for G and F.
        scale = (lambda part: 1.0 / part) if key[1] == "A" else (lambda part: samples**2 / part)
        noise = None
        if len(totals) == 2:
            first, second = counts
            noise = split_half_noise(
                totals[0] * scale(first) if first else totals[0],
                first,
                totals[1] * scale(second) if second else totals[1],
                second,
            )
        total = totals[0] if len(totals) == 1 else totals[0].add_(totals[1])
        factor = total.div_(samples) if key[1] == "A" else total.mul_(samples)
        self.on_final(key[0], key[1], factor, noise, from_step)

    def _parts(self, batch: int) -> list[slice]:
        if not self.split_halves:
            return [slice(None)]
        half = batch // 2
        return [slice(0, half), slice(half, batch)]

    def _a_parts(self, layer: Layer, x: torch.Tensor) -> list[Part]:
        assert isinstance(layer, KroneckerLayer)  # only Kronecker layers have an A factor
        return [
            layer.a_contribution(x[part], chunk_bytes=self.chunk_bytes, narrow_products=self.narrow_products)
            if _size(x, part)
            else _empty(layer, "A", x)
            for part in self._parts(x.shape[0])
        ]

    def _g_parts(self, layer: Layer, grad_output: torch.Tensor, inputs: torch.Tensor | None) -> list[Part]:
        parts = self._parts(grad_output.shape[0])
        if isinstance(layer, BatchNormLayer):
            assert inputs is not None  # the forward hook hands BatchNorm's input to this one
            # x̂ uses the statistics of the whole batch, as BatchNorm itself did.
            statistics = (
                layer.statistics(inputs, self.chunk_bytes, narrow_products=self.narrow_products)
                if len(parts) > 1
                else None
            )
            return [
                layer.f_contribution(
                    inputs[part],
                    grad_output[part],
                    chunk_bytes=self.chunk_bytes,
                    narrow_products=self.narrow_products,
                    statistics=statistics,
                )
                if _size(grad_output, part)
                else _empty(layer, "F", grad_output)
                for part in parts
            ]
        return [
            layer.g_contribution(
                grad_output[part], chunk_bytes=self.chunk_bytes, narrow_products=self.narrow_products
            )
            if _size(grad_output, part)
            else _empty(layer, "G", grad_output)
            for part in parts
        ]

    def _forward_hook(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        layer = self.layers[name]

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            armed = self.armed[name]
            if not armed or not module.training or not torch.is_grad_enabled():
                return
            x = inputs[0]
            if "A" in armed:
                with self._computing(x.device):
                    self._accumulate(name, "A", self._a_parts(layer, x))
            wants_backward = "G" in armed or "F" in armed
            if wants_backward and output.requires_grad:
                # A tensor hook registered before any in-place op on the output (ResNet's ReLU) still
                # receives the gradient w.r.t. this module's own output.
                output.register_hook(
                    self._output_grad_hook(name, x if isinstance(layer, BatchNormLayer) else None)
                )

        return hook

    def _output_grad_hook(self, name: str, inputs: torch.Tensor | None) -> Callable[[torch.Tensor], None]:
        layer = self.layers[name]

        def hook(grad_output: torch.Tensor) -> None:
            with self._computing(grad_output.device):
                kind = "F" if isinstance(layer, BatchNormLayer) else "G"
                self._accumulate(name, kind, self._g_parts(layer, grad_output, inputs))

        return hook

    @contextmanager
    def _computing(self, device: torch.device) -> Iterator[None]:
        """No autograd, autocast off, fp32 products at ``matmul_precision``, the time counted as the
        "factor" phase."""
        with (
            torch.no_grad(),
            torch.autocast(device_type=device.type, enabled=False),
            fp32_matmul_precision(device, self.matmul_precision),
            self.timer.phase("factor", device),
        ):
            yield


def _size(tensor: torch.Tensor, part: slice) -> int:
    return len(range(*part.indices(tensor.shape[0])))


def _empty(layer: Layer, kind: str, like: torch.Tensor) -> Part:
    """The contribution of no sample (a half of a one-sample batch)."""
    return torch.zeros(layer.factor_shapes()[kind], dtype=layer.factor_dtype, device=like.device), 0
