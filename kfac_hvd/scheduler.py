"""Per-layer adaptive factor-update interval (Algorithm 1 of Osawa et al.).

A pure module: plain Python numbers in, plain Python numbers out. No torch, no Horovod, so every rank
that feeds it the same diffs takes the same decisions. Read it beside the paper's pseudo-code:

    interval_l <- 1 for every layer
    for t = 1 .. t_max:
      if t == 1:                         -> due(key, 1) is True for every key
        compute + communicate G, A;  G_pre, A_pre <- G, A
      else if t is a multiple of interval_l:   -> due(key, t), policy "modulo"
        compute + communicate G, A
        if max(Diff(G, G_pre), Diff(A, A_pre)) < lambda:  interval_l += 1   -> record(key, t, diff)
        G_pre, A_pre <- G, A

A *key* is what owns an interval: a layer name, or "layer:A" / "layer:G" when A and G keep separate
intervals. Computing the diff (a Frobenius-norm ratio of factors) is the caller's job; this module only
turns diffs into intervals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

POLICIES = ("modulo", "since_last")


@dataclass(frozen=True, kw_only=True)
class ScheduleOptions:
    """Algorithm 1's knobs. Their bounds and docs live in :class:`kfac_hvd.KFACOptions`, which checks
    them; its ``schedule`` property gives this part of them.

    update_threshold: λ. ``None`` means every key is due on every step (plain K-FAC).
    interval_policy: ``"modulo"`` (the paper: due when t mod interval == 0) or ``"since_last"``
        (due when t - t_last >= interval).
    max_interval: optional cap on any interval.
    shrink_multiple: optional m; a diff >= m·λ halves the interval (at least 1), so a layer whose
        factors jump (say after a learning-rate drop) is refreshed sooner. Not in the paper.
    initial_interval: every key's interval before any diff is seen (Algorithm 1: 1). Without λ it
        is a fixed interval: due at step 1 and then on every multiple (``modulo``) or every
        ``initial_interval`` steps after the last update (``since_last``).
    warmup_steps: with a fixed interval only: every key is due on steps 1 .. warmup_steps, and the
        fixed interval applies after them (fresh factors while the early weights move fast). Not in
        the paper.
    """

    update_threshold: float | None = None
    interval_policy: str = "modulo"
    max_interval: int | None = None
    shrink_multiple: float | None = None
    initial_interval: int = 1
    warmup_steps: int = 0


class IntervalScheduler:
    """Decides on which optimiser steps each key's factors are recomputed.

    ``IntervalScheduler(keys, options)`` or ``IntervalScheduler(keys, update_threshold=...)``: the
    options as a :class:`ScheduleOptions` or as its fields.
    """

    def __init__(self, keys: Iterable[str], options: ScheduleOptions | None = None, **values: Any) -> None:
        if options is not None and values:
            raise TypeError("IntervalScheduler takes a ScheduleOptions or its fields, not both")
        self.options = options if options is not None else ScheduleOptions(**values)
        self.keys = list(keys)
        self.interval: dict[str, int] = dict.fromkeys(self.keys, self.options.initial_interval)
        self.last_update: dict[str, int] = dict.fromkeys(self.keys, 0)
        # Part of the state: a resumed run, or a rank that joins an elastic job, keeps the warm-up its
        # schedule started with (the options' may have been computed for another number of steps).
        self.warmup_steps = self.options.warmup_steps

    @property
    def adaptive(self) -> bool:
        return self.options.update_threshold is not None

    def is_due(self, key: str, step: int) -> bool:
        """Whether ``key``'s factors are computed and communicated on optimiser step ``step`` (from 1)."""
        if step == 1:
            return True
        interval = self.interval_for(key, step)
        if self.options.interval_policy == "modulo":
            return step % interval == 0
        return step - self.last_update[key] >= interval

    def interval_for(self, key: str, step: int) -> int:
        """The interval that decides whether ``key`` is due on ``step``: 1 within the warm-up."""
        return 1 if step <= self.warmup_steps else self.interval[key]

    def record(self, key: str, step: int, diff: float | None) -> int:
        """Take a due step's diff (``None`` on the first update, which has no previous factors).

        Returns the key's interval for the steps that follow.
        """
        self.last_update[key] = step
        options, threshold = self.options, self.options.update_threshold
        if diff is None or threshold is None:
            return self.interval[key]
        interval = self.interval[key]
        if diff < threshold:  # Algorithm 1: the factors barely moved, so wait one step longer
            interval += 1
        elif options.shrink_multiple is not None and diff >= options.shrink_multiple * threshold:
            interval = max(1, interval // 2)
        if options.max_interval is not None:
            interval = min(interval, options.max_interval)
        self.interval[key] = interval
        return interval

    def set_interval(self, key: str, interval: int) -> None:
        """Adopt a decision taken elsewhere (rank 0's, allgathered with the inverses so that all ranks
        agree)."""
        self.interval[key] = int(interval)

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"interval": dict(self.interval), "last_update": dict(self.last_update)}
        if self.warmup_steps:  # only then: a schedule without a warm-up keeps the state it always had
            state["warmup_steps"] = self.warmup_steps
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``. A fixed interval stays the options' own: only the adaptive interval
        is state (a state written before ``warmup_steps`` existed may hold the 1 that a launcher set
        for its own warm-up); a state without ``warmup_steps`` keeps the options'."""
        unknown = set(state["interval"]) - set(self.keys)
        if unknown:
            raise ValueError(f"scheduler state names keys this model does not have: {sorted(unknown)[:3]}")
        if self.adaptive:
            self.interval.update({k: int(v) for k, v in state["interval"].items()})
        self.last_update.update({k: int(v) for k, v in state["last_update"].items()})
        self.warmup_steps = int(state.get("warmup_steps", self.warmup_steps))


class IntervalKeys:
    """The keys of each layer's factors: the layer's name, or "layer:kind" for each kind when the
    factors keep separate intervals."""

    def __init__(self, kinds: Mapping[str, Sequence[str]], *, separate: bool) -> None:
        self.kinds = {name: list(layer_kinds) for name, layer_kinds in kinds.items()}
        self.separate = separate

    def of(self, name: str) -> list[str]:
        return [f"{name}:{kind}" for kind in self.kinds[name]] if self.separate else [name]

    def kinds_of(self, name: str, key: str) -> list[str]:
        return [key.rsplit(":", 1)[1]] if self.separate else list(self.kinds[name])

    def every(self) -> list[str]:
        return [key for name in self.kinds for key in self.of(name)]

    def due(self, scheduler: IntervalScheduler, step: int) -> dict[str, list[str]]:
        """The due kinds of each layer on ``step`` (layers with none left out)."""
        due: dict[str, list[str]] = {}
        for name in self.kinds:
            kinds = [
                kind
                for key in self.of(name)
                if scheduler.is_due(key, step)
                for kind in self.kinds_of(name, key)
            ]
            if kinds:
                due[name] = kinds
        return due


def due_steps(scheduler: IntervalScheduler, key: str, diffs: Iterable[float | None]) -> list[int]:
    """The due steps of ``key`` when its successive due steps see ``diffs`` (a small replay helper).

    Stops when ``diffs`` is exhausted; used by tests and by the traffic model.
    """
    steps: list[int] = []
    diff_iter = iter(diffs)
    step = 0
    while True:
        step += 1
        if not scheduler.is_due(key, step):
            continue
        try:
            diff = next(diff_iter)
        except StopIteration:
            return steps
        steps.append(step)
        scheduler.record(key, step, diff)
