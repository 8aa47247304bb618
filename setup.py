from setuptools import find_packages, setup

setup(
    name="kfac-hvd",
    version="0.1.0",
    description="Distributed K-FAC on Horovod with a per-layer adaptive factor-update interval",
    packages=find_packages(include=["kfac_hvd", "kfac_hvd.*", "launch", "launch.*"]),
    python_requires=">=3.9",
    install_requires=["torch", "pyyaml"],
    entry_points={"console_scripts": ["kfac-hvd-train=launch.train:main"]},
)
