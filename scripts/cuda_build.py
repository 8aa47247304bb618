"""What scripts/install_horovod.sh needs to know about CUDA builds, run by the target environment's interpreter:

cuda_build.py wheel-cuda WHEEL
    the CUDA major versions the libraries in WHEEL load (libcudart.so.<major>), comma-separated; nothing
    when none does, 'unreadable' when WHEEL is no zip
cuda_build.py arch-mismatch CC_LIST NVCC
    one line naming every entry of CC_LIST (HOROVOD_BUILD_CUDA_CC_LIST) that the installed torch has no
    kernels for or NVCC cannot compile for, and a torch and NVCC of different CUDA major versions; nothing
    when all fit
"""

import os
import re
import subprocess
import sys
import zipfile


def wheel_cuda_majors(path: str) -> str:
    majors = set()
    try:
        with zipfile.ZipFile(path) as whl:
            for name in whl.namelist():
                if name.endswith(".so") or ".so." in name:
                    majors.update(re.findall(rb"libcudart\.so\.(\d+)", whl.read(name)))
    except (OSError, zipfile.BadZipFile):
        return "unreadable"
    return ",".join(sorted(m.decode() for m in majors))


def nvcc_facts(nvcc: str):
    """(release, architectures) of nvcc: '13.0' and ['compute_75', ...]; empty where it does not answer."""

    def ask(flag: str) -> str:
        try:
            return subprocess.run([nvcc, flag], capture_output=True, text=True, timeout=60).stdout
        except OSError:
            return ""

    release = re.search(r"release (\d+\.\d+)", ask("--version"))
    return (release.group(1) if release else ""), ask("--list-gpu-arch").split()


def arch_mismatch(cc_list: str, nvcc: str) -> str:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    from launch.dist.device import runs_on  # the rule the launcher applies to the GPU at start-up

    name = "torch " + torch.__version__
    torch_cuda = getattr(torch.version, "cuda", None)
    if not torch_cuda:
        return f"{name} is a CPU-only build (torch.version.cuda is None); the NCCL flavour needs a CUDA build of torch"
    entries = [entry.strip() for entry in cc_list.split(",")]
    if not all(len(entry) >= 2 and entry.isdigit() for entry in entries):
        return (
            f"HOROVOD_BUILD_CUDA_CC_LIST={cc_list}: each entry is a compute capability without its dot "
            f"(70 V100, 80 A100, 90 H100/H200)"
        )
    release, nvcc_archs = nvcc_facts(nvcc)
    compiler = f"nvcc {release or 'of unknown release'} ({os.path.dirname(os.path.dirname(nvcc))})"
    torch_archs = torch.cuda.get_arch_list()
    problems: list[str] = []
    for cc in entries:
        capability = (int(cc[:-1]), int(cc[-1]))
        if not runs_on(capability, torch_archs):
            problems.append(
                f"{name} has no kernels for {capability[0]}.{capability[1]} "
                f"(it has {' '.join(torch_archs) or 'none'})"
            )
        if "compute_" + cc not in nvcc_archs:
            problems.append(
                f"{compiler} has no compute_{cc} (--list-gpu-arch: {' '.join(nvcc_archs) or 'nothing'})"
            )
    if release and release.split(".")[0] != torch_cuda.split(".")[0]:
        problems.append(f"{name} is built for CUDA {torch_cuda} but {compiler} is another major version")
    if not problems:
        return ""
    hint = (
        "; V100 (70) needs the CUDA 12.6 build of torch and a CUDA 12.x toolkit (README.md, GPU generations)"
        if any(int(cc) < 75 for cc in entries)
        else ""
    )
    return f"HOROVOD_BUILD_CUDA_CC_LIST={cc_list}: {'; '.join(problems)}{hint}"


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    print({"wheel-cuda": wheel_cuda_majors, "arch-mismatch": arch_mismatch}[command](*args))
