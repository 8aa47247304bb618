"""A fake target environment for scripts/install_horovod.sh and scripts/install_torch.sh: the real interpreter
without site-packages, seeing only a made-up site folder (torch of a chosen CUDA build, maybe horovod, an NCCL
wheel, package metadata, a pip that records what it is asked to install) and a fake nvcc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import packaging

from . import common

REPO = common.REPO
REAL_PYTHON = sys.executable
DEPS = {"cloudpickle": "cloudpickle", "psutil": "psutil", "pyyaml": "PyYAML", "packaging": "packaging"}
# What the real builds report: torch 2.14.1's cu130 and cu126 wheels, nvcc 13.0 and 12.6.
CU130_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")
CU126_ARCHS = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
NVCC13_ARCHS = (
    "compute_75",
    "compute_80",
    "compute_86",
    "compute_87",
    "compute_88",
    "compute_89",
    "compute_90",
    "compute_100",
    "compute_110",
    "compute_103",
    "compute_120",
    "compute_121",
)
NVCC12_ARCHS = (
    "compute_50",
    "compute_52",
    "compute_53",
    "compute_60",
    "compute_61",
    "compute_62",
    "compute_70",
    "compute_72",
    "compute_75",
    "compute_80",
    "compute_86",
    "compute_87",
    "compute_89",
    "compute_90",
)
CU126 = dict(
    torch="2.14.1+cu126",
    torch_cuda="12.6",
    torch_archs=CU126_ARCHS,
    nvcc_release="12.6",
    nvcc_archs=NVCC12_ARCHS,
)

EXTENSION = "horovod/torch/mpi_lib_v2.cpython-311-x86_64-linux-gnu.so"
WELL_LAID_OUT = {EXTENSION: b"\0libtorch.so\0", "horovod/__init__.py": b""}

# Records its arguments and "installs" every name==version it is given by rewriting that package's metadata.
FAKE_PIP = """import glob, json, os, shutil, sys
with open({log!r}, "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
site = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for arg in sys.argv[2:]:
    if "==" in arg and not arg.startswith("-"):
        name, version = arg.split("==")
        for old in glob.glob(os.path.join(site, name + "-*.dist-info")):
            shutil.rmtree(old)
        os.makedirs(os.path.join(site, "%s-%s.dist-info" % (name, version)))
        with open(os.path.join(site, "%s-%s.dist-info" % (name, version), "METADATA"), "w") as fh:
            fh.write("Metadata-Version: 2.1\\nName: %s\\nVersion: %s\\n" % (name, version))
"""


def write(path: str, text: str, mode: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    if mode is not None:
        os.chmod(path, mode)


def parse(out: str) -> dict:
    """'key: value' lines into a dict; 'env: NAME=value' lines into the dict under 'env'."""
    result: dict = {"env": {}}
    for line in out.splitlines():
        key, _, value = line.partition(": ")
        if key == "env":
            name, _, val = value.partition("=")
            result["env"][name] = val
        elif key:
            result[key] = value
    return result


def failed_step(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, common.describe(proc)
    return proc.stderr


def make_n(tmp_path, target: str, *args: str, **extra: str) -> str:
    """What `make -n TARGET` would run for a venv that is set up already (so its stamp rule does not run)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / ".kfac-hvd-ready").touch()
    env = dict(os.environ, **extra)
    env.pop("MAKEFLAGS", None)
    proc = subprocess.run(
        ["make", "-n", "-C", REPO, f"VENV={venv}", target, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, common.describe(proc)
    return proc.stdout


class Fake:
    """``torch`` is torch.__version__ (None: no torch), ``torch_cuda`` torch.version.cuda (None: a CPU-only
    build), ``dists`` the installed package metadata (name -> version) beyond Horovod's runtime dependencies."""

    def __init__(
        self,
        root,
        *,
        torch: str | None = "2.14.1+cu130",
        torch_cuda: str | None = "13.0",
        torch_archs=CU130_ARCHS,
        dists: dict[str, str] | None = None,
        horovod=None,
        nccl: str | None = "nvidia/nccl",
        deps=tuple(DEPS),
        setuptools=True,
        mpicxx=True,
        nvcc_release="13.0",
        nvcc_archs=NVCC13_ARCHS,
    ):
        self.root = str(root)
        self.site = os.path.join(self.root, "site")
        self.cache = os.path.join(self.root, "cache")
        self.bin = os.path.join(self.root, "bin")
        self.python = os.path.join(self.bin, "python")
        self.pip_log = os.path.join(self.root, "pip.log")
        write(self.python, f'#!/bin/sh\nexec "{REAL_PYTHON}" -S "$@"\n', 0o755)
        if torch is not None:
            write(
                os.path.join(self.site, "torch", "__init__.py"),
                f"__version__ = {torch!r}\nfrom . import cuda, version\nbfloat16, float16 = 'bf16', 'fp16'\n",
            )
            write(os.path.join(self.site, "torch", "version.py"), f"cuda = {torch_cuda!r}\nhip = None\n")
            archs = list(torch_archs) if torch_cuda else []
            write(
                os.path.join(self.site, "torch", "cuda.py"), f"def get_arch_list():\n    return {archs!r}\n"
            )
        if horovod is not None:
            self.set_horovod(**horovod)
        self.nccl_lib = None
        if nccl is not None:
            base = os.path.join(self.site, *nccl.split("/"))
            write(os.path.join(base, "include", "nccl.h"), "#define NCCL_MAJOR 2\n")
            self.nccl_lib = os.path.join(base, "lib", "libnccl.so.2")
            write(self.nccl_lib, "")
        for name in deps:
            self.set_dist(DEPS[name], "1.0")
        for name, version in (dists or {}).items():
            self.set_dist(name, version)
        # install_torch.sh reads requirements with packaging; the real one, as pip would vendor it.
        os.makedirs(self.site, exist_ok=True)
        os.symlink(os.path.dirname(packaging.__file__), os.path.join(self.site, "packaging"))
        write(os.path.join(self.site, "pip", "__init__.py"), "")
        write(os.path.join(self.site, "pip", "__main__.py"), FAKE_PIP.format(log=self.pip_log))
        if setuptools:
            write(os.path.join(self.site, "setuptools", "__init__.py"), "")
        # A CUDA toolkit reached through a wrapper script, as on this kind of machine.
        self.cuda = os.path.join(self.root, f"cuda-{nvcc_release}")
        lines = "\\n".join(nvcc_archs)
        write(
            os.path.join(self.cuda, "bin", "nvcc"),
            f'#!/bin/sh\ncase "$1" in\n  --version) echo "Cuda compilation tools, release {nvcc_release}, '
            f'V{nvcc_release}.1" ;;\n  --list-gpu-arch) printf "{lines}\\n" ;;\n  *) echo fake nvcc ;;\nesac\n',
            0o755,
        )
        write(os.path.join(self.bin, "nvcc"), f'#!/bin/sh\nexec {self.cuda}/bin/nvcc "$@"\n', 0o755)
        self.mpicxx = (
            os.path.join(self.bin, "mpicxx") if mpicxx else os.path.join(self.root, "absent", "mpicxx")
        )
        if mpicxx:
            write(self.mpicxx, "#!/bin/sh\n", 0o755)

    def set_dist(self, name: str, version: str) -> None:
        write(
            os.path.join(self.site, f"{name}-{version}.dist-info", "METADATA"),
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        )

    def set_horovod(self, version="0.28.1", nccl=0, mpi=1, gloo=1, broken=None):
        top = "raise OSError('libhorovod_common.so: cannot open')\n" if broken == "package" else ""
        write(os.path.join(self.site, "horovod", "__init__.py"), f"{top}__version__ = {version!r}\n")
        body = (
            "raise ImportError('undefined symbol: _ZN7horovod')\n"
            if broken == "torch"
            else f"def nccl_built():\n    return {nccl}\n\ndef mpi_built():\n    return {bool(mpi)}\n\n"
            f"def gloo_built():\n    return {bool(gloo)}\n"
        )
        write(os.path.join(self.site, "horovod", "torch", "__init__.py"), body)

    def cached_wheel(self, key, pytag=None, libraries=WELL_LAID_OUT):
        """A cached wheel: a zip holding ``libraries`` (name -> bytes; by default the extension where it
        belongs), or with ``libraries=None`` an empty file."""
        pytag = pytag or "cp%d%d" % sys.version_info[:2]
        path = os.path.join(self.cache, "wheels", key, f"horovod-0.28.1-{pytag}-{pytag}-linux_x86_64.whl")
        write(path, "")
        if libraries is not None:
            with zipfile.ZipFile(path, "w") as whl:
                for name, data in libraries.items():
                    whl.writestr(name, data)
        return path

    def pip_calls(self):
        if not os.path.exists(self.pip_log):
            return []
        with open(self.pip_log, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh]

    def environ(self, path_first=(), **extra) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HOROVOD_", "KFAC_HVD_", "CMAKE_", "TORCH_"))
            and k not in ("CUDA_HOME", "PYTHONPATH", "MAKEFLAGS", "MPICXX")
        }
        env.update(
            PYTHON=self.python,
            PYTHONPATH=self.site,
            KFAC_HVD_CACHE=self.cache,
            MPICXX=self.mpicxx,
            PATH=os.pathsep.join([*path_first, self.bin, env.get("PATH", "")]),
        )
        env.update(extra)
        return env

    def run(self, flavour=None, args=("--dry-run",), path_first=(), script="install_horovod.sh", **extra):
        env = self.environ(path_first, **extra)
        if flavour is not None:
            env["HOROVOD_GPU_OPERATIONS"] = flavour
        return subprocess.run(
            ["bash", os.path.join(REPO, "scripts", script), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def dry_run(self, flavour=None, **kw):
        proc = self.run(flavour, **kw)
        assert proc.returncode == 0, common.describe(proc)
        return parse(proc.stdout)
