"""kfac_hvd: distributed K-FAC on Horovod with a per-layer adaptive factor-update interval."""

from .assignment import Assignment, assign_layers
from .preconditioner import KFAC
from .scheduler import IntervalScheduler

__all__ = ["KFAC", "Assignment", "assign_layers", "IntervalScheduler"]
__version__ = "0.1.0"
