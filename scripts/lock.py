"""The venv's lock (requirements/lock.txt), run by the venv's interpreter; `make lock` and `make setup` call it.

lock.py compile [--lock FILE]
    resolves setup.py's lists ([launch], [test]), requirements/lock.in and TORCH_SPEC (a constraint) with uv
    into FILE, every file pinned by its sha256, for this interpreter's Python version on Linux x86_64
lock.py install [--lock FILE] [--dry-run]
    pip-installs FILE with --require-hashes --no-deps; the torch build's packages (TORCH_BUILD) are left
    to scripts/install_torch.sh when the installed torch is another build than the locked one; --dry-run
    prints the name==version pins it would install
lock.py check [--lock FILE]
    one line naming every installed distribution that is not in FILE at its locked version and every
    locked one not installed, exit 1; nothing and exit 0 when the venv is what the lock says
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(REPO, "requirements", "lock.txt")
LOCK_INPUT = os.path.join(REPO, "requirements", "lock.in")
PROJECT = "kfac-hvd"
# Built from its sdist against the installed torch, pinned by its sha256 in scripts/install_horovod.sh.
BUILT_HERE = ("horovod",)
# What comes with a torch build and differs between builds (a CUDA 12.6 torch for V100s has other ones):
# locked for the default TORCH_SPEC, left to pip when TORCH_SPEC names another build.
TORCH_BUILD = ("torch", "torchvision", "triton", "nvidia-*", "cuda-*")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str) -> dict[str, str]:
    """name -> version of every `name==version` requirement in a lock."""
    pins = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            match = PIN.match(line)
            if match:
                pins[canonical(match.group(1))] = match.group(2)
    return pins


def is_torch_build(name: str) -> bool:
    return any(fnmatch.fnmatch(canonical(name), pattern) for pattern in TORCH_BUILD)


def installed() -> dict[str, str]:
    found = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonical(name)] = dist.version
    return found


def torch_is_locked_build(pins: dict[str, str], present: dict[str, str]) -> bool:
    """Whether the torch installed (if any) is the locked one, local build tag and all."""
    return present.get("torch", pins.get("torch")) == pins.get("torch")


def problems(lock: str) -> list[str]:
    pins = read_pins(lock)
    present = installed()
    exempt_torch_build = not torch_is_locked_build(pins, present)
    found = []
    for name, version in sorted(present.items()):
        if name == PROJECT or name in BUILT_HERE or (exempt_torch_build and is_torch_build(name)):
            continue
        if name not in pins:
            found.append(f"{name} {version} is not in the lock")
        elif pins[name] != version:
            found.append(f"{name} is {version}, the lock says {pins[name]}")
    for name, version in sorted(pins.items()):
        if name not in present and not (exempt_torch_build and is_torch_build(name)):
            found.append(f"{name} {version} is locked but not installed")
    return found


def compile_lock(lock: str) -> int:
    spec = os.environ.get("TORCH_SPEC", "").split()
    if not spec:
        print("lock.py: TORCH_SPEC is empty (the Makefile passes its default)", file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(spec) + "\n")
        constraints = fh.name
    uv = os.path.join(os.path.dirname(sys.executable), "uv")
    python = "{}.{}".format(*sys.version_info[:2])
    cmd = [
        uv, "pip", "compile", "--quiet", "--generate-hashes", "--no-emit-package", PROJECT,
        "--python-version", python, "--python-platform", "x86_64-manylinux_2_28",
        "--custom-compile-command", "make lock", "--constraint", constraints, "--output-file", lock,
        "--extra", "launch", "--extra", "test", os.path.join(REPO, "setup.py"), LOCK_INPUT,
    ]  # fmt: skip
    try:
        return subprocess.run(cmd, cwd=REPO).returncode
    finally:
        os.unlink(constraints)


def selected_blocks(lock: str) -> list[tuple[str, str]]:
    """(name==version, block) of the lock's requirements (a block: the pin line and the indented hash and
    comment lines under it) that `install` installs: all, or all but the torch build's when another torch
    build is installed."""
    keep_torch_build = torch_is_locked_build(read_pins(lock), installed())
    with open(lock, encoding="utf-8") as fh:
        blocks = re.split(r"\n(?=\S)", fh.read())
    kept = []
    for block in blocks:
        pin = PIN.match(block)
        if pin and (keep_torch_build or not is_torch_build(pin.group(1))):
            kept.append((pin.group(0), block.rstrip("\n")))
    return kept


def install(lock: str, dry_run: bool) -> int:
    kept = selected_blocks(lock)
    if dry_run:
        print("\n".join(pin for pin, _ in kept))
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(block for _, block in kept) + "\n")
        selected = fh.name
    try:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--require-hashes", "--no-deps", "-r", selected]
        return subprocess.run(cmd).returncode
    finally:
        os.unlink(selected)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lock.py", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("compile", "install", "check"))
    parser.add_argument("--lock", default=LOCK)
    parser.add_argument("--dry-run", action="store_true", help="install: print the pins, install nothing")
    args = parser.parse_args(argv)
    if args.action == "compile":
        return compile_lock(args.lock)
    if args.action == "install":
        return install(args.lock, args.dry_run)
    found = problems(args.lock)
    if found:
        print(
            f"lock.py: the venv differs from {os.path.relpath(args.lock)} (make setup installs it; "
            f"make lock refreshes it): {'; '.join(found)}"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
