"""The step-cost benchmark's own logic, on a tiny model in one process: the replay imposes exactly the
recorded due pattern, the compact trace replays like the full one, each phase's limit is the roofline of
the FLOPs and bytes from the layer shapes, and the GPU check stops cleanly without a GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bench import _step_cost_limits as limits
from bench import _step_cost_worker as worker
from bench import step_cost
from bench._step_cost_backends import LocalBackend
from bench._step_cost_report import summarise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny model's K-FAC layers, in order: conv (kronecker), bn, conv, bn, fc.
KINDS = ["kronecker", "batchnorm", "kronecker", "batchnorm", "kronecker"]


def write_trace(path, due_rows):
    """A metrics.jsonl of a 5-layer model named like the trace of another model (r0..r4)."""
    with open(path, "w") as handle:
        for step, due in enumerate(due_rows, 1):
            layers = {
                f"r{i}": {
                    "due": i in due,
                    **({"diff_F": 0.1} if kind == "batchnorm" else {"diff_A": 0.1, "diff_G": 0.1}),
                }
                for i, kind in enumerate(KINDS)
            }
            handle.write(json.dumps({"step": step, "kfac": {"step": step, "layers": layers}}) + "\n")


def worker_args(tmp_path, *extra):
    args = step_cost.parse_args(
        ["--smoke", "--ranks", "1", "--launcher", "direct", "--worker", "--worker-dir", str(tmp_path), *extra]
    )
    return args


def test_replay_imposes_the_recorded_due_pattern(tmp_path):
    trace = tmp_path / "metrics.jsonl"
    pattern = [{0, 1}, set(), {4}, {0, 1, 2, 3, 4}, {2}]
    write_trace(trace, [{0}] * 7 + pattern)  # the replay takes the last 5 steps
    args = worker_args(tmp_path, "--configs", "replay", "--schedule-trace", str(trace), "--replay-steps", "5")
    torch.set_num_threads(1)
    result = worker.run_config("replay", "fp32", args, LocalBackend(), torch.device("cpu"))
    assert result["discard"] == 1 and result["timed"] == 5
    due = [step["due"] for step in result["steps"]]
    assert due == [5] + [len(p) for p in pattern]  # step 1: everything; then the pattern, step by step
    assert result["replayed"]["due_per_step"] == [len(p) for p in pattern]


def test_compact_trace_replays_like_the_full_one(tmp_path):
    from kfac_hvd.analysis import replay, traffic
    from kfac_hvd.cost import layer_costs

    full, compact = tmp_path / "metrics.jsonl", tmp_path / "trace.jsonl"
    write_trace(full, [set(range(5))] + [{t % 5, (t * 3) % 5} for t in range(1, 40)])
    step_cost.main(["--keep-trace", str(full), "--schedule-trace", str(compact)])
    assert compact.stat().st_size < full.stat().st_size
    layers = list(
        layer_costs(
            traffic.model_layers(torch.nn.Sequential(torch.nn.Linear(300, 4), torch.nn.Linear(4, 4)))
        ).values()
    )
    replays = [
        replay.replay_trace(
            replay.load_trace(str(path)), layers, 200, 8, update_threshold=0.25, keep_schedule=True
        )
        for path in (full, compact)
    ]
    assert replays[0] == replays[1]


def test_phase_limit_is_the_roofline_of_the_layer_costs(tmp_path):
    """Every-step K-FAC of the tiny model; rates made up: 1 GFLOP/s and 2 GB/s. Each phase's limit is
    max(FLOP / 1e9, bytes / 2e9) of the costs summed from the layer shapes, and the factor products are
    the factor timer less the im2col measured alone."""
    args = worker_args(tmp_path, "--configs", "every")
    rank = {
        "rank": 0,
        "rank_batch": args.rank_batch,
        "device": "cpu",
        "runs": {"fp32/every": worker.run_config("every", "fp32", args, LocalBackend(), torch.device("cpu"))},
    }
    data = {
        "settings": vars(args),
        "raw": {"1": [rank]},
        "cpu_rates": {
            "name": "CPU",
            "fp32": 1e9,
            "memory_bandwidth": 2e9,
            "link_bandwidth": 2e9,
            "source": "test",
        },
    }
    rows = {row["phase"]: row for row in limits.limit_rows(data, summarise(data))}
    profile = limits.layer_profile(data["settings"])
    assert len(profile.layers) == 5 and sum(layer.unfolds for layer in profile.layers) == 2
    for phase in ("factor products", "statistics", "inversion", "precondition", "im2col"):
        flop = sum(layer.phase_costs(args.rank_batch)[phase][0] for layer in profile.layers)
        nbytes = sum(layer.phase_costs(args.rank_batch)[phase][1] for layer in profile.layers)
        assert rows[phase]["limit"] == pytest.approx(max(flop / 1e9, nbytes / 2e9), rel=1e-12)
    timers = summarise(data)["1"]["fp32/every"]["kinds"]["update"]["phases"]
    im2col = rank["runs"]["fp32/every"]["im2col_seconds"]
    assert im2col > 0 and rows["im2col"]["measured"] == im2col
    assert rows["factor products"]["measured"] == pytest.approx(max(0.0, timers["factor"] - im2col))
    assert rows["inversion"]["fraction"] == pytest.approx(rows["inversion"]["limit"] / timers["inverse"])
    assert rows["inverse allgather"]["bytes"] == 0.0  # one rank: nothing travels


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the check would run")
def test_gpu_check_stops_without_a_gpu(tmp_path):
    script = os.path.join(REPO, "scripts", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    done = subprocess.run(
        ["bash", script, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr
    assert not (tmp_path / "out").exists()


def test_variants_record_their_own_options():
    """What the report reads to know a variant's factor path: the variant's value, not the library's default."""
    assert worker.variant_options("every_wide")["narrow_factor_products"] is False
    assert worker.variant_options("every_unbatched")["batched_inversion"] is False
    assert worker.variant_options("every") == {"narrow_factor_products": True, "batched_inversion": True}
    assert worker.unsupported_options("every_wide") == []
