"""Every user error in a config, on the command line or in the inputs: exit code 2, one line naming the
file and the key or path, no traceback, before any collective, and the same verdict on every rank."""

import os
import shutil

import pytest
import torch

from tests.helpers.common import FASHION, horovod_ready
from tests.helpers.jobs import DEMO, job, per_rank_shell, shell_train, tiny, train_cmd

needs_horovod = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")
SMALL = "model: {name: small_resnet, num_classes: 10, width: 4}\n"
SYNTH = (
    "data: {dataset: synthetic, synthetic_size: 32, synthetic_val_size: 16, image_size: 28, val_resize: 28, "
    "workers: 0}\n"
)


def write(path, text, mode="w"):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, mode) as fh:
        fh.write(text)
    return str(path)


def one_line_exit_2(proc, *words, started=False):
    """Exit code 2, exactly one line on stderr holding every word, no traceback; nothing on stdout
    unless the run had ``started`` (a checkpoint is read after Horovod started)."""
    assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    assert "Traceback" not in proc.stderr and (started or proc.stdout == "")
    return lines[0]


def cli(*args, timeout=120):
    proc, _ = job("none", train_cmd(list(args)), timeout=timeout)
    return proc


# ---- the configuration files themselves (nothing heavier than YAML is read) -----------------------
@pytest.mark.parametrize(
    "name, body, words",
    [
        (
            "typo.yaml",
            "kfac:\n  update_treshold: 0.25\n",
            ["kfac.update_treshold", "did you mean 'kfac.update_threshold'"],
        ),
        ("type.yaml", "train:\n  epochs: many\n", ["train.epochs", "integer"]),
        ("range.yaml", "kfac:\n  damping: -0.001\n", ["kfac.damping", "> 0"]),
        ("malformed.yaml", "kfac: {damping: [1, 2\n", ["invalid YAML"]),
        ("tabs.yaml", "kfac:\n\tdamping: 1\n", ["invalid YAML", "line 2"]),
        ("notmapping.yaml", "- kfac\n- train\n", ["mapping of sections"]),
    ],
)
def test_bad_config_files(tmp_path, name, body, words):
    path = write(tmp_path / name, body)
    one_line_exit_2(cli("--config", path), path, *words)


def test_unreadable_config_files(tmp_path):
    binary = write(tmp_path / "binary.yaml", b"\xff\xfe\x00kfac", mode="wb")
    one_line_exit_2(cli("--config", binary), binary, "not a text (UTF-8) file")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    one_line_exit_2(cli("--config", str(folder)), str(folder), "is a directory")
    missing = str(tmp_path / "missing.yaml")
    one_line_exit_2(cli("--config", missing), missing, "not found")


