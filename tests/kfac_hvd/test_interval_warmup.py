"""KFACOptions.interval_warmup_steps: a fixed interval's warm-up of every-step factors, applied by the
scheduler itself, kept in K-FAC's state, and refused with the adaptive interval."""

import pytest
import torch
from torch import nn

import kfac_hvd
from kfac_hvd.scheduler import IntervalScheduler, ScheduleOptions, due_steps


def scheduler(**options):
    return IntervalScheduler(["layer"], ScheduleOptions(**options))


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("modulo", [1, 2, 3, 4, 6, 9, 12, 15]),  # every step to 4, then the multiples of 3
        ("since_last", [1, 2, 3, 4, 7, 10, 13, 16]),  # every step to 4, then 3 steps after the last
    ],
)
def test_every_step_in_the_warmup_then_the_fixed_interval(policy, expected):
    s = scheduler(initial_interval=3, warmup_steps=4, interval_policy=policy)
    assert due_steps(s, "layer", [None] * len(expected)) == expected
    assert [s.interval_for("layer", t) for t in (1, 4, 5)] == [1, 1, 3]


def test_no_warmup_is_the_fixed_interval_from_step_one():
    assert due_steps(scheduler(initial_interval=3), "layer", [None] * 4) == [1, 3, 6, 9]


def test_the_warmup_travels_with_the_state_and_an_old_state_keeps_the_fixed_interval():
    first = scheduler(initial_interval=3, warmup_steps=4)
    due_steps(first, "layer", [None] * 2)  # steps 1 and 2
    # A rank built for another world size (another warm-up in steps) continues the first one's.
    second = scheduler(initial_interval=3, warmup_steps=9)
    second.load_state_dict(first.state_dict())
    assert [t for t in range(3, 10) if second.is_due("layer", t)] == [3, 4, 6, 9]
    # A state from before the option: the interval a launcher lowered to 1 for its own warm-up, no
    # warm-up length. The options' warm-up and interval apply.
    old = scheduler(initial_interval=3, warmup_steps=4)
    old.load_state_dict({"interval": {"layer": 1}, "last_update": {"layer": 2}})
    assert [t for t in range(3, 10) if old.is_due("layer", t)] == [3, 4, 6, 9]


def test_the_adaptive_interval_keeps_its_state_and_refuses_a_warmup():
    adaptive = scheduler(update_threshold=0.25)
    due_steps(adaptive, "layer", [None, 0.0, 0.0])
    again = scheduler(update_threshold=0.25)
    again.load_state_dict(adaptive.state_dict())
    assert again.interval == adaptive.interval == {"layer": 3}
    with pytest.raises(ValueError, match="^interval_warmup_steps applies to a fixed interval only"):
        kfac_hvd.KFACOptions(update_threshold=0.25, interval_warmup_steps=4)
    with pytest.raises(ValueError, match="^interval_warmup_steps must be an int >= 0"):
        kfac_hvd.KFACOptions(interval_warmup_steps=-1)


def test_kfac_updates_every_factor_in_the_warmup_and_reports_interval_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    kfac = kfac_hvd.KFAC(model, update_interval=3, interval_warmup_steps=4)
    due, intervals = [], []
    for step in range(1, 16):
        model.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        record = kfac.step()
        layers = record["layers"].values()
        assert len({entry["due"] for entry in layers}) == 1  # all layers alike
        if next(iter(layers))["due"]:
            due.append(step)
        intervals.append(record["mean_interval"])
    assert due == [1, 2, 3, 4, 6, 9, 12, 15]
    # The interval that decides the next step: 1 up to the record of step 3, then 3.
    assert intervals == [1.0] * 3 + [3.0] * 12
    assert kfac.state_dict()["scheduler"]["warmup_steps"] == 4
    assert "warmup_steps" not in kfac_hvd.KFAC(nn.Linear(2, 2), update_interval=3).state_dict()["scheduler"]
