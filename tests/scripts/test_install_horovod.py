"""scripts/install_horovod.sh: its decision (skip, install-cached, build) and the build environment it forms,
seen through its dry run against fake interpreters; the Makefile's use of it; the strict session checks."""

import os
import shutil
import subprocess
import sys

import pytest

from tests import conftest as session_checks
from tests.helpers import common
from tests.helpers.fake_env import EXTENSION, Fake, failed_step, make_n, parse, write

REPO = common.REPO
REAL_PYTHON = sys.executable

CPU_INSTALLED = dict(nccl=0, mpi=1, gloo=1)
NCCL_INSTALLED = dict(nccl=23007, mpi=1, gloo=1)


# --- the decision -------------------------------------------------------------------------------------


def test_right_flavour_installed_means_nothing_to_do(tmp_path):
    out = Fake(tmp_path, horovod=CPU_INSTALLED).dry_run()
    assert out["decision"] == "skip" and out["flavour"] == "cpu"
    assert "env" not in out or out["env"] == {}


def test_nccl_installed_and_asked_for_means_nothing_to_do(tmp_path):
    out = Fake(tmp_path, horovod=NCCL_INSTALLED).dry_run("NCCL")
    assert out["decision"] == "skip" and out["installed"] == "ok NCCL"


def test_cpu_build_installed_but_nccl_asked_for_rebuilds(tmp_path):
    out = Fake(tmp_path, horovod=CPU_INSTALLED).dry_run("NCCL")
    assert out["decision"] == "build"
    assert "cpu flavour" in out["reason"]
    assert out["cache"] == os.path.join(tmp_path, "cache", "wheels", "torch-2.14.1+cu130-NCCL")


def test_nccl_build_installed_but_cpu_asked_for_reinstalls_the_cached_cpu_wheel(tmp_path):
    fake = Fake(tmp_path, horovod=NCCL_INSTALLED)
    wheel = fake.cached_wheel("torch-2.14.1+cu130-cpu")
    fake.cached_wheel("torch-2.14.1+cu130-NCCL")
    out = fake.dry_run()
    assert out["decision"] == "install-cached" and out["wheel"] == wheel


def test_cached_wheel_of_the_asked_flavour_is_installed_not_rebuilt(tmp_path):
    fake = Fake(tmp_path, horovod=CPU_INSTALLED)
    wheel = fake.cached_wheel("torch-2.14.1+cu130-NCCL")
    out = fake.dry_run("NCCL")
    assert out["decision"] == "install-cached" and out["wheel"] == wheel


def test_cached_wheel_of_another_python_is_not_used(tmp_path):
    fake = Fake(tmp_path, horovod=CPU_INSTALLED)
    fake.cached_wheel("torch-2.14.1+cu130-NCCL", pytag="cp27")
    assert fake.dry_run("NCCL")["decision"] == "build"


@pytest.mark.parametrize(
    "horovod, words",
    [
        (None, "not installed"),
        (dict(version="0.27.0"), "0.27.0"),
        (dict(broken="torch"), "undefined symbol"),
        (dict(broken="package"), "OSError: libhorovod_common.so"),
        (dict(nccl=0, mpi=1, gloo=0), "lacks Gloo"),
        (dict(nccl=0, mpi=0, gloo=1), "lacks MPI"),
    ],
)
def test_absent_other_version_broken_or_incomplete_horovod_is_replaced(tmp_path, horovod, words):
    out = Fake(tmp_path, horovod=horovod).dry_run()
    assert out["decision"] == "build"
    assert words in out["reason"]


def test_horovod_without_mpi_is_fine_where_there_is_no_mpi_compiler(tmp_path):
    fake = Fake(tmp_path, horovod=dict(nccl=23007, mpi=0, gloo=1), mpicxx=False)
    out = fake.dry_run("NCCL")
    assert out["decision"] == "skip" and out["mpi"] == "0"


def test_no_torch_fails_naming_the_step(tmp_path):
    proc = Fake(tmp_path, torch=None).run()
    assert "step 'find torch" in failed_step(proc)


def test_unknown_flavour_fails(tmp_path):
    proc = Fake(tmp_path).run("MPI")
    assert "step 'choose flavour" in failed_step(proc)


