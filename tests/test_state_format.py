"""KFAC.state_dict's format: checkpoints written before the format had a version still load and
continue identically; a state from a newer format is refused."""

import os
import sys

import pytest
import torch

import kfac_hvd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
from make_kfac_states import CASES, SAVED_AFTER, run_step, tiny_model

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


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
