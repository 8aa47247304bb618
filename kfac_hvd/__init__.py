"""kfac_hvd: distributed K-FAC (Horovod or torch.distributed), per-layer adaptive factor-update interval."""

from .assignment import Assignment, assign_layers
from .comm import HorovodCommunicator, LocalCommunicator, TorchDistributedCommunicator
from .options import KFACOptions, option_fields
from .preconditioner import KFAC
from .scheduler import IntervalScheduler, ScheduleOptions

__all__ = [
    "KFAC",
    "KFACOptions",
    "option_fields",
    "Assignment",
    "assign_layers",
    "IntervalScheduler",
    "ScheduleOptions",
    "HorovodCommunicator",
    "LocalCommunicator",
    "TorchDistributedCommunicator",
]
__version__ = "0.1.0"
