"""requirements/lock.txt and scripts/lock.py: the venv is what the lock says (every installed distribution at
its locked version, every locked one installed), the lock covers setup.py's lists and requirements/lock.in,
every pin carries its files' hashes, and another torch build keeps its own packages."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import common
from tests.helpers.fake_env import Fake
from tests.helpers.setup_py import names, setup_keywords

REPO = common.REPO
LOCK = os.path.join(REPO, "requirements", "lock.txt")
LOCK_PY = os.path.join(REPO, "scripts", "lock.py")


def lock_py(*args: str, python: str = sys.executable, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, LOCK_PY, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def pins(text: str) -> dict[str, str]:
    return {
        canonicalize_name(m.group(1)): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, re.M)
    }


def lock_text() -> str:
    with open(LOCK, encoding="utf-8") as fh:
        return fh.read()


def test_the_venv_is_the_lock():
    proc = lock_py("check")
    assert proc.returncode == 0, common.describe(proc)
    assert proc.stdout == ""


def test_check_names_what_is_off_in_one_line(tmp_path):
    text = lock_text()
    numpy = pins(text)["numpy"]
    # numpy pinned at another version, pyyaml left out, and a package locked that is not installed.
    text = text.replace(f"numpy=={numpy} ", "numpy==0.0.1 ")
    text = re.sub(r"^pyyaml==.*?(?=^\S)", "", text, flags=re.M | re.S)
    text += "not-installed-anywhere==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    lock = tmp_path / "lock.txt"
    lock.write_text(text)
    proc = lock_py("check", "--lock", str(lock))
    assert proc.returncode == 1, common.describe(proc)
    (line,) = proc.stdout.splitlines()
    assert f"numpy is {numpy}, the lock says 0.0.1" in line
    assert "pyyaml " in line and "is not in the lock" in line
    assert "not-installed-anywhere 1.0 is locked but not installed" in line


def test_lock_covers_setup_py_and_lock_in():
    keywords = setup_keywords()
    wanted = names(keywords["install_requires"])
    for extra in ("launch", "test"):
        wanted |= names(keywords["extras_require"][extra])
    with open(os.path.join(REPO, "requirements", "lock.in"), encoding="utf-8") as fh:
        wanted |= names([l.strip() for l in fh if l.strip() and not l.startswith("#")])
    locked = pins(lock_text())
    assert not wanted - set(locked), "not locked: run `make lock`"
    # Pinned requirements of setup.py (the linters) are locked at their pin.
    for text in keywords["extras_require"]["test"]:
        req = Requirement(text)
        assert locked[canonicalize_name(req.name)] in req.specifier or not req.specifier, text


def test_every_pin_carries_hashes():
    blocks = re.split(r"\n(?=\S)", lock_text())
    pinned = [b for b in blocks if re.match(r"[A-Za-z0-9].*==", b)]
    assert len(pinned) == len(pins(lock_text())) > 50
    for block in pinned:
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), block.splitlines()[0]


def test_another_torch_build_keeps_its_own_packages(tmp_path):
    locked = pins(lock_text())
    torch_build = {
        n for n in locked if n in ("torch", "torchvision", "triton") or n.startswith(("nvidia-", "cuda-"))
    }
    assert {"torch", "torchvision", "nvidia-nccl-cu13"} <= torch_build
    # The locked build installed (as on this machine): everything, torch's packages included.
    same = Fake(tmp_path / "same", dists={"torch": locked["torch"]})
    proc = lock_py("install", "--dry-run", python=same.python, **same.environ())
    assert proc.returncode == 0, common.describe(proc)
    assert set(pins(proc.stdout)) == set(locked)
    # A CUDA 12.6 build for V100s: its own torch, triton and nvidia packages stay as pip chose them.
    other = Fake(tmp_path / "other", dists={"torch": "2.14.1+cu126"})
    proc = lock_py("install", "--dry-run", python=other.python, **other.environ())
    assert proc.returncode == 0, common.describe(proc)
    assert set(pins(proc.stdout)) == set(locked) - torch_build