def test_dry_run_by_environment_variable(tmp_path):
    fake = Fake(tmp_path, horovod=CPU_INSTALLED)
    proc = fake.run("NCCL", args=(), KFAC_HVD_DRY_RUN="1")
    assert proc.returncode == 0, common.describe(proc)
    assert parse(proc.stdout)["decision"] == "build"
    assert not os.path.exists(os.path.join(fake.cache, "wheels", "torch-2.14.1+cu130-NCCL"))


# --- the build environment ---------------------------------------------------------------------------


def test_nccl_environment_points_at_the_wheels_nccl_through_a_libnccl_so_link(tmp_path):
    fake = Fake(tmp_path)
    out = fake.dry_run("NCCL")
    env = out["env"]
    assert env["HOROVOD_GPU_OPERATIONS"] == "NCCL"
    assert env["HOROVOD_NCCL_INCLUDE"] == os.path.join(fake.site, "nvidia", "nccl", "include")
    assert env["HOROVOD_NCCL_LINK"] == "SHARED"
    link = os.path.join(env["HOROVOD_NCCL_LIB"], "libnccl.so")
    assert os.path.islink(link) and os.readlink(link) == fake.nccl_lib
    assert env["HOROVOD_NCCL_LIB"].startswith(os.path.join(fake.cache, "build"))
    assert env["CMAKE_POLICY_VERSION_MINIMUM"] == "3.5"
    assert env["HOROVOD_BUILD_CUDA_CC_LIST"] == "90"
    assert env["CUDA_HOME"] == env["HOROVOD_CUDA_HOME"] == fake.cuda
    for name in (
        "HOROVOD_WITH_PYTORCH",
        "HOROVOD_WITH_GLOO",
        "HOROVOD_WITH_MPI",
        "HOROVOD_WITHOUT_TENSORFLOW",
        "HOROVOD_WITHOUT_MXNET",
    ):
        assert env[name] == "1", name
    assert "HOROVOD_WITHOUT_MPI" not in env


def test_nccl_of_a_cu13_wheel_laid_out_under_another_folder_is_found(tmp_path):
    fake = Fake(tmp_path, nccl="nvidia/cu13")
    env = fake.dry_run("NCCL")["env"]
    assert env["HOROVOD_NCCL_INCLUDE"] == os.path.join(fake.site, "nvidia", "cu13", "include")
    assert os.readlink(os.path.join(env["HOROVOD_NCCL_LIB"], "libnccl.so")) == fake.nccl_lib


def test_nccl_next_to_torch_wins_over_one_earlier_on_the_path(tmp_path):
    # torch loads the libnccl.so.2 of its own site folder; Horovod must be built against that one.
    fake = Fake(tmp_path / "env")
    other = tmp_path / "other"
    write(str(other / "nvidia" / "nccl" / "include" / "nccl.h"), "")
    write(str(other / "nvidia" / "nccl" / "lib" / "libnccl.so.2"), "")
    env = fake.dry_run("NCCL", PYTHONPATH=os.pathsep.join([str(other), fake.site]))["env"]
    assert os.readlink(os.path.join(env["HOROVOD_NCCL_LIB"], "libnccl.so")) == fake.nccl_lib


def test_no_nccl_fails_naming_the_step(tmp_path):
    proc = Fake(tmp_path, nccl=None).run("NCCL")
    assert "step 'find NCCL" in failed_step(proc)


def test_callers_nccl_and_architectures_are_kept(tmp_path):
    env = Fake(tmp_path, nccl=None).dry_run(
        "NCCL", HOROVOD_NCCL_HOME="/opt/nccl", HOROVOD_BUILD_CUDA_CC_LIST="80,90"
    )["env"]
    assert env["HOROVOD_NCCL_HOME"] == "/opt/nccl" and "HOROVOD_NCCL_LIB" not in env
    assert env["HOROVOD_BUILD_CUDA_CC_LIST"] == "80,90"


