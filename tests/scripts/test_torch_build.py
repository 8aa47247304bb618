"""The torch build of an environment and what follows from it, against fake environments: scripts/install_torch.sh
and the Makefile's torch step (TORCH_SPEC, TORCH_INDEX_URL; a torch that satisfies the spec is kept), the Horovod
wheel cache keyed by torch's CUDA build (and the take-over of wheels cached under the older key), the architecture
check before a GPU build, and the V100 set-up command of the docs, run as written."""

import os
import re
import shlex
import shutil
import subprocess

import pytest

from tests.helpers import common
from tests.helpers.fake_env import CU126, NVCC12_ARCHS, Fake, failed_step, make_n, parse

REPO = common.REPO
# The job scripts that name the V100 set-up (scripts/abci is ABCI 3.0: H200 only, its body the PBS script's).
JOB_SCRIPTS = (
    "scripts/pbs/kfac_resnet50_128gpu.sh",
    "scripts/slurm/kfac_resnet50.sbatch",
)
DEFAULT_DISTS = {"torch": "2.14.1", "torchvision": "0.29.1"}  # the metadata of the default (PyPI) wheels
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def read(relpath):
    with open(os.path.join(REPO, relpath), encoding="utf-8") as fh:
        return fh.read()


def v100_commands(text):
    """Every V100 set-up command a file gives: a README table cell, or a job script's comment line."""
    cells = re.findall(r"`(TORCH_SPEC=[^`]*HOROVOD_BUILD_CUDA_CC_LIST=70[^`]*)`", text)
    lines = [
        line.lstrip("#").strip()
        for line in text.splitlines()
        if line.startswith("#") and "TORCH_SPEC=" in line and "HOROVOD_BUILD_CUDA_CC_LIST=70" in line
    ]
    return cells + lines


def readme_v100():
    rows = [line for line in read("README.md").splitlines() if line.startswith("| V100")]
    assert len(rows) == 1, rows
    (command,) = v100_commands(rows[0])
    return command


def assignments(command):
    """The command's VAR=value words (as the shell would read them), checked to end in `make setup`."""
    words = shlex.split(command)
    assert words[-2:] == ["make", "setup"], command
    return dict(word.split("=", 1) for word in words[:-2])


V100 = readme_v100()
V100_VARS = assignments(V100)
V100_HOROVOD = {k: v for k, v in V100_VARS.items() if k.startswith("HOROVOD_")}


