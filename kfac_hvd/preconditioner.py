"""K-FAC preconditioner for data-parallel training over Horovod.

One training step, as it happens:

    hooks capture              (forward/backward, armed layers only; autocast off, fp32/fp64 sums)
      → factor allreduce       (started from the hooks as each factor is final, so it overlaps the
                                backward pass; kfac.A.<layer>, kfac.G.<layer>, kfac.F.<layer>)
    KFAC.step():
      → wait for the factors   (one host read: finiteness, Diff and π of every due factor)
      → schedule update        (Algorithm 1 on the averaged factors; rank 0's decision is kept)
      → owner inverts          (layers partitioned over ranks by inversion cost; small layers and
                                unit-wise BatchNorm inverted on every rank; a full 2C×2C BatchNorm
                                block like any factor of its width; one batched call per factor size;
                                one host read for all inversions)
      → inverse allgather      (one collective, kfac.inverses, carrying rank 0's intervals too)
      → precondition every layer, on the device
and the caller's optimiser step follows.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .assignment import Assignment, assign_layers, inverted_everywhere
from .capture import FactorCapture
from .comm import TrafficCounter, default_communicator, every_step_cost
from .cost import layer_costs
from .exchange import Arrived, FactorExchange, allgather_inverses
from .factors import (
    TRIANGLES,
    FactorStatistics,
    damping_shifts,
    diff_from_squares,
    factor_statistics,
    invert_all,
    kl_clip_scale,
    robust_damped_inverses,
    unpack,
)
from .layers import Layer, make_layer
from .options import KFACOptions
from .precision import fp32_matmul_precision
from .record import step_record
from .scheduler import IntervalKeys, IntervalScheduler
from .state import LayerState, held_bytes, load_kfac_state, save_kfac_state
from .timing import PhaseTimer

logger = logging.getLogger(__name__)
NON_FINITE = "non-finite factor dropped, previous inverse kept"


class KFAC:
    """Replaces each registered layer's ``.grad`` by its K-FAC preconditioned gradient on ``step()``.

    Call ``step`` after the gradients are averaged over ranks (``optimizer.synchronize()``) and before
    the optimiser's own step; call ``skip_step`` instead when the optimiser skips the step. The options
    are a :class:`kfac_hvd.KFACOptions` (``options=``) or its fields as keywords.
    """

    def __init__(
        self, model: nn.Module, *, comm: Any = None, options: KFACOptions | None = None, **option_values: Any
    ) -> None:
        if options is not None and option_values:
            raise TypeError("KFAC takes options=KFACOptions(...) or the options as keywords, not both")
        self.options = opts = options if options is not None else KFACOptions(**option_values)
        self.layers: dict[str, Layer] = _register_layers(model, opts)
        self.comm = comm if comm is not None else default_communicator()
        self.local_layers = [
            name
            for name, layer in self.layers.items()
            if inverted_everywhere(layer.factor_shapes(), opts.local_inverse_max_dim)
        ]
        self._local = set(self.local_layers)
        self.assignment: Assignment = self.assign(self.comm.size)
        kinds = {name: layer.factor_kinds for name, layer in self.layers.items()}
        self.keys = IntervalKeys(kinds, separate=opts.separate_intervals)
        self.scheduler = IntervalScheduler(self.keys.every(), opts.schedule)
        self.traffic = TrafficCounter(self.comm.size)
        self.layer_costs = layer_costs(
            self.layers.values(),
            symmetric=opts.symmetric_comm,
            local_inverse_max_dim=opts.local_inverse_max_dim,
        )
        self._every_step_cost = every_step_cost(self.layer_costs.values(), self.comm.size)
        self._transport_dtype = _promote(layer.factor_dtype for layer in self.layers.values())
        self.steps = 0
        self.layer_state: dict[str, LayerState] = {name: LayerState() for name in self.layers}
        self._rejected: set[str] = set()  # layers whose averaged factors were non-finite on this step
        self.timer = PhaseTimer()
        self.exchange = FactorExchange(self.comm, self.traffic, symmetric=opts.symmetric_comm)
        self.capture = FactorCapture(
            self.layers,
            on_final=self._factor_final,
            timer=self.timer,
            accumulation_steps=opts.accumulation_steps,
            chunk_bytes=opts.unfold_chunk_bytes,
            split_halves=opts.noise_aware_diff,
            narrow_products=opts.narrow_factor_products,
            matmul_precision=opts.factor_matmul_precision,
        )
        self._arm(1)

    # Introspection ------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def factors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The factors by layer and kind (like ``previous`` and ``inverses``, a view of ``layer_state``)."""
        return {name: state.factors for name, state in self.layer_state.items()}

    @property
    def previous(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: state.previous for name, state in self.layer_state.items()}

    @property
    def inverses(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: state.inverses for name, state in self.layer_state.items()}

    def inversion_costs(self) -> dict[str, float]:
        return {name: layer.inversion_cost() for name, layer in self.layers.items()}

    def assign(self, world_size: int) -> Assignment:
        """Owners of the layers whose inverses travel, for ``world_size`` ranks (layers inverted on every
        rank, see ``local_inverse_max_dim``, are left out of the balance)."""
        return assign_layers(
            {name: cost for name, cost in self.inversion_costs().items() if name not in self._local},
            world_size,
        )

    def mean_interval(self) -> float:
        intervals = [self.scheduler.interval_for(key, self.steps + 1) for key in self.scheduler.keys]
        return sum(intervals) / len(intervals)

    def comm_stats(self) -> dict[str, Any]:
        """Cumulative Fisher traffic of this rank (see :mod:`kfac_hvd.comm` for the wire model)."""
        return {"steps": self.steps, **self.traffic.summary()}

    def collect_times(self) -> dict[str, float]:
        """Seconds per phase ("factor", "factor_comm", "schedule", "inverse", "inverse_comm",
        "precondition") summed over the steps since the last call, then reset. On CUDA the phases are
        CUDA events and this waits for the last of them: call it when you log, not on every step."""
        return self.timer.collect()

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for K-FAC, by category (tensors shared between categories counted once)."""
        seen: set = set()
        sizes = {
            "factors": held_bytes(self.layer_state.values(), ("factors", "previous"), seen),
            "inverses": held_bytes(self.layer_state.values(), ("inverses",), seen),
            "capture_buffers": self.capture.buffer_bytes(),
            "communication_buffers": self.exchange.buffer_bytes(),
            "caches": TRIANGLES.nbytes(),
        }
        sizes["total"] = sum(sizes.values())
        return sizes

    def remove_hooks(self) -> None:
        self.capture.remove()

    # The training step --------------------------------------------------------------------------
    def step(self, *, lr: float | None = None, loss_scale: Any = None) -> dict[str, Any]:
        """Precondition every registered layer's gradient in place; return this step's record.

        ``loss_scale``: the factor by which the backward pass's gradients were multiplied (a GradScaler's
        scale, a float or a 0-d tensor); the gradient-side factors are divided by its square. The
        gradients themselves must already be unscaled (``scaler.unscale_(optimizer)``).
        """
        if self.options.kl_clip is not None and lr is None:
            raise ValueError("kfac.step(lr=...) is required when kl_clip is set")
        step = self.steps + 1
        due = self._due
        device = self._device()
        numerics: dict[str, str] = {}
        with self.timer.phase("factor_comm", device):
            arrived = self._wait_for_factors(count_compute=True)
        with self.timer.phase("schedule", device):
            diffs, due_keys = self._adopt_factors(step, arrived, loss_scale, numerics)
        with self.timer.phase("inverse", device):
            mine = self._invert(due, numerics)
        with self.timer.phase("inverse_comm", device):
            self._share_inverses(due, mine, due_keys)
        with self.timer.phase("precondition", device):
            kl_scale = self._precondition(lr)
        self.traffic.add_totals(**self._every_step_cost)
        self.steps = step
        return self._finish(step, due, diffs, numerics, kl_scale, skipped=False)

    def skip_step(self, *, check_factors: bool = True) -> dict[str, Any]:
        """The optimiser skips this step on every rank: wait for the factor collectives the hooks started,
        keep nothing, count nothing as computed, and leave the step counter where it is (the next step
        captures again). With ``check_factors``, layers whose averaged factors were non-finite are
        reported (one host read); a loss-scale overflow, expected under fp16, needs no such report."""
        step = self.steps + 1
        due = self._due
        with self.timer.phase("factor_comm", self._device()):
            arrived = self._wait_for_factors(count_compute=False)
        numerics = {}
        if check_factors:
            entries = [(factor, None) for kinds in arrived.values() for factor in kinds.values()]
            totals = iter(statistics.total for statistics in self._statistics(entries))
            for name, kinds in arrived.items():
                if not all([math.isfinite(next(totals)) for _ in kinds]):
                    numerics[name] = NON_FINITE
        return self._finish(step, due, {}, numerics, None, skipped=True)

    def _finish(
        self,
        step: int,
        due: dict[str, list[str]],
        diffs: dict[str, dict[str, float]],
        numerics: dict[str, str],
        kl_scale: torch.Tensor | None,
        *,
        skipped: bool,
    ) -> dict[str, Any]:
        started = self.exchange.reset_counts()
        self._rejected.clear()
        self._arm(self.steps + 1)
        self.timer.fold_finished()
        for name, event in numerics.items():
            logger.warning("K-FAC step %d, layer '%s': %s", step, name, event)
        record = step_record(self, step, due, diffs, kl_scale)
        record.update(numerics=numerics, skipped=skipped, factor_allreduces_started=started)
        return record

    def _factor_final(
        self, name: str, kind: str, factor: torch.Tensor, noise: torch.Tensor | None, from_step: bool
    ) -> None:
        self.exchange.start(name, kind, factor, noise, from_step=from_step)

    def _wait_for_factors(self, *, count_compute: bool) -> dict[str, dict[str, Arrived]]:
        self.capture.finish()
        missing = self.capture.missing()
        if missing:
            name, kind = missing[0]
            raise RuntimeError(
                f"K-FAC layer '{name}' is due on step {self.steps + 1} but captured no {kind} factor: "
                "run forward and backward in training mode before kfac.step(), or skip the layer"
            )
        arrived = self.exchange.wait()
        if count_compute:
            self.traffic.add_totals(
                computed_elements=sum(
                    math.prod(factor.shape) for kinds in arrived.values() for factor in kinds.values()
                )
            )
        return arrived

    def _adopt_factors(
        self, step: int, arrived: dict[str, dict[str, Arrived]], loss_scale: Any, numerics: dict[str, str]
    ) -> tuple[dict[str, dict[str, float]], list[str]]:
        """Algorithm 1's bookkeeping on the averaged factors (one host read for all of them).

        A non-finite averaged factor (every rank sees the same one) is dropped: the layer keeps its
        factors and inverses, and its interval is reset to 1 so that it is refreshed on the next step.
        Returns the diffs and the keys whose intervals rank 0 decided (every rank adopts rank 0's).
        """
        if loss_scale is not None:
            _unscale(arrived, loss_scale)
        order = [(name, kind) for name, kinds in arrived.items() for kind in kinds]
        statistics = self._statistics(
            [(arrived[name][kind], self.layer_state[name].previous.get(kind)) for name, kind in order]
        )
        by_layer: dict[str, dict[str, FactorStatistics]] = {}
        for (name, kind), numbers in zip(order, statistics):
            by_layer.setdefault(name, {})[kind] = numbers
        diffs: dict[str, dict[str, float]] = {}
        due_keys: list[str] = []
        for name in (name for name in self.layers if name in by_layer):
            kinds = by_layer[name]
            keys = [key for key in self.keys.of(name) if set(self.keys.kinds_of(name, key)) <= set(kinds)]
            due_keys += keys
            if not all(math.isfinite(factor.total) for factor in kinds.values()):
                numerics[name] = NON_FINITE
                self._rejected.add(name)
                if self.scheduler.adaptive:
                    for key in keys:
                        self.scheduler.set_interval(key, 1)
                continue
            layer_diffs = self._diffs(name, kinds)
            if layer_diffs:
                diffs[name] = layer_diffs
            state = self.layer_state[name]
            for kind, factor in kinds.items():
                fresh = self._unpack_into_previous(state, kind, arrived[name][kind])
                state.adopt(kind, fresh, factor.diagonal_mean, factor.noise, self.options.factor_decay)
            for key in keys:
                found = [layer_diffs[kind] for kind in self.keys.kinds_of(name, key) if kind in layer_diffs]
                self.scheduler.record(key, step, max(found) if found else None)
        return diffs, due_keys

    def _diffs(self, name: str, kinds: dict[str, FactorStatistics]) -> dict[str, float]:
        """Diff(X, X_pre) of each factor that has an X_pre; with noise_aware_diff, of the drift alone
        (and the raw Diff as ``raw_<kind>``)."""
        state = self.layer_state[name]
        diffs: dict[str, float] = {}
        for kind, factor in kinds.items():
            if kind not in state.previous:
                continue
            diffs[kind] = diff_from_squares(factor.change_sq, factor.previous_sq)
            if self.options.noise_aware_diff:
                # E‖X − X_pre‖² = drift² + Var(X) + Var(X_pre): what is left is the drift.
                diffs[f"raw_{kind}"] = diffs[kind]
                drift_sq = factor.change_sq - factor.noise - state.noise.get(kind, 0.0)
                diffs[kind] = diff_from_squares(max(drift_sq, 0.0), factor.previous_sq)
        return diffs

    def _unpack_into_previous(self, state: LayerState, kind: str, arrived: Arrived) -> torch.Tensor:
        """The fresh factor as a full matrix: unpacked in place into X_pre's storage when it exists."""
        if not arrived.transported:
            return arrived.values
        return unpack(
            arrived.values, arrived.shape, self.options.symmetric_comm, out=state.previous.get(kind)
        )

    def _statistics(self, entries: Sequence[tuple[Arrived, torch.Tensor | None]]) -> list[FactorStatistics]:
        """:func:`factor_statistics` of arrived factors (packed triangles, flat or full), one host read."""
        views = []
        for arrived, previous in entries:
            triangles = arrived.transported and self.options.symmetric_comm
            values = arrived.values if triangles else arrived.values.view(arrived.shape)
            views.append((values, arrived.shape, triangles, previous, arrived.noise))
        # The ranks' mean of their local noise estimates, scaled to the mean of P local factors.
        return [
            numbers._replace(noise=numbers.noise / self.comm.size) for numbers in factor_statistics(views)
        ]

    def _invert(
        self, due: dict[str, list[str]], numerics: dict[str, str]
    ) -> dict[tuple[str, str], torch.Tensor]:
        """Invert what this rank inverts: its own due layers and every due local layer (one host read).
        Returns the inverses it must send; a layer it cannot invert sends the inverse already held."""
        rank = self.comm.rank
        jobs: dict[str, dict[str, torch.Tensor]] = {}
        shifts: dict[str, dict[str, float]] = {}
        for name, kinds in due.items():
            if name not in self._local and self.assignment.owner[name] != rank:
                continue
            if name in self._rejected:
                continue
            jobs[name] = {kind: self.layer_state[name].factors[kind] for kind in kinds}
            shifts[name] = damping_shifts(kinds, self.options.damping, self._pi(name))
        inverses, failed = invert_all(
            jobs, shifts, self.options.inverse_method, batched=self.options.batched_inversion
        )
        for name in failed:
            result, event = robust_damped_inverses(
                jobs[name], self.options.damping, pi=self._pi(name), method=self.options.inverse_method
            )
            numerics[name] = event if result is not None else event + ", previous inverse kept"
            if result is not None:
                inverses[name] = result
        mine: dict[tuple[str, str], torch.Tensor] = {}
        for name, kinds in due.items():
            if name in self._local:
                self.layer_state[name].inverses.update(inverses.get(name, {}))
            elif self.assignment.owner[name] == rank:
                for kind in kinds:
                    mine[(name, kind)] = (
                        inverses[name][kind] if name in inverses else self._held_inverse(name, kind)
                    )
        return mine

    def _share_inverses(
        self, due: dict[str, list[str]], mine: dict[tuple[str, str], torch.Tensor], due_keys: list[str]
    ) -> None:
        """One allgather: every owner's inverses, and rank 0's intervals for the due keys."""
        for (name, kind), inverse in mine.items():
            self.layer_state[name].inverses[kind] = inverse
        if self.comm.size == 1:
            return
        layout: list[list[tuple[str, str, tuple[int, ...]]]] = [[] for _ in range(self.comm.size)]
        for name, kinds in due.items():
            if name not in self._local:
                shapes = self.layers[name].factor_shapes()
                layout[self.assignment.owner[name]] += [(name, kind, shapes[kind]) for kind in kinds]
        control_count = len(due_keys) if self.scheduler.adaptive else 0
        if not any(layout) and not control_count:
            return
        control = [float(self.scheduler.interval[key]) for key in due_keys] if self.comm.rank == 0 else None
        received, intervals = allgather_inverses(
            self.comm,
            self.traffic,
            layout=layout,
            mine=mine,
            control=control,
            control_count=control_count,
            symmetric=self.options.symmetric_comm,
            dtype=self._transport_dtype,
            device=self._device(),
        )
        # The owner too keeps what travelled, not what it computed: with symmetric_comm the others hold
        # the mirrored upper triangle, and an inverse is symmetric only to round-off, so replicas would
        # otherwise drift apart in the last bits on every update.
        for (name, kind), values in received.items():
            shape, dtype = self.layers[name].factor_shapes()[kind], self.layers[name].factor_dtype
            held = self.layer_state[name].inverses.get(kind)
            if held is None or held.dtype != dtype or not held.is_contiguous():
                held = torch.empty(shape, dtype=dtype, device=values.device)
                self.layer_state[name].inverses[kind] = held
            unpack(values.to(dtype), shape, self.options.symmetric_comm, out=held)  # in place: no second copy
        # Ranks may round the averaged factors differently (MPI allreduce does not promise bitwise
        # equality), so rank 0's intervals are the ones every rank keeps.
        for key, interval in zip(due_keys, intervals):
            self.scheduler.set_interval(key, int(interval))

    def _held_inverse(self, name: str, kind: str) -> torch.Tensor:
        if kind in self.layer_state[name].inverses:
            return self.layer_state[name].inverses[kind]
        shape = self.layers[name].factor_shapes()[kind]
        eye = torch.eye(shape[-1], dtype=self.layers[name].factor_dtype, device=self._device())
        return eye.expand(shape).clone()  # no inverse yet: this layer's gradient passes unchanged

    def _pi(self, name: str) -> float:
        return self.layer_state[name].pi() if self.options.pi_damping else 1.0

    def _precondition(self, lr: float | None) -> torch.Tensor | None:
        gradients: dict[str, torch.Tensor] = {}
        updates: dict[str, torch.Tensor] = {}
        scale = None
        # Full fp32 whatever the caller's TF32 setting: the damped inverses are ill-conditioned, and TF32
        # would change the update far more than the factors (README, "factor_matmul_precision").
        with fp32_matmul_precision(self._device(), "highest"):
            for name, layer in self.layers.items():
                inverses = self.layer_state[name].inverses
                if layer.module.weight.grad is None or len(inverses) < len(layer.factor_kinds):
                    continue  # no part in this step's loss, or never inverted: the plain gradient stays
                gradients[name] = layer.grad_matrix()
                updates[name] = layer.precondition(inverses, gradients[name])
            if self.options.kl_clip is not None and lr is not None and updates:  # step() checked lr
                scale = kl_clip_scale(updates, gradients, self.options.kl_clip, lr)
        for name, update in updates.items():
            self.layers[name].set_grad_matrix(update * scale if scale is not None else update)
        return scale

    def _arm(self, step: int) -> None:
        self._due = self.keys.due(self.scheduler, step)
        self.capture.arm({name: kinds for name, kinds in self._due.items()})

    def _device(self) -> torch.device:
        return next(iter(self.layers.values())).module.weight.device

    # State --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the schedule exactly: step, intervals, factors, inverses."""
        return save_kfac_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_kfac_state(self, state)
        self._arm(self.steps + 1)


def _register_layers(model: nn.Module, options: KFACOptions) -> dict[str, Layer]:
    skip_patterns = [re.compile(pattern) for pattern in options.skip_layers]
    layers: dict[str, Layer] = {}
    for name, module in model.named_modules():
        if any(pattern.search(name) for pattern in skip_patterns):
            continue
        layer = make_layer(
            name,
            module,
            include_batchnorm=options.include_batchnorm,
            factor_dtype=options.factor_dtype,
            batchnorm_fisher=options.batchnorm_fisher,
        )
        if layer is not None:
            layers[name] = layer
    if not layers:
        raise ValueError("KFAC found no Linear, Conv2d or BatchNorm2d layer to precondition in the model")
    return layers


def _unscale(arrived: dict[str, dict[str, Arrived]], loss_scale: Any) -> None:
    """Divide the loss scale out of the gradient-side factors (they carry its square)."""
    for kinds in arrived.values():
        for kind, factor in kinds.items():
            if kind != "A":
                factor.values.div_(loss_scale**2)
                if factor.noise is not None:  # a squared norm of G-sized differences
                    factor.noise = factor.noise / loss_scale**4


def _promote(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result
