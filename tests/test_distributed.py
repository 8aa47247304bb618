"""Real 2-rank runs under horovodrun --gloo and mpirun: equivalence, agreement, accounting."""
import json

import pytest

from kfac_hvd.timeline import read_collectives
from multiproc import LAUNCHERS, run

WORKER = "tests/workers/kfac_worker.py"


def read_ranks(out):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_half_batches_equal_one_whole_batch(launcher, tmp_path):
    run(launcher, [WORKER, "equivalence", "--out", str(tmp_path), "--steps", "4"])
    for result in read_ranks(tmp_path):
        assert result["size"] == 2
        assert result["max_relative_grad_gap"] < 1e-9, result["max_relative_grad_gap"]
        assert result["parameter_gap"] < 1e-9
        assert sorted(set(result["owners"].values())) == [0, 1]  # both ranks invert something
        assert result["stats"]["payload_bytes"] > 0


def test_dense_transport_gives_the_same_result_with_more_bytes(tmp_path):
    packed, dense = tmp_path / "packed", tmp_path / "dense"
    packed.mkdir(), dense.mkdir()
    run("horovodrun-gloo", [WORKER, "equivalence", "--out", str(packed), "--steps", "2"])
    run("horovodrun-gloo", [WORKER, "equivalence", "--out", str(dense), "--steps", "2", "--no-symmetric"])
    packed_stats, dense_stats = read_ranks(packed)[0]["stats"], read_ranks(dense)[0]["stats"]
    assert read_ranks(dense)[0]["max_relative_grad_gap"] < 1e-9
    assert packed_stats["payload_bytes"] < 0.6 * dense_stats["payload_bytes"]
    assert packed_stats["dense_payload_bytes"] == dense_stats["payload_bytes"]


@pytest.mark.parametrize("launcher,policy", [("horovodrun-gloo", "modulo"), ("mpirun", "since_last")])
def test_ranks_take_identical_schedule_decisions(launcher, policy, tmp_path):
    run(launcher, [WORKER, "schedule", "--out", str(tmp_path), "--steps", "30", "--threshold", "0.25",
                   "--policy", policy])
    rank0, rank1 = read_ranks(tmp_path)
    def decisions(result):
        return [{name: (entry["due"], entry["interval"]) for name, entry in record["layers"].items()}
                for record in result["records"]]
    assert decisions(rank0) == decisions(rank1)
    intervals = [entry["interval"] for entry in rank0["records"][-1]["layers"].values()]
    assert max(intervals) > 1, "λ = 0.25 should have grown some interval in 30 steps"
    assert rank0["stats"]["ratio"] < 1
    assert rank0["stats"]["payload_bytes"] == rank1["stats"]["payload_bytes"]


def test_counters_agree_with_horovod_timeline(tmp_path):
    timeline = tmp_path / "timeline.json"
    run("horovodrun-gloo", [WORKER, "schedule", "--out", str(tmp_path), "--steps", "12"],
        env={"HOROVOD_TIMELINE": str(timeline)})
    rank0 = read_ranks(tmp_path)[0]
    stats, owners = rank0["stats"], rank0["owners"]
    seen = read_collectives(str(timeline))
    expected = {}
    for layer, kinds in stats["per_layer"].items():
        for kind, entry in kinds.items():
            op = "broadcast" if kind.endswith("_inv") else "allreduce"
            rooted_here = op == "broadcast" and owners[layer] == 0
            expected[(op, f"kfac.{kind}.{layer}")] = [entry["count"], 0 if rooted_here else entry["payload_bytes"]]
    schedule = seen.pop(("broadcast", "kfac.schedule"))
    assert seen == expected
    assert schedule[0] == sum(1 for r in rank0["records"] if any(e["due"] for e in r["layers"].values()))
    assert any(owner == 1 for owner in owners.values()) and any(owner == 0 for owner in owners.values())
    assert sum(entry["payload_bytes"] for kinds in stats["per_layer"].values() for entry in kinds.values()) \
        == stats["payload_bytes"]
