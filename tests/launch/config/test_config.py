"""Config loading, base: inheritance, dotted overrides and validation (one line, exit code 2)."""

import glob
import os
import textwrap

import pytest
import torch
import yaml
from pydantic import ValidationError

from launch.config.load import load_config, resolve_paths
from launch.errors import ConfigError
from tests.helpers.common import CONFIGS, launch_cmd, run


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(textwrap.dedent(text))
    return str(path)


@pytest.fixture
def chain(tmp_path):
    write(
        tmp_path / "common" / "base.yaml",
        """
        model: {name: small_resnet, num_classes: 10}
        data: {dataset: synthetic, batch_size: 8}
        optim: {lr: 0.5, milestones: [3, 6]}
        kfac: {damping: 0.01, update_threshold: 0.3}
        """,
    )
    child = write(
        tmp_path / "exp" / "child.yaml",
        """
        base: ../common/base.yaml
        kfac:
          update_threshold: 0.25
        train:
          epochs: 2
        """,
    )
    return tmp_path, child


def test_base_is_relative_to_the_file_and_child_wins(chain):
    tmp, child = chain
    cfg = load_config(child)
    assert cfg.kfac.update_threshold == 0.25  # child
    assert cfg.kfac.damping == 0.01  # base
    assert cfg.optim.lr == 0.5 and cfg.optim.milestones == [3.0, 6.0]
    assert cfg.train.epochs == 2
    assert cfg.optim.momentum == 0.9  # schema default
    assert cfg.source("kfac.damping").endswith(os.path.join("common", "base.yaml"))
    assert cfg.source("kfac.update_threshold") == child


def test_overrides_are_parsed_as_yaml_and_applied_last(chain):
    _, child = chain
    cfg = load_config(
        child,
        [
            "kfac.update_threshold=null",
            "optim.milestones=[10, 20]",
            "kfac.damping=2.5e-4",
            "log.tensorboard=false",
            "kfac.skip_layers=fc",
        ],
    )
    assert cfg.kfac.update_threshold is None
    assert cfg.optim.milestones == [10.0, 20.0]
    assert cfg.kfac.damping == pytest.approx(2.5e-4)
    assert cfg.log.tensorboard is False
    assert cfg.kfac.skip_layers == ["fc"]
    assert "command line" in cfg.source("kfac.damping")


