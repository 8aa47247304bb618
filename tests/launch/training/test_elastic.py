"""Elastic K-FAC (train.elastic) under horovodrun's elastic driver, with real processes.

Two (or three) hosts on this machine: ``localhost``, ``127.0.0.1`` and the machine's name resolve to local
addresses, so Horovod starts their workers without ssh but counts them as distinct hosts. The host
discovery script (tests/helpers/workers/elastic_hosts.sh) answers with a file that rank 0 rewrites at planned
commits (tests/helpers/workers/elastic_train.py), and rank 0 waits there for the driver's notice: a leave or a
join takes effect at the planned step, not at a moment that depends on timing.
"""

import json
import os
import random
import socket
import subprocess

import pytest

from launch.config.load import load_config
from launch.training.elastic import check_elastic
from tests.helpers.common import BIN, CONFIGS, PYTHON, REPO, describe, env, launch_cmd, run

WORKERS = os.path.join(REPO, "tests", "helpers", "workers")
DEMO = os.path.join(CONFIGS, "fashion_mnist", "small_resnet_kfac_lambda0.25.yaml")
BATCH, TRAIN, EPOCHS, COMMIT = 32, 3072, 2, 4
HOST_A, HOST_B, HOST_C = "localhost", "127.0.0.1", socket.gethostname()
# Top-1 (1000 validation images) of a run with hosts leaving and joining against the run without: the
# training differs (other global batches, other augmentation draws), so only the outcome is compared.
TOP1_TOLERANCE = 0.05
TIMEOUT = 240
WEIGHT_RTOL = 1e-7


def elastic_args(run_dir: str, *extra: str) -> list[str]:
    return [
        "--config",
        DEMO,
        f"log.dir={run_dir}",
        f"data.train_subset={TRAIN}",
        "data.val_subset=1000",
        f"data.batch_size={BATCH}",
        "model.width=4",
        f"train.epochs={EPOCHS}",
        "log.progress=false",
        "log.tensorboard=false",
        "checkpoint.every_epochs=0",
        "train.world_size=null",
        "train.elastic=true",
        f"train.elastic_commit_steps={COMMIT}",
        "kfac.local_inverse_max_dim=0",  # every conv and FC layer has an owner: the assignment matters
        *extra,
    ]


def elastic_job(tmp_path, hosts: list[str], plan: dict[int, list[str]], *extra: str):
    """horovodrun's elastic driver over ``hosts`` (one slot each); returns (process, metrics, summary)."""
    state = tmp_path / "discovery"
    state.mkdir()
    (state / "hosts").write_text("".join(f"{h}:1\n" for h in hosts))
    cmd = [
        os.path.join(BIN, "horovodrun"),
        "--gloo",
        "-np",
        str(len(hosts)),
        "--min-np",
        "1",
        "--max-np",
        str(len(hosts)),
        "--host-discovery-script",
        os.path.join(WORKERS, "elastic_hosts.sh"),
        "--network-interface",
        "lo",
        PYTHON,
        os.path.join(WORKERS, "elastic_train.py"),
        *elastic_args(str(tmp_path / "run"), *extra),
    ]
    e = env()
    e.update(
        KFAC_ELASTIC_DIR=str(state),
        KFAC_ELASTIC_PLAN=json.dumps({str(k): [f"{h}:1" for h in v] for k, v in plan.items()}),
    )
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, describe(proc)
    with open(tmp_path / "run" / "metrics.jsonl") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    with open(tmp_path / "run" / "summary.json") as fh:
        summary = json.load(fh)
    return proc, records, summary


def step_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r]


def elastic_events(records: list[dict]) -> list[tuple[int, str, int, int]]:
    return [
        (r["step"], r["elastic"]["event"], r["elastic"]["previous_world_size"], r["elastic"]["world_size"])
        for r in records
        if "elastic" in r
    ]


def steps_for(samples: int, world: int) -> int:
    return samples // (BATCH * world)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same elastic run on two hosts without any change of hosts."""
    return elastic_job(tmp_path_factory.mktemp("uninterrupted"), [HOST_A, HOST_B], {})


