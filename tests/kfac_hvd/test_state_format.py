"""KFAC.state_dict's format: checkpoints written before the format had a version still load and
continue identically; a state from a newer format is refused."""

import os

import pytest
import torch

import kfac_hvd
from kfac_hvd.state import FORMAT_VERSION
from tests.fixtures import make_kfac_states
from tests.fixtures.make_kfac_states import CASES, SAVED_AFTER, run_step, tiny_model

FIXTURES = os.path.dirname(os.path.abspath(make_kfac_states.__file__))


def resume(saved: dict):
    model = tiny_model()
    model.load_state_dict(saved["model"])
    kfac = kfac_hvd.KFAC(model, **saved["options"])
    kfac.load_state_dict(saved["kfac"])
    return model, kfac


@pytest.mark.parametrize("filename", sorted(CASES))
def test_an_unversioned_checkpoint_loads_and_continues_identically(filename):
    saved = torch.load(os.path.join(FIXTURES, filename))
    assert "format_version" not in saved["kfac"]
    model, kfac = resume(saved)
    assert kfac.steps == SAVED_AFTER
    for offset, expected in enumerate(saved["continued"], start=1):
        got = run_step(model, kfac, SAVED_AFTER + offset)
        assert got["intervals"] == expected["intervals"]
        for name, gradient in expected["gradients"].items():
            torch.testing.assert_close(got["gradients"][name], gradient, rtol=1e-10, atol=1e-13, msg=name)


def test_a_resaved_checkpoint_has_the_current_version_and_continues_identically():
    saved = torch.load(os.path.join(FIXTURES, "kfac_state_unversioned_decay.pt"))
    _, first = resume(saved)
    resaved = first.state_dict()
    assert resaved["format_version"] == FORMAT_VERSION
    model, kfac = resume({**saved, "kfac": resaved})
    expected = saved["continued"][-1]
    for offset in range(1, len(saved["continued"]) + 1):
        got = run_step(model, kfac, SAVED_AFTER + offset)
    assert got["intervals"] == expected["intervals"]
    for name, gradient in expected["gradients"].items():
        torch.testing.assert_close(got["gradients"][name], gradient, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, "1", -1])
def test_a_state_of_an_unknown_version_is_refused_before_anything_changes(version):
    saved = torch.load(os.path.join(FIXTURES, "kfac_state_unversioned_plain.pt"))
    _, kfac = resume(saved)
    state = {**kfac.state_dict(), "format_version": version, "steps": 99}
    with pytest.raises(ValueError, match=rf"^K-FAC state has format version {version!r}; .* versions 0 to 1"):
        kfac.load_state_dict(state)
    assert kfac.steps == SAVED_AFTER
