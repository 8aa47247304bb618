"""Mixed precision of a run (``train.precision``, ``train.channels_last``): autocast, fp16 loss scaling,
the memory format of the input images (channels_last: NHWC, what tensor-core convolutions want).

- ``fp32``: no autocast.
- ``bf16``: forward and loss under ``torch.autocast(dtype=torch.bfloat16)``. bf16 keeps fp32's exponent
  range, so gradients cannot overflow and no loss scaling is needed.
- ``fp16``: forward and loss under fp16 autocast, backward through a ``torch.amp.GradScaler``. The
  scaler's own ``step()`` is not used: it reads its overflow flag on the host, and the training step's
  status allreduce already tells every rank whether any gradient is non-finite. The step therefore
  calls ``unscale_`` (after Horovod averaged the gradients), lets the status decide, steps the optimiser
  itself, and ends with :meth:`MixedPrecision.end_step`, which hands the rank-wide verdict to the
  scaler before ``update()`` so that every rank keeps the same loss scale.

K-FAC's factors stay fp32 whatever autocast does (the library computes them in fp32); the step passes
the loss scale to ``kfac.step`` so that the gradient-side factors are unscaled.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """Autocast, loss scaling and memory format of one run; the same object on every step."""

    def __init__(self, precision: str, channels_last: bool, device: torch.device):
        self.precision = precision
        self.device = device
        self.dtype: torch.dtype | None = AUTOCAST_DTYPES.get(precision)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.scaler: torch.amp.GradScaler | None = (
            torch.amp.GradScaler(device.type) if precision == "fp16" else None
        )

    # Forward -------------------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the device. Its parameters keep the default layout even with channels_last:
        Horovod refuses tensors that are not contiguous in that layout (the initial broadcast, the
        gradient allreduce). channels_last inputs are enough for cuDNN to run every convolution, and so
        every activation, in NHWC; a weight's conversion per call is small next to the activations."""
        return model.to(self.device)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images on the device, in the run's memory format (non-blocking from pinned memory)."""
        if x.dim() == 4:
            return x.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return x.to(self.device, non_blocking=True)

    # Backward and the optimiser step ------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the (rank-averaged) gradients by the loss scale; call after ``optimizer.synchronize()``."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def loss_scale(self) -> Any:
        """The scale backward's gradients were multiplied by: a 0-d device tensor (no host read), or None."""
        if self.scaler is None:
            return None
        scale = getattr(self.scaler, "_scale", None)
        return scale if isinstance(scale, torch.Tensor) else self.scaler.get_scale()

    def end_step(self, optimizer: torch.optim.Optimizer, any_rank_nonfinite: bool) -> None:
        """Let the scaler grow or back off its scale from the verdict every rank shares.

        ``unscale_`` recorded this rank's own overflow flag; averaged gradients are normally non-finite
        on every rank alike, but the status allreduce is the verdict the step acted on, so it replaces
        the local flag (a host value written into the device flag: no synchronisation) and the ranks'
        loss scales cannot drift apart.
        """
        if self.scaler is None:
            return
        state = getattr(self.scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
        for flag in state.get("found_inf_per_device", {}).values():
            flag.fill_(1.0 if any_rank_nonfinite else 0.0)
        self.scaler.update()

    # Checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def describe(self) -> str:
        what = {
            "fp32": "fp32 (no autocast)",
            "bf16": "bf16 autocast (no loss scaling)",
            "fp16": "fp16 autocast with a GradScaler (overflow steps are skipped on every rank)",
        }[self.precision]
        layout = "channels_last" if self.memory_format is torch.channels_last else "contiguous (NCHW)"
        return f"precision: {what}; memory format {layout}; K-FAC factors fp32"