def assert_weights_agree(summary: dict) -> None:
    """Every rank's weight checksum (sum of w + w², fp64) equal to fp32 round-off: with owners, the ranks
    that receive an inverse in the allgather and its owner differ in the last bits (so also without
    train.elastic)."""
    checksums = summary["rank_weight_checksums"]
    assert len(checksums) == summary["world_size"], checksums
    assert max(checksums) - min(checksums) <= WEIGHT_RTOL * abs(checksums[0]), checksums


def check_common(records: list[dict], summary: dict, uninterrupted) -> None:
    # top-1 over all 1000 validation images is a whole number of thousandths; over another world
    # size's shards (667 of them on 2 of 3 ranks) it is not.
    top1 = [r["eval"]["val_top1"] for r in records if "eval" in r]
    assert top1 and all(abs(t * 1000 - round(t * 1000)) < 1e-6 for t in top1), top1
    steps = [r["step"] for r in step_records(records)]
    assert steps == list(range(1, summary["steps"] + 1)), "a step counted twice or missing"
    assert_weights_agree(summary)
    reference = uninterrupted[2]["final_top1"]
    print(
        f"top-1 {summary['final_top1']:.4f}, uninterrupted {reference:.4f}, events {elastic_events(records)}"
    )
    assert abs(summary["final_top1"] - reference) <= TOP1_TOLERANCE, (summary["final_top1"], reference)


def test_uninterrupted_elastic_run(uninterrupted):
    _, records, summary = uninterrupted
    assert elastic_events(records) == []
    assert summary["steps"] == EPOCHS * steps_for(TRAIN, 2)
    assert summary["world_size"] == 2
    assert_weights_agree(summary)


def test_host_leaves_and_joins_mid_epoch(tmp_path, uninterrupted):
    leave, join = 8, 20  # commits (multiples of COMMIT) in the first epoch
    proc, records, summary = elastic_job(
        tmp_path, [HOST_A, HOST_B], {leave: [HOST_A], join: [HOST_A, HOST_B]}
    )
    assert elastic_events(records) == [(leave, "hosts_updated", 2, 1), (join, "hosts_updated", 1, 2)]
    # The epoch continues from the committed position: its samples are dealt out once over the ranks
    # there are, so the first epoch has exactly the steps that take each of its samples once.
    rest = TRAIN - leave * BATCH * 2 - (join - leave) * BATCH
    first_epoch = join + steps_for(rest, 2)
    epochs = [r["step"] for r in records if "eval" in r]
    assert epochs == [first_epoch, first_epoch + steps_for(TRAIN, 2)], epochs
    # The records' epoch position follows the samples taken, whatever the world size.
    position = [r["epoch"] for r in step_records(records)]
    assert position == sorted(position) and position[leave - 1] < position[join - 1] < 1 < position[-1] <= 2
    check_common(records, summary, uninterrupted)
    # Rank 0's K-FAC traffic goes on across the resets: nothing travels while it is alone, and its
    # counters are its own, not started again, when the second rank is back.
    payload = [r["fisher"]["payload_bytes"] for r in step_records(records)]
    assert payload == sorted(payload) and payload[leave - 1] > 0
    assert len(set(payload[leave - 1 : join])) == 1 and payload[join] > payload[join - 1]


def third_local_host_problem() -> str | None:
    """Why the machine's name cannot serve as a third host that Horovod starts without ssh, or None."""
    import psutil

    if HOST_C in (HOST_A, HOST_B):
        return f"the machine's name {HOST_C!r} is one of the other two hosts"
    try:
        address = socket.gethostbyname(HOST_C)
    except OSError:
        return f"the machine's name {HOST_C!r} does not resolve"
    local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    return None if address in local else f"{HOST_C!r} resolves to {address}, not a local address"