def test_cpu_environment_has_no_nccl(tmp_path):
    out = Fake(tmp_path).dry_run()
    env = out["env"]
    assert not any(name.startswith("HOROVOD_NCCL") for name in env)
    assert "HOROVOD_GPU_OPERATIONS" not in env
    assert env["CMAKE_POLICY_VERSION_MINIMUM"] == "3.5"
    assert out["cache"].endswith(os.path.join("wheels", "torch-2.14.1+cu130-cpu"))


def test_without_mpi_compiler_mpi_is_left_out_and_cached_apart(tmp_path):
    out = Fake(tmp_path, mpicxx=False).dry_run("NCCL")
    assert out["env"]["HOROVOD_WITHOUT_MPI"] == "1" and "HOROVOD_WITH_MPI" not in out["env"]
    assert out["cache"].endswith("torch-2.14.1+cu130-NCCL-nompi")


def test_required_mpi_without_mpi_compiler_fails_naming_the_step(tmp_path):
    proc = Fake(tmp_path, mpicxx=False).run("NCCL", KFAC_HVD_REQUIRE_MPI="1")
    assert "step 'find MPI" in failed_step(proc)


def test_missing_runtime_dependencies_are_listed_present_ones_not(tmp_path):
    out = Fake(tmp_path, deps=("cloudpickle", "pyyaml"), setuptools=False).dry_run()
    assert out["missing_runtime"].split() == ["psutil", "packaging"]
    assert out["missing_build"] == "setuptools"
    out = Fake(tmp_path / "all").dry_run()
    assert out["missing_runtime"] == "none" and out["missing_build"] == "none"


