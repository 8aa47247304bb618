"""The per-layer cost rule as the runtime counts it (step records, comm_stats), the runtime's independence
from the models of kfac_hvd.analysis, and the one byte formatter.

Expected bytes are counted here from the layers' widths, not through kfac_hvd.cost."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import kfac_hvd
from kfac_hvd.analysis.units import format_bytes
from tests.helpers.common import REPO
from tests.helpers.mirror_comm import MirrorCommunicator


def tri(n):
    return n * (n + 1) // 2


@pytest.mark.parametrize("symmetric", [True, False])
def test_runtime_counts_two_messages_for_a_travelling_layer_one_for_a_local_one(symmetric):
    """Two ranks (mirrored), every layer due at step 1: Linear(300, 8) (A 301 wide > 256) travels, so its
    factors are allreduced and its inverses allgathered; Linear(8, 3) (A 9, G 3) is inverted on every
    rank, so only its factors are allreduced. fp32: 4 bytes a value."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 8), nn.ReLU(), nn.Linear(8, 3))
    kfac = kfac_hvd.KFAC(model, comm=MirrorCommunicator(), symmetric_comm=symmetric)
    model(torch.randn(6, 300)).sum().backward()
    record = kfac.step()
    size = tri if symmetric else (lambda n: n * n)
    travelling, local = 4 * (size(301) + size(8)), 4 * (size(9) + size(3))
    assert record["layers"]["0"]["payload_bytes"] == 2 * travelling
    assert record["layers"]["2"]["payload_bytes"] == local
    stats = kfac.comm_stats()
    assert stats["payload_bytes"] == stats["every_step_payload_bytes"] == 2 * travelling + local
    assert stats["per_layer"]["0"]["A_inv"]["payload_bytes"] == 4 * size(301)
    assert "A_inv" not in stats["per_layer"]["2"]
    assert stats["every_step_wire_bytes"] == pytest.approx(
        2 * (1 / 2) * (travelling + local) + (1 / 2) * travelling, rel=1e-15
    )


def test_the_runtime_never_loads_the_models():
    """A fresh interpreter: importing kfac_hvd, building KFAC and taking a step loads no module of
    kfac_hvd.analysis (nor the command's old name, nor the launcher)."""
    code = (
        "import sys, torch, kfac_hvd\n"
        "model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),"
        " torch.nn.Linear(64, 2))\n"
        "kfac = kfac_hvd.KFAC(model)\n"
        "model(torch.randn(2, 3, 6, 6)).sum().backward()\n"
        "kfac.step(); kfac.comm_stats()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('kfac_hvd.analysis', "
        "'launch'))))\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "value, kwargs, text",
    [
        (None, {}, "-"),
        (428, {}, "428 B"),
        (1_000, {}, "1.00 kB"),
        (856.58e9, {}, "856.58 GB"),
        (1.7205e12, {}, "1.72 TB"),
        (916.0e6, {"digits": 1}, "916.0 MB"),
        (2.58e12, {"digits": 1}, "2.6 TB"),
        (357.14e6, {"digits": 1, "unit": "MB"}, "357.1 MB"),
        (1.5e9, {"digits": 1, "unit": "MB"}, "1500.0 MB"),
    ],
)
def test_format_bytes(value, kwargs, text):
    assert format_bytes(value, **kwargs) == text