def test_killed_worker_rolls_back_to_the_last_commit(tmp_path, uninterrupted):
    problem = third_local_host_problem()
    if problem:
        pytest.skip(f"three local hosts needed: {problem}")
    kill = 9  # after this step's update; the last commit was at step 8
    # A rank not connected to the killed one learns of it when Gloo's timeout ends its wait.
    proc, records, summary = elastic_job(
        tmp_path,
        [HOST_A, HOST_B, HOST_C],
        {},
        f"debug.kill_step={kill}",
        "debug.fault_rank=2",
        "horovod.gloo_timeout_s=10",
    )
    events = elastic_events(records)
    assert events == [(kill // COMMIT * COMMIT, "peer_lost", 3, 2)], events
    assert "sends itself SIGKILL after step 9" in proc.stderr
    check_common(records, summary, uninterrupted)
    assert summary["world_size"] == 2


# --------------------------------------------------------------------------------------------------
# Refused where it cannot work: one line, exit code 2, before Horovod starts
# --------------------------------------------------------------------------------------------------
def refusal(*overrides: str, launcher_env: dict | None = None) -> str:
    cfg = load_config(DEMO, ["train.elastic=true", *overrides])
    saved = dict(os.environ)
    os.environ.update(launcher_env or {})
    try:
        with pytest.raises(Exception) as info:
            check_elastic(cfg)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return str(info.value)


def test_elastic_refuses_a_fixed_world_size():
    assert "train.world_size: is 2 but train.elastic is true" in refusal("train.world_size=2")


def test_elastic_refuses_mpi_and_a_launch_without_the_elastic_driver():
    free = ["train.world_size=null"]
    assert "MPI (mpirun" in refusal(*free, launcher_env={"OMPI_COMM_WORLD_SIZE": "2"})
    assert "MPI (mpirun" in refusal(*free, "horovod.init=mpi4py")
    assert "not started by horovodrun's elastic driver" in refusal(*free)
    assert "checkpoint.every_steps" in refusal(*free, "checkpoint.every_steps=5")


def test_elastic_under_plain_horovodrun_stops_every_rank_with_one_line(tmp_path):
    cmd = [os.path.join(BIN, "horovodrun"), "-np", "2", "--gloo", "-H", "localhost:2"]
    proc = run(cmd + launch_cmd(elastic_args(str(tmp_path / "run"))), timeout=120)
    assert proc.returncode != 0, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if "train.elastic" in line]
    assert len(lines) == 2 and all("not started by horovodrun's elastic driver" in line for line in lines)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_elastic_sampler_reshards_without_repeating_or_skipping(monkeypatch):
    """The loop's use of Horovod's ElasticSampler (one record_batch per step, the committed state loaded
    at a reset) takes each sample of an epoch once while the world goes 2 -> 1 -> 3 ranks."""
    import horovod.torch.elastic.sampler as sampler_mod

    world = {"rank": 0, "size": 2}
    monkeypatch.setattr(sampler_mod, "rank", lambda: world["rank"])
    monkeypatch.setattr(sampler_mod, "size", lambda: world["size"])
    dataset, batch = list(range(103)), 4

    def sampler_for(rank: int, size: int, committed):
        world.update(rank=rank, size=size)
        s = sampler_mod.ElasticSampler(dataset, shuffle=True, seed=7)
        s.set_epoch(3)
        if committed is not None:
            s.load_state_dict(committed)
        return s

    taken, committed = [], None
    for size, steps in ((2, 3), (1, 5), (3, 100)):
        samplers = [sampler_for(r, size, committed) for r in range(size)]
        iters = [iter(s) for s in samplers]
        for _ in range(min(steps, len(samplers[0]) // batch)):
            for s, it in zip(samplers, iters):
                taken += [next(it) for _ in range(batch)]
                s.record_batch(0, batch)
        committed = samplers[0].state_dict()
        assert all(s.state_dict() == committed for s in samplers)
    # The last round pads the epoch's rest to a multiple of the ranks: fewer repeats than ranks, there only.
    distinct = list(dict.fromkeys(taken))
    assert len(taken) - len(distinct) < 3 and taken[: -3 * batch] == distinct[: len(taken) - 3 * batch]
    assert len(dataset) - len(distinct) < 3 * batch, "more samples left out than one round of batches"
    order = list(range(103))
    random.Random(7 + 3).shuffle(order)
    assert sorted(distinct) == sorted(order[: len(distinct)]), "not the epoch's permutation, in order"
