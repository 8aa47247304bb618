# The project's one list of dependencies (the Makefile installs `.[launch,test]`; tests/scripts/test_packaging.py
# checks these lists against the third-party modules the code imports, reading the literals below).
#
# torch and torchvision carry no version: scripts/install_torch.sh installs the build first (TORCH_SPEC,
# from TORCH_INDEX_URL), and an unpinned requirement lets pip keep that build instead of fetching another.
# Horovod is no requirement at all: it is compiled against the installed torch by scripts/install_horovod.sh
# (README.md, "Building Horovod").
from setuptools import find_packages, setup

setup(
    name="kfac-hvd",
    version="0.1.0",
    description="Distributed K-FAC on Horovod with a per-layer adaptive factor-update interval",
    packages=find_packages(include=["kfac_hvd", "kfac_hvd.*", "launch", "launch.*"]),
    # torch 2.14 needs 3.10, and kfac_hvd/layers.py evaluates `X | Y` of classes at import.
    python_requires=">=3.10",
    # What `import kfac_hvd` needs. The modelling tools' lazy imports (torchvision for `--model`) come
    # with [launch].
    install_requires=["torch"],
    extras_require={
        # What the launcher (launch/) and the modelling tools import; mpi4py starts Horovod under mpirun.
        "launch": [
            "torchvision",
            "numpy",
            "pillow",
            "pyyaml",
            "pydantic>=2",
            "tqdm",
            "tensorboard",
            "matplotlib",
            "mpi4py",
        ],
        # make test and make lint (psutil: the two-host tests look at what listens); the linters are pinned so that a check passes or fails alike everywhere.
        "test": ["pytest", "packaging", "psutil", "ruff==0.17.6", "mypy==2.4.1"],
    },
    entry_points={"console_scripts": ["kfac-hvd-train=launch.train:main"]},
)
