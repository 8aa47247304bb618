"""A two-rank communicator for single-process tests, exact for one case: both ranks saw the same batch."""

from kfac_hvd.comm import LocalCommunicator


class MirrorCommunicator(LocalCommunicator):
    """Two ranks that saw the same batch, as rank 0 sees them: Horovod's Average of two equal tensors is
    that tensor, and when rank 1 owns no layer (at most one layer is not inverted everywhere, and rank 0
    owns it) rank 1 adds nothing to the inverse allgather, so rank 0's part is all of it. Factors,
    inverses and intervals therefore travel (packed as triangles or whole) as on two real ranks."""

    size = 2  # otherwise LocalCommunicator: every collective returns its input
