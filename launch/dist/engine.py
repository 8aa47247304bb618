"""The one place that picks the engine (``train.engine``): Horovod's module, or :class:`TorchEngine` on
torch.distributed. The rest of the launcher calls the object it returns alike (``hvd`` by name)."""

from __future__ import annotations

from typing import Any

from launch.config.load import Config
from launch.dist.horovod_setup import init_horovod
from launch.dist.torch_engine import TorchEngine


def start_engine(cfg: Config) -> tuple[Any, str]:
    """Initialise the run's engine; returns (engine, how it started) for the world's layout line.
    Only the chosen engine starts: Horovod is imported by ``init_horovod`` alone, and torch.distributed
    comes with torch."""
    if cfg.train.engine == "torch":
        engine = TorchEngine(cfg.train.device)
        return engine, engine.describe()
    return init_horovod(cfg.horovod)


def check_engine(cfg: Config) -> None:
    """What the chosen engine cannot do, refused before any collective (raises ConfigError)."""
    if cfg.train.engine == "torch" and cfg.train.elastic:
        raise cfg.error(
            "train.elastic",
            "true needs train.engine=horovod (Horovod's elastic driver); torch.distributed runs have a "
            "fixed world: set train.elastic=false or train.engine=horovod",
        )
