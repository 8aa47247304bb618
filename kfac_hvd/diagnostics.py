"""Count host synchronisations: a diagnostic for a training step on a GPU.

Every Python-level read of a tensor's value back to the host (``.item()``, ``.tolist()``, ``.numpy()``,
``bool(t)``, ``float(t)``, ``int(t)``, ``t`` used as an index) waits for the device to finish what was
queued before it, and so do explicit CUDA synchronisations. ::

    with HostSyncCounter() as syncs:
        train_step()
    print(syncs.count, syncs.where)

The counter patches ``torch.Tensor`` while the block runs (counters may be nested); ``paused()`` leaves
a region out. It sees Python-level reads only: a synchronisation inside a C++ operator is not counted
(``torch.cuda.set_sync_debug_mode`` reports those on a GPU).
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

TENSOR_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostSyncCounter:
    def __init__(self) -> None:
        self.count = 0
        self.where: list[str] = []
        self._active = False
        self._patched: list[tuple[Any, str, Callable]] = []

    def __enter__(self) -> HostSyncCounter:
        targets: list[tuple[Any, str]] = [(torch.Tensor, name) for name in TENSOR_READS]
        targets += [(torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize")]
        for owner, name in targets:
            original = getattr(owner, name)
            self._patched.append((owner, name, original))
            setattr(owner, name, self._counting(name, original))
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        was, self._active = self._active, False
        try:
            yield
        finally:
            self._active = was

    def _counting(self, name: str, original: Callable) -> Callable:
        def read(*args: Any, **kwargs: Any) -> Any:
            if self._active:
                self.count += 1
                caller = traceback.extract_stack(limit=2)[0]
                self.where.append(f"{name} at {os.path.basename(caller.filename)}:{caller.lineno}")
            return original(*args, **kwargs)

        return read
