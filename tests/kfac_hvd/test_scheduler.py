"""Algorithm 1, checked against sequences computed by hand."""

import pytest

from kfac_hvd.scheduler import IntervalScheduler, ScheduleOptions, due_steps


def steps_for(diffs, **options):
    scheduler = IntervalScheduler(["layer"], **options)
    return due_steps(scheduler, "layer", diffs), scheduler


def test_constant_factors_modulo_gives_every_even_step():
    steps, scheduler = steps_for([None] + [0.0] * 7, update_threshold=0.25)
    assert steps == [1, 2, 4, 6, 8, 10, 12, 14]
    assert scheduler.interval["layer"] == 8


def test_constant_factors_since_last_gives_growing_gaps():
    steps, _ = steps_for([None] + [0.0] * 6, update_threshold=0.25, interval_policy="since_last")
    assert steps == [1, 2, 4, 7, 11, 16, 22]


def test_diff_at_or_above_threshold_keeps_interval_one():
    steps, scheduler = steps_for([None, 0.25, 0.3, 1.0, 0.25], update_threshold=0.25)
    assert steps == [1, 2, 3, 4, 5]
    assert scheduler.interval["layer"] == 1


def test_mixed_diffs_hand_computed():
    # t=1 first update; t=2 diff .1 -> interval 2; t=4 diff .5 -> stays 2; t=6 diff .1 -> 3; t=9 -> 4; t=12
    steps, scheduler = steps_for([None, 0.1, 0.5, 0.1, 0.1, 0.9], update_threshold=0.25)
    assert steps == [1, 2, 4, 6, 9, 12]
    assert scheduler.interval["layer"] == 4


def test_no_threshold_means_every_step():
    steps, scheduler = steps_for([None] + [0.0] * 5)
    assert steps == [1, 2, 3, 4, 5, 6]
    assert scheduler.interval["layer"] == 1


def test_fixed_interval_without_threshold():
    steps, _ = steps_for([None] + [0.9] * 5, initial_interval=3)
    assert steps == [1, 3, 6, 9, 12, 15]
    steps, _ = steps_for([None] + [0.9] * 3, initial_interval=3, interval_policy="since_last")
    assert steps == [1, 4, 7, 10]


def test_max_interval_caps_growth():
    steps, scheduler = steps_for(
        [None] + [0.0] * 6, update_threshold=0.25, interval_policy="since_last", max_interval=3
    )
    assert steps == [1, 2, 4, 7, 10, 13, 16]
    assert scheduler.interval["layer"] == 3


def test_shrink_multiple_halves_interval_on_a_jump():
    # since_last: t=1; t=2 (.0 -> 2); t=4 (.0 -> 3); t=7 (.0 -> 4); t=11 diff 1.0 >= 2·λ -> 2; t=13
    steps, scheduler = steps_for(
        [None, 0.0, 0.0, 0.0, 1.0, 0.0],
        update_threshold=0.25,
        interval_policy="since_last",
        shrink_multiple=2.0,
    )
    assert steps == [1, 2, 4, 7, 11, 13]
    assert scheduler.interval["layer"] == 3


def test_state_round_trip_continues_the_schedule():
    full, _ = steps_for([None] + [0.0] * 9, update_threshold=0.25, interval_policy="since_last")
    first = IntervalScheduler(["layer"], update_threshold=0.25, interval_policy="since_last")
    head = due_steps(first, "layer", [None] + [0.0] * 4)
    second = IntervalScheduler(["layer"], update_threshold=0.25, interval_policy="since_last")
    second.load_state_dict(first.state_dict())
    tail = [
        s
        for s in range(head[-1] + 1, full[-1] + 1)
        if second.is_due("layer", s) and second.record("layer", s, 0.0) is not None
    ]
    assert head + tail == full


def test_scheduler_takes_its_options_as_a_structure_or_as_fields():
    options = ScheduleOptions(update_threshold=0.25, initial_interval=3)
    assert IntervalScheduler(["layer"], options).interval == {"layer": 3}
    assert IntervalScheduler(["layer"], update_threshold=0.25, initial_interval=3).options == options
    with pytest.raises(TypeError):
        IntervalScheduler(["layer"], options, max_interval=2)


def test_scheduler_module_is_pure():
    import ast
    import inspect

    import kfac_hvd.scheduler as module

    tree = ast.parse(inspect.getsource(module))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        (node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    }
    assert not imported & {"torch", "horovod", "mpi4py"}
