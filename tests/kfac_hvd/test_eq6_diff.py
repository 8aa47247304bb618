"""The paper's Eq. (6), Diff(X, X_pre) = ‖X − X_pre‖_F / ‖X_pre‖_F, and the noise-aware Diff of
docs/NOISE.md: the values a step record reports, against factors computed in the test from the layers'
inputs and output gradients (tests/helpers/direct_factors.py), for a Linear layer, a 3×3 Conv2d with bias and
BatchNorm's F; on one rank, on two in-process ranks that saw the same batch (so factors travel, as
triangles or whole), and on two real ranks under horovodrun (Gloo) and torchrun with different batches."""

import json

import pytest
import torch

import kfac_hvd
from tests.helpers.direct_factors import (
    diff,
    direct_factors,
    forward_backward,
    make_model,
    noise_aware_diff,
    split_half_noise,
    step_inputs,
)
from tests.helpers.mirror_comm import MirrorCommunicator
from tests.helpers.multiproc import ENGINES, run

KEYS = (("conv", "A"), ("conv", "G"), ("bn", "F"), ("fc", "A"), ("fc", "G"))
WORKER = "tests/helpers/workers/diff_worker.py"
# fp64 factors; the library sums triangles and chunks in another order than the test.
TOLERANCE = dict(rel=1e-9, abs=1e-12)


def two_steps(kfac_options: dict, batch: int, comm=None):
    """Two K-FAC steps at fixed weights on different inputs; the records and the direct factors and
    noise estimates of each step."""
    model = make_model()
    kfac = kfac_hvd.KFAC(model, comm=comm, **kfac_options)
    records, factors, noises = [], [], []
    for step in (1, 2):
        seen = forward_backward(model, *step_inputs(step, batch, seed=0))
        factors.append(direct_factors(model, seen))
        noises.append(split_half_noise(model, seen))
        records.append(kfac.step())
    return records, factors, noises


def reported(record: dict, key, prefix: str = "diff_"):
    name, kind = key
    return record["layers"][name][f"{prefix}{kind}"]


@pytest.mark.parametrize(
    "comm,symmetric",
    [(None, True), (MirrorCommunicator(), True), (MirrorCommunicator(), False)],
    ids=["one-rank", "two-ranks-triangles", "two-ranks-full"],
)
def test_step_record_diff_is_eq6_of_directly_computed_factors(comm, symmetric):
    records, (first, second), _ = two_steps(dict(symmetric_comm=symmetric), batch=8, comm=comm)
    for key in KEYS:
        assert reported(records[0], key) is None  # no X_pre on the first update
        expected = diff(second[key], first[key])
        assert expected > 0.05  # the inputs really changed
        assert reported(records[1], key) == pytest.approx(expected, **TOLERANCE), key


@pytest.mark.parametrize(
    "comm,symmetric",
    [(None, True), (MirrorCommunicator(), True), (MirrorCommunicator(), False)],
    ids=["one-rank", "two-ranks-triangles", "two-ranks-full"],
)
def test_noise_aware_diff_is_the_formula_of_docs_noise(comm, symmetric):
    """An odd batch (halves of 4 and 5 samples) checks the n₁n₂/n² weight. V is this step's estimate,
    V_pre the first step's; over P ranks the reported noise is (1/P²)·Σ_r v_r — here both ranks hold
    the same v, so V = v/2."""
    ranks = 1 if comm is None else comm.size
    records, (first, second), (noise_first, noise_second) = two_steps(
        dict(symmetric_comm=symmetric, noise_aware_diff=True), batch=9, comm=comm
    )
    for key in KEYS:
        previous_noise, noise = noise_first[key] / ranks, noise_second[key] / ranks
        raw = diff(second[key], first[key])
        expected = noise_aware_diff(second[key], first[key], noise, previous_noise)
        assert 0 < expected < raw - 1e-3, key  # the noise terms matter, and are not clamped
        assert reported(records[1], key, "raw_diff_") == pytest.approx(raw, **TOLERANCE), key
        assert reported(records[1], key) == pytest.approx(expected, **TOLERANCE), key


@pytest.mark.parametrize("launcher", ["horovodrun-gloo", "torchrun"])
def test_two_real_ranks_diff_is_eq6_of_the_averaged_factors(launcher, tmp_path):
    """Under horovodrun --gloo (Horovod) and torchrun (torch.distributed) each rank draws its own
    batches; the reported Diffs are Eq. (6) of the mean of the two ranks' directly computed factors, and
    the noise-aware Diff uses V = (v₀ + v₁)/4, on triangles and on whole matrices."""
    run(launcher, [WORKER, "--out", str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    def averaged(step: int, what: str):
        return {
            key: sum(
                torch.tensor(rank[what][step][f"{key[0]}.{key[1]}"], dtype=torch.float64) for rank in ranks
            )
            / len(ranks)
            for key in KEYS
        }

    first, second = averaged(0, "factors"), averaged(1, "factors")
    noise_first, noise_second = averaged(0, "noise"), averaged(1, "noise")
    for rank in ranks:
        assert rank["size"] == 2
        assert rank["engine"] == ENGINES[launcher]
        assert set(rank["runs"]) == {"symmetric", "full", "symmetric-noise", "full-noise"}
        for run_name, records in rank["runs"].items():
            for key in KEYS:
                assert reported(records[0], key) is None
                if run_name.endswith("noise"):
                    previous_noise, noise = float(noise_first[key]) / 2, float(noise_second[key]) / 2
                    expected = noise_aware_diff(second[key], first[key], noise, previous_noise)
                    assert 0 < expected < diff(second[key], first[key]) - 1e-3, key
                else:
                    expected = diff(second[key], first[key])
                assert reported(records[1], key) == pytest.approx(expected, **TOLERANCE), (run_name, key)
    # The two ranks' own factors differ, so the check above is one of the averaged factors.
    local = [torch.tensor(rank["factors"][1]["fc.A"], dtype=torch.float64) for rank in ranks]
    assert diff(local[0], local[1]) > 0.05