def test_resolved_config_round_trips(chain, tmp_path):
    _, child = chain
    cfg = load_config(child, ["train.seed=7"])
    resolve_paths(cfg)
    dumped = write(tmp_path / "resolved.yaml", cfg.dump())
    again = load_config(dumped)
    assert again.to_dict() == cfg.to_dict()
    assert cfg.log.dir == os.path.join("runs", "child")
    assert cfg.checkpoint.dir == os.path.join("runs", "child", "checkpoints")


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("kfac: {damping: -1.0}", "kfac.damping", "> 0"),
        ("kfac: {damping: 0}", "kfac.damping", "> 0"),
        ("kfac: {update_threshold: 0.0}", "kfac.update_threshold", "> 0"),
        ("kfac: {update_threshold: -0.25}", "kfac.update_threshold", "> 0"),
        ("kfac: {dampnig: 0.1}", "kfac.dampnig", "did you mean 'kfac.damping'"),
        ("train: {epochs: 1.5}", "train.epochs", "integer"),
        ("train: {epochs: '3'}", "train.epochs", "integer"),
        ("data: {dataset: synthetic, batch_size: 0}", "data.batch_size", ">= 1"),
        ("optim: {method: adam}", "optim.method", "one of kfac, sgd"),
        ("optim: {momentum: 1.0}", "optim.momentum", "[0, 1)"),
        ("kfac: {interval_policy: sometimes}", "kfac.interval_policy", "modulo, since_last"),
        ("log: {tensorboard: 'yes'}", "log.tensorboard", "true or false"),
        (
            "optim: {schedule: poly, poly_start_epoch: 5, poly_end_epoch: 2}",
            "optim.poly_end_epoch",
            "> optim",
        ),
        ("wrong_section: {a: 1}", "wrong_section", "unknown section"),
        ("kfac: {skip_layers: ['layer4.(']}", "kfac.skip_layers", "regular expression"),
        ("train: {epochs: 2}\ntrain: {seed: 1}", "line 4", "duplicate key 'train'"),
        ("kfac: {damping: 0.1, damping: 0.2}", "line 3", "duplicate key 'damping'"),
        ("kfac: {update_interval: 0}", "kfac.update_interval", ">= 1"),
        ("kfac: {interval_warmup_epochs: -1}", "kfac.interval_warmup_epochs", ">= 0"),
        (
            "kfac: {update_threshold: 0.25, interval_warmup_epochs: 1}",
            "kfac.interval_warmup_epochs",
            "fixed interval only",
        ),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, text, key, words):
    body = text + "\n"
    if not text.startswith("data:"):
        body = "data: {dataset: synthetic}\n" + body
    path = write(tmp_path / "bad.yaml", "model: {name: small_resnet, num_classes: 10}\n" + body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert path in msg and key in msg and words in msg, msg


def test_val_resize_must_cover_the_crop(tmp_path):
    path = write(
        tmp_path / "v.yaml",
        "model: {name: small_resnet}\ndata: {dataset: synthetic, image_size: 64, val_resize: 32}\n",
    )
    with pytest.raises(ConfigError, match="data.val_resize: must be >= data.image_size"):
        load_config(path)


def test_error_in_base_file_names_the_base(tmp_path):
    base = write(tmp_path / "base.yaml", "kfac: {damping: -3}\n")
    child = write(
        tmp_path / "child.yaml", "base: base.yaml\ndata: {dataset: synthetic}\nmodel: {name: small_resnet}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(child)
    assert base in str(info.value) and "kfac.damping" in str(info.value)


def test_circular_base_is_an_error(tmp_path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(a)


def test_imagenet_needs_data_dirs_and_fashion_needs_small_model(tmp_path):
    path = write(tmp_path / "c.yaml", "data: {dataset: imagenet}\n")
    with pytest.raises(ConfigError, match="data.train_dir"):
        load_config(path)
    path = write(tmp_path / "d.yaml", "data: {dataset: fashion_mnist}\nmodel: {num_classes: 10}\n")
    with pytest.raises(ConfigError, match="model.name"):
        load_config(path)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)))
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.train.epochs >= 1


def test_paper_configs_share_everything_but_the_threshold():
    base = load_config(os.path.join(CONFIGS, "imagenet", "resnet50_kfac_bs16k_baseline.yaml")).to_dict()
    assert base["kfac"]["update_threshold"] is None
    assert base["data"]["batch_size"] * base["train"]["world_size"] == 16384
    assert base["train"]["epochs"] == 36 and base["kfac"]["damping"] == pytest.approx(2.5e-4)
    for lam in (0.2, 0.25, 0.3):
        cfg = load_config(
            os.path.join(CONFIGS, "imagenet", f"resnet50_kfac_bs16k_lambda{lam}.yaml")
        ).to_dict()
        assert cfg["kfac"]["update_threshold"] == lam
        cfg["kfac"]["update_threshold"] = None
        assert cfg == base


# ---- the command line: exit code 2, one line, no traceback, before anything heavy ----------------
def cli(tmp_path, body, *overrides):
    path = write(tmp_path / "exp.yaml", body)
    proc = run(launch_cmd(["--config", path, *overrides]), timeout=120)
    return path, proc


