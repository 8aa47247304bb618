"""K-FAC preconditioner for data-parallel training over Horovod.

One training step, as :meth:`KFAC.step` runs it:

    hooks capture (forward/backward, armed layers only)
      → factor allreduce          (async, named kfac.A.<layer>, kfac.G.<layer>, kfac.F.<layer>)
      → schedule update           (Algorithm 1 on the averaged factors; rank 0's decision broadcast)
      → owner inverts             (layers partitioned over ranks by inversion cost)
      → inverse broadcast         (async, named kfac.A_inv.<layer>, ...)
      → precondition every layer  (with the newest inverse each rank holds)
and the caller's optimiser step follows.
"""
from __future__ import annotations

import logging
import math
import re
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .assignment import DEFAULT_LOCAL_INVERSE_MAX_DIM, Assignment, assign_layers, inverted_everywhere
from .capture import FactorCapture
from .comm import TrafficCounter, default_communicator, every_step_cost
from .factors import (INVERSE_METHODS, all_finite, kl_clip_scale, pack, packed_numel, relative_change, robust_damped_inverses,
                      unpack)
from .layers import DEFAULT_UNFOLD_CHUNK_BYTES, Layer, make_layer
from .scheduler import IntervalScheduler

logger = logging.getLogger(__name__)


class KFAC:
    """Replaces each registered layer's ``.grad`` by its K-FAC preconditioned gradient on ``step()``.

    Call ``step`` after the gradients are averaged over ranks (``optimizer.synchronize()``) and before
    the optimiser's own step. All options are keyword-only; see the README for each one.
    """

    def __init__(self, model: nn.Module, *, damping: float = 1e-3, update_threshold: Optional[float] = None,
                 update_interval: int = 1, interval_policy: str = "modulo", max_interval: Optional[int] = None,
                 shrink_multiple: Optional[float] = None, separate_intervals: bool = False,
                 factor_decay: Optional[float] = None, kl_clip: Optional[float] = None,
                 pi_damping: bool = True, inverse_method: str = "cholesky", symmetric_comm: bool = True,
                 skip_layers: Sequence[str] = (), include_batchnorm: bool = True,
                 factor_dtype: Optional[torch.dtype] = None, accumulation_steps: int = 1,
                 local_inverse_max_dim: int = DEFAULT_LOCAL_INVERSE_MAX_DIM,
                 unfold_chunk_bytes: int = DEFAULT_UNFOLD_CHUNK_BYTES, comm: Any = None) -> None:
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping!r}")
        if factor_decay is not None and not 0 <= factor_decay < 1:
            raise ValueError(f"factor_decay must be in [0, 1) or None, got {factor_decay!r}")
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"kl_clip must be > 0 or None, got {kl_clip!r}")
        if inverse_method not in INVERSE_METHODS:
            raise ValueError(f"inverse_method must be one of {INVERSE_METHODS}, got {inverse_method!r}")
        if not (isinstance(accumulation_steps, int) and accumulation_steps >= 1):
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if not (isinstance(local_inverse_max_dim, int) and local_inverse_max_dim >= 0):
            raise ValueError(f"local_inverse_max_dim must be an int >= 0, got {local_inverse_max_dim!r}")
        if not (isinstance(unfold_chunk_bytes, int) and unfold_chunk_bytes >= 1):
            raise ValueError(f"unfold_chunk_bytes must be an int >= 1, got {unfold_chunk_bytes!r}")
        if isinstance(skip_layers, str):
            skip_layers = (skip_layers,)
        self.damping = damping
        self.factor_decay = factor_decay
        self.kl_clip = kl_clip
        self.pi_damping = pi_damping
        self.inverse_method = inverse_method
        self.symmetric_comm = symmetric_comm
        self.separate_intervals = separate_intervals
        self.accumulation_steps = accumulation_steps
        self.local_inverse_max_dim = local_inverse_max_dim
        self.unfold_chunk_bytes = unfold_chunk_bytes

        skip_patterns = [re.compile(pattern) for pattern in skip_layers]
        self.layers: Dict[str, Layer] = {}
        for name, module in model.named_modules():
            if any(pattern.search(name) for pattern in skip_patterns):
                continue
            layer = make_layer(name, module, include_batchnorm=include_batchnorm, factor_dtype=factor_dtype)
            if layer is not None:
                self.layers[name] = layer
        if not self.layers:
            raise ValueError("KFAC found no Linear, Conv2d or BatchNorm2d layer to precondition in the model")

        self.comm = comm if comm is not None else default_communicator()
        self.local_layers = [name for name, layer in self.layers.items()
                             if inverted_everywhere(layer.factor_shapes(), local_inverse_max_dim)]
        self._local = set(self.local_layers)
        self.assignment: Assignment = self.assign(self.comm.size)
        self.scheduler = IntervalScheduler(
            [key for name in self.layers for key in self._keys_of(name)], update_threshold=update_threshold,
            interval_policy=interval_policy, max_interval=max_interval, shrink_multiple=shrink_multiple,
            initial_interval=update_interval)
        self.traffic = TrafficCounter(self.comm.size)
        self._every_step_cost = every_step_cost(self.layers.values(), self.comm.size, symmetric=self.symmetric_comm)
        self.steps = 0
        self.factors: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in self.layers}
        self.previous: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in self.layers}
        self.inverses: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in self.layers}
        self._rejected: set = set()  # layers whose factors this step were non-finite
        self.capture = FactorCapture(self.layers)
        self._times: Dict[str, float] = {}
        self.capture.arm(self._due_kinds(1))

    # Introspection ------------------------------------------------------------------------------
    @property
    def layer_names(self) -> List[str]:
        return list(self.layers)

    def inversion_costs(self) -> Dict[str, float]:
        return {name: layer.inversion_cost() for name, layer in self.layers.items()}

    def assign(self, world_size: int) -> Assignment:
        """Owners of the layers whose inverses travel, for ``world_size`` ranks (layers inverted on every
        rank, see ``local_inverse_max_dim``, are left out of the balance)."""
        local = set(self.local_layers)
        return assign_layers({name: cost for name, cost in self.inversion_costs().items() if name not in local},
                             world_size)

    def mean_interval(self) -> float:
        intervals = self.scheduler.interval.values()
        return sum(intervals) / len(intervals)

    def comm_stats(self) -> Dict[str, Any]:
        """Cumulative Fisher traffic of this rank (see :mod:`kfac_hvd.comm` for the wire model)."""
        return {"steps": self.steps, **self.traffic.summary()}

    def remove_hooks(self) -> None:
        self.capture.remove()

    # The training step --------------------------------------------------------------------------
    def step(self, *, lr: Optional[float] = None, loss_scale: Any = None) -> Dict[str, Any]:
        """Precondition every registered layer's gradient in place; return this step's record."""
        step = self.steps + 1
        due = self._due_kinds(step)
        seconds = {"factor": self.capture.take_seconds()}
        numerics: Dict[str, str] = {}
        fresh = self._allreduce_factors(due, seconds)
        if loss_scale is not None:
            for kinds in fresh.values():
                for kind in kinds:
                    if kind != "A":
                        kinds[kind] = kinds[kind] / loss_scale ** 2
        diffs = self._update_schedule(step, fresh, numerics)
        self._invert_and_broadcast(due, seconds, numerics)
        scale = self._precondition(lr, seconds)
        self._count_every_step()
        self.steps = step
        self.capture.arm(self._due_kinds(step + 1))
        for name, event in numerics.items():
            logger.warning("K-FAC step %d, layer '%s': %s", step, name, event)
        self._add_times(seconds)
        record = self._record(step, due, diffs, scale)
        record.update(numerics=numerics, skipped=False)
        return record

    def skip_step(self) -> Dict[str, Any]:
        """The optimiser skips this step: wait for the factor collectives, keep nothing, advance nothing."""
        step = self.steps + 1
        due = self._due_kinds(step)
        seconds = {"factor": self.capture.take_seconds()}
        fresh = self._allreduce_factors(due, seconds, count_compute=False)
        numerics = {name: "non-finite factor dropped, previous inverse kept"
                    for name, kinds in fresh.items() if not all_finite(*kinds.values())}
        for name, event in numerics.items():
            logger.warning("K-FAC step %d, layer '%s': %s", step, name, event)
        self.capture.arm(due)
        self._add_times(seconds)
        record = self._record(step, due, {}, None)
        record.update(numerics=numerics, skipped=True)
        return record

    def collect_times(self) -> Dict[str, float]:
        """Seconds per phase summed over the steps since the last call (then reset)."""
        times, self._times = self._times, {}
        return times

    def _add_times(self, seconds: Dict[str, float]) -> None:
        for phase, value in seconds.items():
            self._times[phase] = self._times.get(phase, 0.0) + value

    def _allreduce_factors(self, due: Dict[str, List[str]], seconds: Dict[str, float],
                           count_compute: bool = True) -> Dict[str, Dict[str, torch.Tensor]]:
        handles = []
        for name, kinds in due.items():
            for kind in kinds:
                local = self.capture.take(name, kind)
                if local is None:
                    raise RuntimeError(
                        f"K-FAC layer '{name}' is due on step {self.steps + 1} but captured no {kind} factor: "
                        "run forward and backward in training mode before kfac.step(), or skip the layer")
                buffer = pack(local, self.symmetric_comm) if self.comm.size > 1 else local
                if count_compute:
                    self.traffic.add_totals(computed_elements=local.numel())
                if self.comm.size > 1:
                    self.traffic.add(name, kind, "allreduce", buffer.numel() * buffer.element_size())
                    self.traffic.add_totals(dense_payload_bytes=local.numel() * local.element_size())
                handles.append((name, kind, local.shape,
                                self.comm.allreduce_async(buffer, name=f"kfac.{kind}.{name}")))
        start = time.perf_counter()
        fresh: Dict[str, Dict[str, torch.Tensor]] = {}
        for name, kind, shape, handle in handles:
            averaged = self.comm.wait(handle)
            if self.comm.size > 1:
                averaged = unpack(averaged, shape, self.symmetric_comm)
            fresh.setdefault(name, {})[kind] = averaged
        seconds["factor_comm"] = time.perf_counter() - start
        return fresh

    def _update_schedule(self, step: int, fresh: Dict[str, Dict[str, torch.Tensor]],
                         numerics: Dict[str, str]) -> Dict[str, Dict[str, float]]:
        """Algorithm 1's bookkeeping on the averaged factors; factors and previous factors updated.

        A non-finite averaged factor (every rank sees the same one) is dropped: the layer keeps its
        factors, previous factors and interval, and its owner re-sends the inverse it holds.
        """
        diffs: Dict[str, Dict[str, float]] = {}
        decided: Dict[str, int] = {}
        for name, kinds in fresh.items():
            if not all_finite(*kinds.values()):
                numerics[name] = "non-finite factor dropped, previous inverse kept"
                self._rejected.add(name)
                continue
            for kind, factor in kinds.items():
                if kind in self.previous[name]:
                    diffs.setdefault(name, {})[kind] = relative_change(factor, self.previous[name][kind])
                self.previous[name][kind] = factor
                if self.factor_decay is not None and kind in self.factors[name]:
                    running = self.factors[name][kind]
                    self.factors[name][kind] = self.factor_decay * running + (1 - self.factor_decay) * factor
                else:
                    self.factors[name][kind] = factor
            for key in self._keys_of(name):
                key_kinds = self._kinds_of_key(name, key)
                if not set(key_kinds) <= set(kinds):
                    continue
                layer_diffs = [diffs[name][kind] for kind in key_kinds if kind in diffs.get(name, {})]
                decided[key] = self.scheduler.record(key, step, max(layer_diffs) if layer_diffs else None)
        if self.scheduler.adaptive and self.comm.size > 1 and decided:
            # Ranks may round the averaged factors differently (MPI allreduce does not promise bitwise
            # equality), so rank 0's intervals are the ones every rank keeps.
            keys = sorted(decided)
            intervals = torch.tensor([decided[key] for key in keys], dtype=torch.int32)
            intervals = self.comm.wait(self.comm.broadcast_async(intervals, 0, name="kfac.schedule"))
            self.traffic.add_totals(control_payload_bytes=intervals.numel() * intervals.element_size())
            for key, interval in zip(keys, intervals.tolist()):
                self.scheduler.set_interval(key, interval)
        return diffs

    def _invert_and_broadcast(self, due: Dict[str, List[str]], seconds: Dict[str, float],
                              numerics: Dict[str, str]) -> None:
        """The owner inverts; when it cannot, it sends the inverse every rank already holds (or the
        identity before the first success), so all ranks still take the same decision."""
        rank = self.comm.rank
        handles = []
        seconds["inverse"] = 0.0
        for name, kinds in due.items():
            local = name in self._local
            owner = rank if local else self.assignment.owner[name]
            if owner == rank:
                start = time.perf_counter()
                inverses = None
                if name not in self._rejected:
                    inverses, event = robust_damped_inverses(self.factors[name], self.damping,
                                                             pi_damping=self.pi_damping, method=self.inverse_method)
                    if event:
                        numerics[name] = event + ("" if inverses is not None else ", previous inverse kept")
                if inverses is None:
                    inverses = {kind: self._held_inverse(name, kind) for kind in kinds}
                seconds["inverse"] += time.perf_counter() - start
            for kind in kinds:
                if self.comm.size == 1 or local:
                    self.inverses[name][kind] = inverses[kind]
                    continue
                shape = self.layers[name].factor_shapes()[kind]
                if owner == rank:
                    buffer = pack(inverses[kind], self.symmetric_comm)
                else:
                    buffer = torch.empty(packed_numel(shape, self.symmetric_comm), dtype=self.layers[name].factor_dtype,
                                         device=self.layers[name].module.weight.device)
                self.traffic.add(name, f"{kind}_inv", "broadcast", buffer.numel() * buffer.element_size())
                self.traffic.add_totals(dense_payload_bytes=math.prod(shape) * buffer.element_size())
                handles.append((name, kind, shape,
                                self.comm.broadcast_async(buffer, owner, name=f"kfac.{kind}_inv.{name}")))
        start = time.perf_counter()
        for name, kind, shape, handle in handles:
            self.inverses[name][kind] = unpack(self.comm.wait(handle), shape, self.symmetric_comm)
        seconds["inverse_comm"] = time.perf_counter() - start
        self._rejected.clear()

    def _held_inverse(self, name: str, kind: str) -> torch.Tensor:
        if kind in self.inverses[name]:
            return self.inverses[name][kind]
        shape = self.layers[name].factor_shapes()[kind]
        weight = self.layers[name].module.weight
        eye = torch.eye(shape[-1], dtype=self.layers[name].factor_dtype, device=weight.device)
        return eye.expand(shape).clone()  # no inverse yet: this layer's gradient passes unchanged

    def _precondition(self, lr: Optional[float], seconds: Dict[str, float]) -> Optional[torch.Tensor]:
        start = time.perf_counter()
        gradients: Dict[str, torch.Tensor] = {}
        updates: Dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            if layer.module.weight.grad is None:
                continue  # the layer took no part in this step's loss
            gradients[name] = layer.grad_matrix()
            updates[name] = layer.precondition(self.inverses[name])
        scale = None
        if self.kl_clip is not None:
            scale = kl_clip_scale(updates, gradients, self.kl_clip, lr)
        for name, update in updates.items():
            self.layers[name].set_grad_matrix(update * scale if scale is not None else update)
        seconds["precondition"] = time.perf_counter() - start
        return scale

    # Schedule helpers ---------------------------------------------------------------------------
    def _keys_of(self, name: str) -> List[str]:
        if self.separate_intervals:
            return [f"{name}:{kind}" for kind in self.layers[name].factor_kinds]
        return [name]

    def _kinds_of_key(self, name: str, key: str) -> List[str]:
        return [key.rsplit(":", 1)[1]] if self.separate_intervals else list(self.layers[name].factor_kinds)

    def _due_kinds(self, step: int) -> Dict[str, List[str]]:
        due: Dict[str, List[str]] = {}
        for name in self.layers:
            kinds = [kind for key in self._keys_of(name) if self.scheduler.is_due(key, step)
                     for kind in self._kinds_of_key(name, key)]
            if kinds:
                due[name] = kinds
        return due

    # Accounting ---------------------------------------------------------------------------------
    def _count_every_step(self) -> None:
        """What updating every factor of every layer on this step would have cost."""
        self.traffic.add_totals(**self._every_step_cost)

    def _record(self, step: int, due: Dict[str, List[str]], diffs: Dict[str, Dict[str, float]],
                kl_scale: Any) -> Dict[str, Any]:
        layers = {}
        for name in self.layers:
            intervals = [self.scheduler.interval[key] for key in self._keys_of(name)]
            entry: Dict[str, Any] = {"due": name in due, "interval": min(intervals)}
            if self.separate_intervals:
                entry["intervals"] = dict(zip(self.layers[name].factor_kinds, intervals))
            for kind in self.layers[name].factor_kinds:
                entry[f"diff_{kind}"] = diffs.get(name, {}).get(kind)
            entry["payload_bytes"] = sum(self._step_payload(name, due.get(name, [])))
            layers[name] = entry
        return {"step": step, "layers": layers, "kl_scale": kl_scale,
                "mean_interval": self.mean_interval()}

    def _step_payload(self, name: str, kinds: List[str]) -> List[int]:
        if self.comm.size == 1:
            return [0]
        shapes = self.layers[name].factor_shapes()
        element = torch.finfo(self.layers[name].factor_dtype).bits // 8
        return [2 * packed_numel(shapes[kind], self.symmetric_comm) * element for kind in kinds]

    # State --------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue the schedule exactly: step, intervals, factors, inverses."""
        def cpu(tensors: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, torch.Tensor]]:
            return {name: {kind: t.detach().cpu().clone() for kind, t in kinds.items()}
                    for name, kinds in tensors.items()}

        # Without a running average the factors are the previous factors: saved once.
        factors = cpu(self.factors) if self.factor_decay is not None else None
        return {"steps": self.steps, "scheduler": self.scheduler.state_dict(), "factors": factors,
                "previous": cpu(self.previous), "inverses": cpu(self.inverses),
                "traffic": self.traffic.state_dict(), "layer_names": self.layer_names}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing = {"steps", "scheduler", "factors", "previous", "inverses", "traffic"} - set(state)
        if missing:
            raise ValueError(f"K-FAC state lacks {sorted(missing)}")
        if list(state.get("layer_names", self.layer_names)) != self.layer_names:
            raise ValueError("K-FAC state was saved for a model with other layers than this one")
        state = dict(state)
        if state["factors"] is None:
            state["factors"] = state["previous"]
        unknown = {name for group in ("factors", "previous", "inverses") for name in state[group]} - set(self.layers)
        if unknown:
            raise ValueError(f"K-FAC state names layers this model does not have: {sorted(unknown)[:3]}")
        for group in ("factors", "previous", "inverses"):
            for name, kinds in state[group].items():
                for kind, tensor in kinds.items():
                    expected = self.layers[name].factor_shapes()[kind]
                    if tuple(tensor.shape) != tuple(expected):
                        raise ValueError(f"K-FAC state {group}/{name}/{kind} has shape {tuple(tensor.shape)}, "
                                         f"the model needs {tuple(expected)}")
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = int(state["steps"])
        for group in ("factors", "previous", "inverses"):
            target = getattr(self, group)
            for name, kinds in state[group].items():
                device = self.layers[name].module.weight.device
                dtype = self.layers[name].factor_dtype
                target[name] = {kind: t.to(device=device, dtype=dtype) for kind, t in kinds.items()}
        if self.factor_decay is None:
            self.factors = {name: dict(kinds) for name, kinds in self.previous.items()}
        self.traffic.load_state_dict(state["traffic"])
        self.capture.arm(self._due_kinds(self.steps + 1))
