"""--dry-run of every paper config: 107 K-FAC layers, 128 ranks, mini-batch 16,384, no data needed."""
import json
import os

import pytest

from launch.train import main
from launch_helpers.common import CONFIGS, PAPER_CONFIGS, describe, launch_cmd, run


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
    load = k["inversion_load_per_rank"]
    assert len(load) == 128 and sum(k["layers_per_rank"]) == 107
    assert k["ranks_without_layers"] == 128 - 107 + sum(1 for n in k["layers_per_rank"] if n > 1)
    assert k["imbalance"] == pytest.approx(max(load) / (sum(load) / 128))
    wire = k["every_step_traffic"]["wire_bytes_per_rank"]
    # Every-step traffic per rank over the run: the paper's order of magnitude (3.0 TB).
    assert 1e12 < wire < 5e12


def test_dry_run_world_size_override_and_cli_process(tmp_path):
    """As a separate process: world size from the config, no launcher, no Horovod initialisation."""
    plan_path = tmp_path / "plan.json"
    proc = run(launch_cmd(["--config", os.path.join(CONFIGS, PAPER_CONFIGS[2]), "train.world_size=256",
                           "data.batch_size=64", "--dry-run", "--plan-json", str(plan_path)]), timeout=180)
    assert proc.returncode == 0, describe(proc)
    plan = json.loads(plan_path.read_text())
    assert plan["world_size"] == 256 and plan["global_batch"] == 16384
    assert plan["kfac"]["ranks_without_layers"] == 256 - 107
    assert "adaptive, lambda = 0.25" in proc.stdout