@pytest.mark.parametrize(
    "body, overrides, key",
    [
        (
            "kfac: {update_threshold: -1}\ndata: {dataset: synthetic}\nmodel: {name: small_resnet}\n",
            [],
            "kfac.update_threshold",
        ),
        ("data: {dataset: synthetic}\nmodel: {name: small_resnet}\n", ["kfac.damping=0"], "kfac.damping"),
        (
            "data: {dataset: synthetic}\nmodel: {name: small_resnet}\n",
            ["kfac.no_such_key=1"],
            "kfac.no_such_key",
        ),
        ("data: {dataset: synthetic, batch_size: [1]}\nmodel: {name: small_resnet}\n", [], "data.batch_size"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(tmp_path, body, overrides, key):
    path, proc = cli(tmp_path, body, *overrides)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert path in lines[0] and key in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_missing_data_dir_is_an_error_in_a_run_and_a_warning_in_a_dry_run(tmp_path):
    body = (
        "data: {dataset: imagenet, train_dir: %s, val_dir: %s}\nmodel: {name: small_resnet}\n"
        "train: {world_size: 4}\n" % (tmp_path / "nope" / "train", tmp_path / "empty")
    )
    os.makedirs(tmp_path / "empty")
    path, proc = cli(tmp_path, body)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "data.train_dir" in proc.stderr
    assert "directory not found" in proc.stderr

    # Present but empty val dir: also a config error (train dir made valid first).
    os.makedirs(tmp_path / "nope" / "train" / "class_a")
    open(tmp_path / "nope" / "train" / "class_a" / "x.png", "w").close()
    path, proc = cli(tmp_path, body)
    assert proc.returncode == 2 and "data.val_dir" in proc.stderr and "empty" in proc.stderr

    path, proc = cli(tmp_path, body, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "warning" in proc.stderr and "data.val_dir" in proc.stderr
    assert "ranks                  4" in proc.stdout


def test_cli_invalid_yaml_and_missing_file(tmp_path):
    path, proc = cli(tmp_path, "kfac: {damping: [1, 2\n")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "invalid YAML" in proc.stderr and path in proc.stderr
    proc = run(launch_cmd(["--config", str(tmp_path / "missing.yaml")]), timeout=60)
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_print_config_applies_overrides(tmp_path):
    path, proc = cli(
        tmp_path,
        "data: {dataset: synthetic}\nmodel: {name: small_resnet}\n",
        "kfac.update_threshold=0.3",
        "--print-config",
    )
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["kfac"]["update_threshold"] == 0.3
    assert resolved["log"]["dir"] == os.path.join("runs", "exp")


def test_docs_list_every_key(tmp_path):
    """docs/LAUNCHER.md's key reference is generated from the schema; it must not fall behind."""
    from launch.config.load import update_key_reference
    from launch.config.schema import SCHEMA, keys_markdown

    path = os.path.join(os.path.dirname(CONFIGS), "docs", "LAUNCHER.md")
    doc = open(path).read()
    for section, fields in SCHEMA.items():
        for key in fields:
            assert f"`{section}.{key}`" in doc, f"{section}.{key} missing from docs/LAUNCHER.md"
    assert keys_markdown() in doc
    copy = write(tmp_path / "LAUNCHER.md", doc.replace("| `optim.lr` | float > 0 |", "| `optim.lr` | old |"))
    update_key_reference(copy)
    assert open(copy).read() == doc  # the generator rewrites only its part, and to what is there


# ---- the kfac section: generated from kfac_hvd.KFACOptions ---------------------------------------
def test_kfac_section_is_every_library_option_with_its_defaults(tmp_path):
    import kfac_hvd
    from launch.config.kfac_section import KEYS, NOT_OFFERED

    offered = {key.option for key in KEYS.values()}
    assert offered == {f.name for f in kfac_hvd.option_fields()} - set(NOT_OFFERED)
    path = write(tmp_path / "d.yaml", "model: {name: small_resnet}\ndata: {dataset: synthetic}\n")
    assert load_config(path).kfac.options() == kfac_hvd.KFACOptions()  # defaults survive the spellings
    options = load_config(
        path, ["kfac.factor_dtype=float64", "kfac.skip_layers=[fc, conv1]", "kfac.unfold_chunk_mb=0.5"]
    ).kfac.options()
    assert options.factor_dtype is torch.float64 and options.skip_layers == ("fc", "conv1")
    assert options.unfold_chunk_bytes == 2**19
    warmup = load_config(path, ["kfac.interval_warmup_epochs=1.5", "kfac.update_interval=5"]).kfac
    # The epochs in steps of the run (at least one): the library's own warm-up, then its fixed interval.
    assert warmup.options(steps_per_epoch=8) == kfac_hvd.KFACOptions(
        update_interval=5, interval_warmup_steps=12
    )
    assert warmup.options(steps_per_epoch=1) == kfac_hvd.KFACOptions(
        update_interval=5, interval_warmup_steps=2
    )


def test_a_new_library_option_becomes_a_key_without_launcher_code(monkeypatch):
    import kfac_hvd
    import launch.config.kfac_section as section
    from kfac_hvd.options import OptionField

    new = OptionField(
        "inverse_dtype",
        torch.dtype,
        None,
        "dtype of the inverses; None: the factors'",
        True,
        choices=(torch.float32, torch.float64),
    )
    monkeypatch.setattr(section, "option_fields", lambda: (*kfac_hvd.option_fields(), new))
    model, keys = section._generate()
    assert keys["inverse_dtype"].to_option("float64") is torch.float64
    assert model(inverse_dtype="float32").inverse_dtype == "float32"
    with pytest.raises(ValidationError):
        model(inverse_dtype="int8")
    assert model.model_fields["inverse_dtype"].description == "dtype of the inverses; null: the factors'"


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("kfac.shrink_multiple=1", "kfac.shrink_multiple", "must be > 1, got 1"),
        ("kfac.factor_decay=1.0", "kfac.factor_decay", "must be in [0, 1), got 1.0"),
        ("kfac.factor_dtype=float16", "kfac.factor_dtype", "must be one of float32, float64; got 'float16'"),
        ("kfac.unfold_chunk_mb=0", "kfac.unfold_chunk_mb", "must be > 0, got 0"),
        ("kfac.accumulation_steps=2", "kfac.accumulation_steps", "unknown key"),
        ("kfac.pi_damping=1", "kfac.pi_damping", "must be true or false, got 1"),
        ("model.blocks=[1, 0]", "model.blocks", "must be >= 1, got 0"),
        ("model.blocks=[1, x]", "model.blocks", "must be a list of integers, got [1, 'x']"),
        ("optim.lr=.inf", "optim.lr", "must be a finite number, got inf"),
        ("train.watchdog_s=[1]", "train.watchdog_s", "must be a number or null, got [1]"),
        ("data.fashion_mnist_pool=3", "data.fashion_mnist_pool", "must be one of 1, 2, 4; got 3"),
        (
            "checkpoint.allow_changes=[optim.lrr]",
            "checkpoint.allow_changes",
            "unknown key 'optim.lrr' (expected section.key, e.g. optim.lr)",
        ),
    ],
)
def test_bad_overrides_say_what_the_key_accepts(tmp_path, override, key, words):
    path = write(tmp_path / "d.yaml", "model: {name: small_resnet}\ndata: {dataset: synthetic}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert str(info.value) == f"config error: {path} (command line): {key}: {words}"


def test_a_resolved_config_stays_valid_when_changed(tmp_path):
    path = write(tmp_path / "d.yaml", "model: {name: small_resnet}\ndata: {dataset: synthetic}\n")
    cfg = load_config(path)
    cfg.train.epochs = 3
    with pytest.raises(ValidationError):
        cfg.train.epochs = "3"
    assert cfg.to_dict()["train"]["epochs"] == 3 and cfg.debug["fault_rank"] == 0


def test_the_keys_that_may_change_on_resume_exist():
    from launch.config.schema import RESUME_MAY_CHANGE, SCHEMA, may_change_on_resume

    for entry in RESUME_MAY_CHANGE:
        section, _, key = entry.partition(".")
        assert section in SCHEMA and (key == "*" or key in SCHEMA[section]), entry
    assert may_change_on_resume("log.dir") and may_change_on_resume("train.epochs")
    assert not may_change_on_resume("optim.lr") and not may_change_on_resume("kfac.damping")