def test_base_chain_errors(tmp_path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\n")
    b = write(tmp_path / "b.yaml", "base: a.yaml\n")
    line = one_line_exit_2(cli("--config", a), "base", "circular")
    assert b in line  # the file whose base: closes the cycle
    orphan = write(tmp_path / "orphan.yaml", "base: gone/base.yaml\n")
    one_line_exit_2(cli("--config", orphan), orphan, "base", os.path.join("gone", "base.yaml"), "not found")


def test_bad_overrides(tmp_path):
    path = write(tmp_path / "ok.yaml", SMALL + SYNTH)
    one_line_exit_2(
        cli("--config", path, "kfac.update_treshold=0.3"),
        f"{path} (command line)",
        "kfac.update_treshold",
        "did you mean",
    )
    one_line_exit_2(cli("--config", path, "optim.lr=fast"), "optim.lr", "a number")
    one_line_exit_2(cli("--config", path, "train.epochs"), "not of the form section.key=value")


# ---- inputs: data folders, the checkpoint, the run folder (checked before Horovod starts) ---------
def test_missing_and_empty_data(tmp_path):
    missing = str(tmp_path / "no_fashion")
    one_line_exit_2(
        cli("--config", DEMO, f"data.fashion_mnist_dir={missing}"),
        DEMO,
        "data.fashion_mnist_dir",
        "directory not found",
        missing,
    )
    empty = tmp_path / "empty_fashion"
    empty.mkdir()
    one_line_exit_2(
        cli("--config", DEMO, f"data.fashion_mnist_dir={empty}"),
        "data.fashion_mnist_dir",
        "lacks train-images-idx3-ubyte.gz",
    )
    # ImageNet layout: the train folder exists but has no class folders.
    (tmp_path / "inet" / "train").mkdir(parents=True)
    (tmp_path / "inet" / "val" / "n01").mkdir(parents=True)
    cfg = write(
        tmp_path / "inet.yaml",
        SMALL.replace("10", "3")
        + f"data: {{dataset: imagenet, train_dir: {tmp_path}/inet/train, val_dir: {tmp_path}/inet/val}}\n",
    )
    one_line_exit_2(cli("--config", cfg), cfg, "data.train_dir", "is empty")


def test_corrupt_fashion_file_is_a_data_error(tmp_path):
    if not os.path.isdir(FASHION):
        pytest.skip("Fashion-MNIST not installed")
    copy = tmp_path / "fashion"
    shutil.copytree(FASHION, copy)
    with open(copy / "train-images-idx3-ubyte.gz", "r+b") as fh:
        fh.truncate(1000)
    one_line_exit_2(
        cli(*tiny(str(tmp_path / "run"), f"data.fashion_mnist_dir={copy}")),
        "data.fashion_mnist_dir",
        "cannot read the IDX files",
    )


def test_bad_checkpoint_and_run_folder(tmp_path):
    synth = write(tmp_path / "s.yaml", SMALL + SYNTH + f"log: {{dir: {tmp_path}/run}}\n")
    missing = str(tmp_path / "nope.pt")
    one_line_exit_2(
        cli("--config", synth, f"checkpoint.resume={missing}"), "checkpoint.resume", "file not found", missing
    )
    one_line_exit_2(
        cli("--config", synth, f"checkpoint.resume={tmp_path}"), "checkpoint.resume", "is a directory"
    )
    blocker = write(tmp_path / "a_file", "x")
    one_line_exit_2(cli("--config", synth, f"log.dir={blocker}/run"), "log.dir", "is not a directory")
    if not torch.cuda.is_available():
        one_line_exit_2(cli("--config", synth, "train.device=cuda"), "train.device", "CUDA is not available")
    garbage = write(tmp_path / "garbage.pt", b"not a checkpoint", mode="wb")
    line = one_line_exit_2(
        cli("--config", synth, f"checkpoint.resume={garbage}", "train.device=cpu"),
        "checkpoint.resume",
        garbage,
        "no usable checkpoint",
        started=True,
    )
    assert "does not load" in line


# ---- several ranks: the same verdict everywhere, and no hang when only one rank objects ----------
@needs_horovod
def test_config_error_under_horovodrun_same_verdict_on_every_rank(tmp_path):
    """Each rank's exit code and stderr are kept in files (the wrapper itself exits 0, so horovodrun
    does not end one rank when the other stops first): both ranks reach the same verdict."""
    path = write(tmp_path / "typo.yaml", "base: " + DEMO + "\nkfac:\n  update_treshold: 0.25\n")
    out = tmp_path / "ranks"
    out.mkdir()
    template = (
        shell_train(["--config", path]).replace("exec ", "")
        + f" 2> {out}/err.{{rank}}; echo $? > {out}/rc.{{rank}}"
    )
    proc, seconds = job("horovodrun", per_rank_shell(template), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rcs = [open(out / f"rc.{r}").read().strip() for r in (0, 1)]
    errs = [open(out / f"err.{r}").read() for r in (0, 1)]
    assert rcs == ["2", "2"]
    assert errs[0] == errs[1] and len(errs[0].strip().splitlines()) == 1
    assert path in errs[0] and "kfac.update_treshold" in errs[0] and "Traceback" not in errs[0]
    assert seconds < 120


@needs_horovod
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
def test_a_rank_that_alone_sees_a_bad_input_ends_the_job(tmp_path):
    """Rank 1 (as if on a node without the data) stops before Horovod starts, later than rank 0
    (which by then waits in hvd.init() for it); mpirun ends rank 0: the job exits 2 within a bound."""
    args = tiny(str(tmp_path / "run"), "data.fashion_mnist_dir=$dir")
    template = (
        f"if [ {{rank}} = 1 ]; then sleep 10; dir={tmp_path}/absent; else dir={FASHION}; fi; "
        + shell_train(args)
    )
    proc, seconds = job("mpirun", per_rank_shell(template), timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"data.fashion_mnist_dir: directory not found: {tmp_path}/absent" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 120
