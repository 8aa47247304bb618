"""Ranks must agree: at start-up every rank compares the resolved configuration and the code (sources of
kfac_hvd and launch, library versions); a mismatch stops every rank with exit code 2, never a hang."""

import os
import shutil

import pytest
from tests.helpers.common import REPO, horovod_ready
from tests.helpers.jobs import DEMO, job, per_rank_shell, shell_train, tiny

from launch.config.load import load_config, resolve_paths
from launch.dist.agreement import check_agreement, code_fingerprint, config_fingerprint
from launch.errors import RunStop


class Gather:
    """Stand-in for hvd.allgather_object: what each rank would contribute."""

    def __init__(self, per_rank):
        self.per_rank = per_rank

    def allgather_object(self, obj):
        return self.per_rank


def layout_of(cfgs, codes):
    return [
        {"rank": r, "config": config_fingerprint(c), "code": code}
        for r, (c, code) in enumerate(zip(cfgs, codes))
    ]


def test_fingerprints_and_the_mismatch_message(tmp_path):
    a = load_config(DEMO, [f"log.dir={tmp_path}"])
    b = load_config(DEMO, [f"log.dir={tmp_path}", "kfac.damping=0.002"])
    resolve_paths(a), resolve_paths(b)
    again = load_config(DEMO, [f"log.dir={tmp_path}"])
    resolve_paths(again)
    assert config_fingerprint(a) == config_fingerprint(again) != config_fingerprint(b)
    digest, detail = code_fingerprint()
    assert "launch/training/loop.py" in detail["files"] and "kfac_hvd/preconditioner.py" in detail["files"]
    assert detail["versions"]["torch"]
    assert code_fingerprint()[0] == digest  # deterministic

    # Everything equal: nothing happens (and no second collective).
    check_agreement(None, a, layout_of([a, a], [digest, digest]), detail)

    flat = lambda c: {f"{s}.{k}": v for s, sec in c.to_dict().items() for k, v in sec.items()}  # noqa: E731
    other = {"files": dict(detail["files"]), "versions": dict(detail["versions"])}
    other["files"]["launch/training/loop.py"] = "0" * 16
    gather = Gather([{"config": flat(a), **detail}, {"config": flat(b), **other}])
    with pytest.raises(RunStop) as info:
        check_agreement(gather, a, layout_of([a, b], [digest, "x"]), detail)
    msg = info.value.message
    assert info.value.code == 2 and "\n" not in msg
    # Named by the file that set the key on this rank (the Fashion-MNIST base config).
    assert msg.startswith(
        f"config error: {a.source('kfac.damping')}: kfac.damping: ranks disagree on the "
        f"resolved configuration (ranks differing from rank 0: 1)"
    )
    assert "kfac.damping: 0.002 on rank 1, 0.003 on rank 0" in msg
    assert "ranks run different code (ranks differing from rank 0: 1): files launch/training/loop.py" in msg


@pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")
def test_ranks_with_different_config_and_code_stop_together(tmp_path):
    """Under horovodrun, rank 1 runs a copy of the code with one edited file and another damping.
    Each rank's exit code and stderr go to files (the wrapper exits 0, so horovodrun does not end a
    rank that is still printing): both ranks exit 2 with the same verdict, within a bound."""
    copy = tmp_path / "code"
    for pkg in ("launch", "kfac_hvd"):
        shutil.copytree(os.path.join(REPO, pkg), copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "launch" / "training" / "models.py", "a") as fh:
        fh.write("# edited on one node only\n")
    out = tmp_path / "ranks"
    out.mkdir()
    args = tiny(str(tmp_path / "run"), "kfac.damping=$damping")
    template = (
        f"if [ {{rank}} = 1 ]; then export PYTHONPATH={copy}; damping=0.002; else damping=0.003; fi; "
        + shell_train(args).replace("exec ", "")
        + f" 2> {out}/err.{{rank}}; echo $? > {out}/rc.{{rank}}"
    )
    # cwd outside the repository: `python -m launch.train` must find each rank's own copy.
    proc, seconds = job("horovodrun", per_rank_shell(template), timeout=180, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rcs = [open(out / f"rc.{r}").read().strip() for r in (0, 1)]
    errs = [open(out / f"err.{r}").read().strip().splitlines() for r in (0, 1)]
    assert rcs == ["2", "2"], errs
    last = [e[-1] for e in errs]
    assert last[0] == last[1], last
    assert "kfac.damping: ranks disagree on the resolved configuration" in last[0]
    assert "kfac.damping: 0.002 on rank 1, 0.003 on rank 0" in last[0]
    assert "ranks run different code" in last[0] and "launch/training/models.py" in last[0]
    assert not any("Traceback" in line for e in errs for line in e)
    assert seconds < 150