def test_first_cmake_new_enough_is_used(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    write(str(old / "cmake"), "#!/bin/sh\necho 'cmake version 3.10.2'\n", 0o755)
    write(str(new / "cmake"), "#!/bin/sh\necho 'cmake version 4.1.0'\n", 0o755)
    out = Fake(tmp_path / "env").dry_run(path_first=(str(old), str(new)))
    assert out["cmake"] == str(new / "cmake") and out["env"]["HOROVOD_CMAKE"] == str(new / "cmake")
    assert out["env"]["CMAKE_POLICY_VERSION_MINIMUM"] == "3.5"


def test_callers_cmake_is_kept(tmp_path):
    out = Fake(tmp_path).dry_run(HOROVOD_CMAKE="/opt/cmake/bin/cmake")
    assert out["env"]["HOROVOD_CMAKE"] == "/opt/cmake/bin/cmake"


def test_build_jobs_are_set_not_inherited_from_make(tmp_path):
    env = Fake(tmp_path).dry_run(MAKEFLAGS="s --jobserver-auth=3,4", KFAC_HVD_BUILD_JOBS="16")["env"]
    assert env["MAKEFLAGS"] == "-j16" and env["CMAKE_BUILD_PARALLEL_LEVEL"] == "16"


def test_sdist_given_is_verified(tmp_path):
    fake = Fake(tmp_path)
    bogus = tmp_path / "horovod-0.28.1.tar.gz"
    bogus.write_bytes(b"not the release")
    proc = fake.run(HOROVOD_SDIST=str(bogus))
    assert f"step 'verify sdist {bogus}" in failed_step(proc)
    proc = fake.run(HOROVOD_SDIST=str(tmp_path / "absent.tar.gz"))
    assert "step 'find sdist" in failed_step(proc)


def test_without_sdist_the_dry_run_says_it_would_download(tmp_path):
    fake = Fake(tmp_path)
    out = fake.dry_run()
    carried = os.path.join(REPO, ".gpu_carry", "horovod-0.28.1.tar.gz")
    assert out["sdist"] == (
        carried if os.path.exists(carried) else f"download into {os.path.join(fake.cache, 'sdist')}"
    )


def test_target_folder_is_put_on_pythonpath(tmp_path):
    target = tmp_path / "target"
    env = Fake(tmp_path / "env").dry_run("NCCL", KFAC_HVD_TARGET=str(target))["env"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(target)


# --- the build folder, the wheel check, --rebuild ------------------------------------------------------

# The line of Horovod 0.28.1's cmake/Utilities.cmake that used the source folder's path as a regular
# expression, and the sed expression the script patches it with (read from the script itself).
UTILITIES_LINE = (
    '    string(REGEX REPLACE "${PROJECT_SOURCE_DIR}(/)?" "" SUB_FOLDER "${CMAKE_CURRENT_SOURCE_DIR}")\n'
)
LITERAL_LINE = '    file(RELATIVE_PATH SUB_FOLDER "${PROJECT_SOURCE_DIR}" "${CMAKE_CURRENT_SOURCE_DIR}")\n'


def utilities_patch() -> str:
    with open(os.path.join(REPO, "scripts", "install_horovod.sh"), encoding="utf-8") as fh:
        line = next(l for l in fh if l.lstrip().startswith("sed -i 's|^") and "RELATIVE_PATH" in l)
    return line.strip().split(" ", 2)[2].rsplit(" \\", 1)[0].strip("'")


def test_utilities_cmake_is_patched_to_compare_the_path_literally(tmp_path):
    cmake = tmp_path / "Utilities.cmake"
    cmake.write_text("macro(SET_OUTPUT_DIR)\n" + UTILITIES_LINE + "endmacro()\n")
    subprocess.run(["sed", "-i", utilities_patch(), str(cmake)], check=True)
    assert cmake.read_text() == "macro(SET_OUTPUT_DIR)\n" + LITERAL_LINE + "endmacro()\n"


def test_build_folder_under_a_cache_with_plus_and_dots_is_named_without_plus(tmp_path):
    fake = Fake(tmp_path)
    cache = str(tmp_path / "c++.cache" / "kfac-hvd.1")
    out = fake.dry_run(KFAC_HVD_CACHE=cache)
    assert out["decision"] == "build"
    assert out["work"] == os.path.join(cache, "build", "torch-2.14.1_cu130-cpu.dry-run")
    assert os.path.isdir(out["work"])


@pytest.mark.parametrize("name", ["my cache", "cache(1)", "ça"])
def test_cache_path_the_build_cannot_take_builds_under_tmpdir(tmp_path, name):
    fake = Fake(tmp_path)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = fake.dry_run(KFAC_HVD_CACHE=str(tmp_path / name), TMPDIR=str(tmpdir))
    assert out["work"] == os.path.join(tmpdir, "kfac-hvd-build-torch-2.14.1_cu130-cpu.dry-run")
    # The wheels and logs stay in the cache asked for.
    assert out["cache"] == os.path.join(tmp_path, name, "wheels", "torch-2.14.1+cu130-cpu")


def test_no_plain_folder_to_build_in_is_refused_in_one_line(tmp_path):
    fake = Fake(tmp_path)
    spaced = tmp_path / "my tmp"
    spaced.mkdir()
    proc = fake.run(KFAC_HVD_CACHE=str(tmp_path / "my cache"), TMPDIR=str(spaced))
    assert "step 'choose build folder (neither the cache" in failed_step(proc)
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = fake.run(KFAC_HVD_BUILD_DIR=str(spaced))
    assert "step 'choose build folder (KFAC_HVD_BUILD_DIR=" in failed_step(proc)


def test_build_folder_of_the_caller_is_used(tmp_path):
    out = Fake(tmp_path).dry_run(KFAC_HVD_BUILD_DIR=str(tmp_path / "b+1"))
    assert out["work"] == os.path.join(tmp_path, "b+1", "torch-2.14.1_cu130-cpu.dry-run")


# Where the broken wheels had it: under the build folder's absolute path, its leading slash dropped.
MISPLACED = "root/.cache/kfac-hvd/build/torch-2.14.1+cu130-cpu.Ab12Cd/horovod-0.28.1/" + EXTENSION


@pytest.mark.parametrize(
    "libraries, words",
    [
        (
            {MISPLACED: b"", "horovod/__init__.py": b""},
            f"no horovod/torch/mpi_lib_v2*.so in it; libraries at {MISPLACED}",
        ),
        ({"horovod/__init__.py": b""}, "it holds no library"),
        ({EXTENSION: b"", "lib/libgloo.so": b""}, "libraries outside horovod/: lib/libgloo.so"),
        (None, "not a readable wheel"),
    ],
)
def test_cached_wheel_with_a_wrong_layout_is_not_installed(tmp_path, libraries, words):
    fake = Fake(tmp_path)
    wheel = fake.cached_wheel("torch-2.14.1+cu130-cpu", libraries=libraries)
    out = fake.dry_run()
    assert out["decision"] == "build" and out["wheel"] == "none"
    assert words in out["wheel_check"] and words in out["reason"]
    assert os.path.exists(wheel), "a dry run moves nothing"


def test_well_laid_out_cached_wheel_passes_the_check(tmp_path):
    fake = Fake(tmp_path)
    fake.cached_wheel("torch-2.14.1+cu130-cpu")
    out = fake.dry_run()
    assert out["decision"] == "install-cached" and out["wheel_check"] == "ok"


def set_aside_files(fake) -> list[str]:
    root = os.path.join(fake.cache, "wheels", "set-aside")
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


def test_broken_cached_wheel_is_moved_aside_with_one_line_and_built_again(tmp_path):
    fake = Fake(tmp_path)
    wheel = fake.cached_wheel("torch-2.14.1+cu130-cpu", libraries={MISPLACED: b""})
    bogus = tmp_path / "horovod-0.28.1.tar.gz"
    bogus.write_bytes(b"stops the build before it compiles")
    proc = fake.run(args=(), HOROVOD_SDIST=str(bogus))
    # It went on to build: the (bogus) sdist is what stopped it.
    assert "step 'verify sdist" in failed_step(proc)
    assert not os.path.exists(wheel)
    moved = set_aside_files(fake)
    assert [os.path.basename(m) for m in moved] == [os.path.basename(wheel)]
    assert os.path.dirname(moved[0]).startswith(
        os.path.join(fake.cache, "wheels", "set-aside", "torch-2.14.1+cu130-cpu.")
    )
    lines = [l for l in proc.stdout.splitlines() if "fails its check" in l]
    assert len(lines) == 1 and wheel in lines[0] and "no horovod/torch/mpi_lib_v2*.so" in lines[0]


def test_cached_wheel_whose_install_lacks_the_flavour_is_moved_aside_and_built_again(tmp_path):
    # The fake pip installs nothing: horovod.torch afterwards still reports no Gloo, as the broken wheel did.
    fake = Fake(tmp_path, horovod=dict(nccl=0, mpi=1, gloo=0))
    wheel = fake.cached_wheel("torch-2.14.1+cu130-cpu")
    bogus = tmp_path / "horovod-0.28.1.tar.gz"
    bogus.write_bytes(b"stops the build before it compiles")
    proc = fake.run(args=(), HOROVOD_SDIST=str(bogus))
    assert "step 'verify sdist" in failed_step(proc)
    assert any(wheel in call for call in fake.pip_calls()), "the cached wheel was installed first"
    assert [os.path.basename(m) for m in set_aside_files(fake)] == [os.path.basename(wheel)]
    assert "lacks Gloo" in next(l for l in proc.stdout.splitlines() if "fails its check" in l)


def test_rebuild_builds_even_when_installed_and_cached(tmp_path):
    fake = Fake(tmp_path, horovod=CPU_INSTALLED)
    wheel = fake.cached_wheel("torch-2.14.1+cu130-cpu")
    out = fake.dry_run(args=("--dry-run", "--rebuild"))
    assert out["decision"] == "build" and out["wheel"] == "none"
    assert out["reason"].startswith("a rebuild from the sdist was asked for")
    assert fake.dry_run(KFAC_HVD_REBUILD="1")["decision"] == "build"
    assert os.path.exists(wheel)


def test_ci_builds_from_the_sdist_in_an_empty_cache_of_its_own():
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as fh:
        script = fh.read()
    commands = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert (
        any(l.startswith("KFAC_HVD_CACHE=$(mktemp -d") for l in commands)
        and "export KFAC_HVD_CACHE" in commands
    )
    # One build: the rebuild comes first, and `make test` then finds that Horovod installed.
    assert commands.index("KFAC_HVD_REBUILD=1 make setup") < commands.index("make test")


# --- the Makefile ------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_setup_asks_the_script_even_when_the_venv_is_ready(tmp_path):
    out = make_n(tmp_path, "setup", HOROVOD_GPU_OPERATIONS="NCCL")
    line = next(l for l in out.splitlines() if "install_horovod.sh" in l)
    assert "KFAC_HVD_REQUIRE_MPI=1" in line and "pip install" not in out


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_test_is_strict_and_prints_skip_reasons(tmp_path):
    line = next(l for l in make_n(tmp_path, "test").splitlines() if " -m pytest" in l)
    assert "KFAC_HVD_STRICT=1" in line and "-rs" in line.split()


# --- strict session checks and the cuda marker -------------------------------------------------------


def test_strict_checks_name_every_missing_prerequisite(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(session_checks, "FASHION", str(tmp_path / "fashion"))
    monkeypatch.setattr(
        session_checks, "horovod_problem", lambda: "horovod.torch does not load (ImportError: x)"
    )
    problems = " | ".join(session_checks.strict_problems())
    assert "mpirun" in problems
    assert "Fashion-MNIST" in problems and "t10k-labels-idx1-ubyte" in problems
    assert "horovod.torch does not load" in problems


def test_strict_horovod_ready_raises_instead_of_skipping(monkeypatch):
    monkeypatch.setattr(common, "horovod_problem", lambda: "horovod.torch does not load (OSError: x)")
    monkeypatch.delenv("KFAC_HVD_STRICT", raising=False)
    assert common.horovod_ready() is False
    monkeypatch.setenv("KFAC_HVD_STRICT", "1")
    with pytest.raises(RuntimeError, match="does not load"):
        common.horovod_ready()


def pytest_subprocess(args, cwd, **extra):
    env = {k: v for k, v in os.environ.items() if k != "KFAC_HVD_STRICT"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return subprocess.run(
        [REAL_PYTHON, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_strict_session_fails_with_one_line_reason_and_lax_one_runs(tmp_path):
    # A half-built Horovod (its extension does not load) and no mpirun on PATH.
    write(str(tmp_path / "site" / "horovod" / "__init__.py"), "")
    write(
        str(tmp_path / "site" / "horovod" / "torch" / "__init__.py"),
        "raise ImportError('undefined symbol')\n",
    )
    this = os.path.relpath(__file__, REPO) + "::test_unknown_flavour_fails"
    extra = dict(PATH=str(tmp_path), PYTHONPATH=str(tmp_path / "site"))
    lax = pytest_subprocess(["-q", "--collect-only", this], REPO, **extra)
    assert lax.returncode == 0, common.describe(lax)
    strict = pytest_subprocess(["-q", "--collect-only", this], REPO, KFAC_HVD_STRICT="1", **extra)
    assert strict.returncode == 3, common.describe(strict)
    reason = [line for line in (strict.stdout + strict.stderr).splitlines() if "KFAC_HVD_STRICT=1: " in line]
    assert reason and "mpirun is not on PATH" in reason[0]
    assert "horovod.torch does not load (ImportError: undefined symbol)" in reason[0]


@pytest.mark.parametrize("gpu", [False, True])
def test_cuda_marked_tests_skip_with_reason_without_a_gpu(tmp_path, gpu):
    write(str(tmp_path / "site" / "torch" / "__init__.py"), "from . import cuda\n")
    write(str(tmp_path / "site" / "torch" / "cuda.py"), f"def is_available():\n    return {gpu}\n")
    write(
        str(tmp_path / "t" / "test_gpu.py"),
        "import pytest\n\n@pytest.mark.cuda\ndef test_needs_gpu():\n    pass\n\n"
        "def test_plain():\n    pass\n",
    )
    path = os.pathsep.join([str(tmp_path / "site"), REPO])
    proc = pytest_subprocess(
        [
            "-q",
            "-rs",
            "-c",
            os.path.join(REPO, "pytest.ini"),
            "--rootdir",
            str(tmp_path / "t"),
            "-p",
            "tests.conftest",
            "test_gpu.py",
        ],
        str(tmp_path / "t"),
        PYTHONPATH=path,
    )
    assert proc.returncode == 0, common.describe(proc)
    if gpu:
        assert "2 passed" in proc.stdout and "skipped" not in proc.stdout
    else:
        assert "1 passed, 1 skipped" in proc.stdout
        assert "needs a CUDA GPU (torch.cuda.is_available() is false)" in proc.stdout
