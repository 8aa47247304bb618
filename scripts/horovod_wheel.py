"""What is wrong with a built Horovod wheel's layout, checked before it is cached and before a cached one is
installed (scripts/install_horovod.sh), run by the target environment's interpreter:

horovod_wheel.py WHEEL
    one line naming the problem, or nothing when the wheel holds the PyTorch extension at
    horovod/torch/mpi_lib_v2*.so and every compiled library inside horovod/
"""

import re
import sys
import zipfile

EXTENSION = re.compile(r"horovod/torch/mpi_lib_v2[^/]*\.so")


def layout_problem(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as whl:
            names = whl.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        return f"not a readable wheel ({type(exc).__name__}: {exc})"
    libraries = [name for name in names if name.endswith(".so") or ".so." in name]
    # A library outside horovod/ is one the build wrote under its absolute path (Utilities.cmake).
    stray = [name for name in libraries if not name.startswith("horovod/")]
    if not any(EXTENSION.fullmatch(name) for name in names):
        found = f"; libraries at {', '.join(stray or libraries)}" if libraries else "; it holds no library"
        return f"no horovod/torch/mpi_lib_v2*.so in it{found}"
    if stray:
        return f"libraries outside horovod/: {', '.join(stray)}"
    return ""


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    problem = layout_problem(argv[1])
    if problem:
        print(problem)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