def make_torch(fake, **extra):
    """`make torch` for real, with the fake environment as the venv (set up already: its stamp is fresh)."""
    open(os.path.join(fake.root, ".kfac-hvd-ready"), "w").close()
    return subprocess.run(
        ["make", "-s", "-C", REPO, f"VENV={fake.root}", "torch"],
        env=fake.environ(**extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- the V100 command of the docs --------------------------------------------------------------------


def test_job_scripts_give_the_readmes_v100_command():
    assert V100_VARS["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu126"
    assert V100_VARS["TORCH_SPEC"].split() == ["torch==2.14.1+cu126", "torchvision==0.29.1+cu126"]
    assert V100_HOROVOD == {"HOROVOD_GPU_OPERATIONS": "NCCL", "HOROVOD_BUILD_CUDA_CC_LIST": "70"}
    for path in JOB_SCRIPTS:
        assert v100_commands(read(path)) == [V100], path


@needs_make
def test_v100_command_runs_the_torch_step_with_its_spec_and_index_before_horovod(tmp_path):
    lines = make_n(tmp_path, "setup", **V100_VARS).splitlines()
    torch_at = next(i for i, line in enumerate(lines) if "install_torch.sh" in line)
    horovod_at = next(i for i, line in enumerate(lines) if "install_horovod.sh" in line)
    assert torch_at < horovod_at
    assert f'TORCH_SPEC="{V100_VARS["TORCH_SPEC"]}"' in lines[torch_at]
    assert f'TORCH_INDEX_URL="{V100_VARS["TORCH_INDEX_URL"]}"' in lines[torch_at]


@needs_make
def test_make_variables_on_the_command_line_reach_the_torch_step(tmp_path):
    line = next(
        line
        for line in make_n(
            tmp_path,
            "setup",
            "TORCH_SPEC=torch==2.13.0+cpu",
            "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu",
        ).splitlines()
        if "install_torch.sh" in line
    )
    assert (
        'TORCH_SPEC="torch==2.13.0+cpu"' in line
        and 'TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"' in line
    )


@needs_make
def test_v100_command_replaces_the_default_torch_once_and_keeps_its_own(tmp_path):
    fake = Fake(tmp_path, dists=DEFAULT_DISTS)
    proc = make_torch(fake, **V100_VARS)
    assert proc.returncode == 0, common.describe(proc)
    assert fake.pip_calls() == [
        ["install", "-q", "--index-url", V100_VARS["TORCH_INDEX_URL"], *V100_VARS["TORCH_SPEC"].split()]
    ]
    # Again, and then a plain `make setup` (the default spec): the cu126 build satisfies both, so pip never runs.
    for extra in (V100_VARS, {}):
        proc = make_torch(fake, **extra)
        assert proc.returncode == 0, common.describe(proc)
        assert "satisfy" in proc.stdout
    assert len(fake.pip_calls()) == 1


@needs_make
def test_default_spec_keeps_the_installed_default_torch(tmp_path):
    fake = Fake(tmp_path, dists=DEFAULT_DISTS)
    proc = make_torch(fake)
    assert proc.returncode == 0, common.describe(proc)
    assert fake.pip_calls() == []
    assert "torch 2.14.1; torchvision 0.29.1 satisfy torch==2.14.1 torchvision==0.29.1" in proc.stdout


# --- scripts/install_torch.sh ------------------------------------------------------------------------


def test_dry_run_names_what_is_missing_and_the_pip_command(tmp_path):
    fake = Fake(tmp_path, dists={"torchvision": "0.29.1"})
    out = fake.dry_run(
        script="install_torch.sh",
        TORCH_SPEC=V100_VARS["TORCH_SPEC"],
        TORCH_INDEX_URL=V100_VARS["TORCH_INDEX_URL"],
    )
    assert out["decision"] == "install"
    assert out["reason"] == (
        "torch is not installed; installed torchvision 0.29.1 does not satisfy torchvision==0.29.1+cu126"
    )
    assert (
        out["pip"] == f"{fake.python} -m pip install -q --index-url {V100_VARS['TORCH_INDEX_URL']} "
        f"{V100_VARS['TORCH_SPEC']}"
    )
    assert fake.pip_calls() == []


def test_without_an_index_pip_uses_its_configured_ones(tmp_path):
    out = Fake(tmp_path).dry_run(script="install_torch.sh", TORCH_SPEC="torch==2.14.1 torchvision==0.29.1")
    assert "--index-url" not in out["pip"] and out["decision"] == "install"


def test_pip_that_leaves_an_unsatisfying_torch_fails_naming_it(tmp_path):
    fake = Fake(tmp_path, dists=DEFAULT_DISTS)  # this fake pip installs only name==version requirements
    proc = fake.run(args=(), script="install_torch.sh", TORCH_SPEC="torch>=2.15")
    assert (
        "step 'install torch>=2.15 (installed torch 2.14.1 does not satisfy torch>=2.15 after pip install)'"
        in failed_step(proc)
    )
    assert fake.pip_calls() == [["install", "-q", "torch>=2.15"]]


@pytest.mark.parametrize(
    "spec, words", [("torch=2.14.1", "not a pip requirement: torch=2.14.1"), ("", "empty")]
)
def test_bad_spec_fails_before_pip_naming_it(tmp_path, spec, words):
    fake = Fake(tmp_path, dists=DEFAULT_DISTS)
    stderr = failed_step(fake.run(args=(), script="install_torch.sh", TORCH_SPEC=spec))
    assert "step 'read TORCH_SPEC (" in stderr and words in stderr and len(stderr.splitlines()) == 1
    assert fake.pip_calls() == []


# --- the wheel cache: one key per CUDA build of torch ------------------------------------------------


@pytest.mark.parametrize(
    "flavour, torch, extra, key",
    [
        ("NCCL", {}, {}, "torch-2.14.1+cu130-NCCL"),
        ("NCCL", CU126, {"HOROVOD_BUILD_CUDA_CC_LIST": "70"}, "torch-2.14.1+cu126-NCCL"),
        (None, dict(torch="2.13.0+cpu", torch_cuda=None), {}, "torch-2.13.0+cpu-cpu"),
    ],
)
def test_cache_key_names_the_cuda_build_of_torch(tmp_path, flavour, torch, extra, key):
    out = Fake(tmp_path, **torch).dry_run(flavour, **extra)
    assert out["cache"] == os.path.join(tmp_path, "cache", "wheels", key)


def test_wheel_of_the_cu130_torch_is_not_installed_for_the_cu126_one(tmp_path):
    fake = Fake(tmp_path, **CU126)
    fake.cached_wheel("torch-2.14.1+cu130-NCCL")
    out = fake.dry_run(**V100_HOROVOD)
    assert out["decision"] == "build" and out["wheel"] == "none"


SO = "horovod/torch/mpi_lib_v2.cpython-311-x86_64-linux-gnu.so"


@pytest.mark.parametrize(
    "torch, libraries, adopted",
    [
        ({}, {SO: b"\0libc10_cuda.so\0libcudart.so.13\0"}, True),  # this machine's cache, the default torch
        (CU126, {SO: b"\0libc10_cuda.so\0libcudart.so.13\0"}, False),  # a CUDA 13 wheel, a CUDA 12 torch
        ({}, {SO: b"\0libtorch.so\0"}, False),  # no CUDA runtime: built for some other torch
        (dict(torch="2.14.1+cpu", torch_cuda=None), {SO: b"\0libtorch.so\0"}, True),
        ({}, None, False),  # not a zip
    ],
)
def test_wheel_under_the_older_key_is_taken_over_only_when_it_loads_torchs_cuda_runtime(
    tmp_path, torch, libraries, adopted
):
    fake = Fake(tmp_path, **torch)
    legacy = fake.cached_wheel("torch-2.14.1-cpu", libraries=libraries)
    out = fake.dry_run()
    if adopted:
        assert out["decision"] == "install-cached" and out["adopt_from"] == legacy
        assert out["wheel"] == os.path.join(out["cache"], os.path.basename(legacy))
    else:
        assert out["decision"] == "build" and out["adopt_from"] == "none"


# --- the architecture check before a GPU build -------------------------------------------------------


def test_v100_command_builds_against_the_cu126_torch_with_a_cuda12_nvcc(tmp_path):
    out = Fake(tmp_path, **CU126).dry_run(**V100_HOROVOD)
    assert out["decision"] == "build" and out["torch_build"] == "cu126"
    assert out["env"]["HOROVOD_BUILD_CUDA_CC_LIST"] == "70" and out["env"]["HOROVOD_GPU_OPERATIONS"] == "NCCL"


@pytest.mark.parametrize(
    "fake, named, not_named",
    [
        (
            {},
            [
                "torch 2.14.1+cu130 has no kernels for 7.0 (it has sm_75",
                "nvcc 13.0",
                "has no compute_70",
                "V100 (70) needs the CUDA 12.6 build",
            ],
            ["major version"],
        ),
        (
            dict(CU126, nvcc_release="13.0", nvcc_archs=("compute_75", "compute_90")),
            [
                "nvcc 13.0",
                "has no compute_70 (--list-gpu-arch: compute_75 compute_90)",
                "torch 2.14.1+cu126 is built for CUDA 12.6 but nvcc 13.0",
            ],
            ["has no kernels"],
        ),
        (
            dict(nvcc_release="12.6", nvcc_archs=NVCC12_ARCHS),
            ["torch 2.14.1+cu130 has no kernels for 7.0", "another major version"],
            ["compute_70"],
        ),
        (dict(torch="2.14.1+cpu", torch_cuda=None), ["torch 2.14.1+cpu is a CPU-only build"], ["compute_70"]),
    ],
)
def test_v100_command_against_another_torch_or_nvcc_stops_with_one_line_naming_it(
    tmp_path, fake, named, not_named
):
    stderr = failed_step(Fake(tmp_path, **fake).run(**V100_HOROVOD))
    assert len(stderr.splitlines()) == 1 and "step 'check architectures (" in stderr
    for words in named:
        assert words in stderr
    for words in not_named:
        assert words not in stderr


def test_architectures_with_a_dot_are_refused(tmp_path):
    stderr = failed_step(Fake(tmp_path).run("NCCL", HOROVOD_BUILD_CUDA_CC_LIST="8.0,90"))
    assert "HOROVOD_BUILD_CUDA_CC_LIST=8.0,90: each entry is a compute capability without its dot" in stderr


def test_each_listed_architecture_is_checked(tmp_path):
    assert (
        parse(Fake(tmp_path / "ok").run("NCCL", HOROVOD_BUILD_CUDA_CC_LIST="80,90").stdout)["decision"]
        == "build"
    )
    stderr = failed_step(Fake(tmp_path / "v100").run("NCCL", HOROVOD_BUILD_CUDA_CC_LIST="70,90"))
    assert "no kernels for 7.0" in stderr and "no kernels for 9.0" not in stderr
