"""--dry-run of every paper config: 107 K-FAC layers, 128 ranks, mini-batch 16,384, no data needed."""

import json
import os
from fractions import Fraction

import pytest
import torch
from torch import nn

from launch.train import main
from tests.helpers.common import CONFIGS, PAPER_CONFIGS, describe, launch_cmd, run


def resnet50_every_step_wire(ranks: int, steps: int, max_dim: int = 256) -> Fraction:
    """Exact per-rank wire bytes of every-step K-FAC for ResNet-50, from torchvision's modules: every factor
    allreduced as upper triangles (n(n+1)/2 values, 3 per BatchNorm channel, 4 bytes each; ring
    2(P-1)/P), the inverses of Kronecker layers wider than ``max_dim`` allgathered (ring (P-1)/P)."""
    from torchvision.models import resnet50

    with torch.device("meta"):
        model = resnet50()
    tri = lambda n: n * (n + 1) // 2  # noqa: E731
    factors = inverses = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            a = m.weight[0].numel() + (m.bias is not None)
            g = m.weight.shape[0]
            factors += 4 * (tri(a) + tri(g))
            inverses += 4 * (tri(a) + tri(g)) if max(a, g) > max_dim else 0
        elif isinstance(m, nn.BatchNorm2d):
            factors += 4 * 3 * m.num_features
    return steps * (Fraction(2 * (ranks - 1), ranks) * factors + Fraction(ranks - 1, ranks) * inverses)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_dry_run(name, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    rc = main(["--config", os.path.join(CONFIGS, name), "--dry-run", "--plan-json", str(plan_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    plan = json.loads(plan_path.read_text())
    assert plan["world_size"] == 128 and plan["global_batch"] == 16384 and plan["batch_per_rank"] == 128
    assert plan["epochs"] == 36
    # 1,281,167 images / 16,384 per step: 78 full steps per epoch; the paper's t_max = 2,814.
    assert plan["steps_per_epoch"] == 78 and plan["steps"] == 78 * 36
    assert abs(plan["steps_continuous"] - 2814) < 2
    assert "ranks                  128" in out and "16384 global" in out
    # Missing ImageNet folders are a warning, not an error.
    assert "warning" in err and "data.train_dir" in err
    if plan["method"] == "sgd":
        assert "kfac" not in plan
        return
    k = plan["kfac"]
    assert k["layers"] == 107 and "K-FAC layers           107" in out
    assert k["layer_kinds"] == {"conv": 53, "batchnorm": 53, "linear": 1}
    # 53 BatchNorm + 9 Kronecker layers with both factors <= 256 wide are inverted on every rank; the
    # other 45 are partitioned: at 128 ranks, one layer per rank at most.
    assert k["locally_inverted_layers"] == 62 and k["assigned_layers"] == 45
    assert "inverted on every rank 62 layers" in out
    load = k["inversion_load_per_rank"]
    assert len(load) == 128 and sum(k["layers_per_rank"]) == 45 and max(k["layers_per_rank"]) == 1
    assert k["ranks_without_layers"] == 128 - 45
    assert max(load) == 4608**3 + 512**3  # layer4's 3x3 convs: A 512*9 wide, G 512
    assert k["imbalance"] == pytest.approx(max(load) / (sum(load) / 128))
    # Every-step traffic per rank over the run (2,808 steps): exact, to the byte.
    wire = k["every_step_traffic"]["wire_bytes_per_rank"]
    assert abs(wire - resnet50_every_step_wire(128, plan["steps"])) < 1
    assert "factor allreduce + one inverse allgather" in out


def test_dry_run_world_size_override_and_cli_process(tmp_path):
    """As a separate process: world size from the config, no launcher, no Horovod initialisation."""
    plan_path = tmp_path / "plan.json"
    proc = run(
        launch_cmd(
            [
                "--config",
                os.path.join(CONFIGS, PAPER_CONFIGS[2]),
                "train.world_size=256",
                "data.batch_size=64",
                "--dry-run",
                "--plan-json",
                str(plan_path),
            ]
        ),
        timeout=180,
    )
    assert proc.returncode == 0, describe(proc)
    plan = json.loads(plan_path.read_text())
    assert plan["world_size"] == 256 and plan["global_batch"] == 16384
    assert plan["kfac"]["ranks_without_layers"] == 256 - 45
    assert (
        abs(
            plan["kfac"]["every_step_traffic"]["wire_bytes_per_rank"]
            - resnet50_every_step_wire(256, plan["steps"])
        )
        < 1
    )
    assert "adaptive, lambda = 0.25" in proc.stdout
