"""One list of a run's state: each piece registered once, with how it is read and put back, where a
checkpoint keeps it and what an elastic commit does with it. A checkpoint, a resume, and an elastic
commit, restore and synchronisation all walk the same list, so a piece added here is in all of them.

Modelled on Horovod's elastic state (one handler per kind of state) and on checkpointers over
``state_dict``/``load_state_dict`` objects. The list itself is built where the run's objects are
(:func:`launch.training.run_state.state_pieces`); this module holds the walks, which know nothing of
what the pieces are.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kfac_hvd import KFAC
from launch.store.rng import rng_state, set_rng_state

# What an elastic commit does with a piece:
#   "object"  rank 0's value reaches a new rank in the one broadcast of plain data (sync);
#   "tensors" the engine broadcasts it itself, tensor by tensor (``broadcast``), in the list's order;
#   "world"   put back only once the new world is set up (``reset``): it depends on the ranks;
#   "own"     each rank keeps its own (committed and restored, never sent);
#   "none"    not part of a commit.
Elastic = Literal["object", "tensors", "world", "own", "none"]


@dataclass(frozen=True)
class StatePiece:
    name: str
    get: Callable[[], Any]
    put: Callable[[Any], None]
    checkpoint_key: tuple[str, ...] | None  # where a checkpoint keeps it; None: checkpoints do not
    elastic: Elastic = "object"
    per_rank: bool = False  # a checkpoint keeps one value per rank (a list in rank order)
    broadcast: Callable[[], None] | None = None  # elastic="tensors": rank 0's value to every rank
    adopt: Callable[[Any], None] | None = None  # a new rank takes rank 0's value (default: put)
    fresh: bool = False  # get() returns a new copy, which a commit need not copy again


def check_unique(pieces: Iterable[StatePiece]) -> None:
    names, keys = set(), set()
    for piece in pieces:
        if piece.name in names or (piece.checkpoint_key is not None and piece.checkpoint_key in keys):
            raise ValueError(f"run state piece '{piece.name}' is registered twice")
        names.add(piece.name)
        if piece.checkpoint_key is not None:
            keys.add(piece.checkpoint_key)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def checkpoint_contents(pieces: list[StatePiece], hvd: Any) -> dict[str, Any] | None:
    """Collective: every rank's own pieces gathered; rank 0 gets the checkpoint's contents, others None."""
    check_unique(pieces)
    own = {p.name: p.get() for p in pieces if p.checkpoint_key is not None and p.per_rank}
    gathered = hvd.allgather_object(own)
    if hvd.rank() != 0:
        return None
    contents: dict[str, Any] = {}
    for piece in pieces:
        if piece.checkpoint_key is None:
            continue
        value = [rank[piece.name] for rank in gathered] if piece.per_rank else piece.get()
        _place(contents, piece.checkpoint_key, value)
    return contents


def restore_checkpoint(pieces: list[StatePiece], ckpt: dict[str, Any], rank: int, size: int) -> list[str]:
    """Put back every piece a checkpoint holds; a rank's own pieces only when the checkpoint was written by
    as many ranks. Returns the names of the pieces left as they were (absent, or another world size)."""
    check_unique(pieces)
    left = []
    for piece in pieces:
        if piece.checkpoint_key is None:
            continue
        value = _find(ckpt, piece.checkpoint_key)
        if piece.per_rank:
            if not isinstance(value, list) or len(value) != size or ckpt.get("world_size") != size:
                left.append(piece.name)
                continue
            value = value[rank]
        piece.put(value)
    return left


def _place(tree: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
    for part in key[:-1]:
        tree = tree.setdefault(part, {})
    tree[key[-1]] = value


_ABSENT = object()


def _find(tree: dict[str, Any], key: tuple[str, ...]) -> Any:
    """The value at ``key``; None where a checkpoint of an older layout lacks it."""
    node: Any = tree
    for part in key:
        node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is _ABSENT:
            return None
    return node


# --------------------------------------------------------------------------------------------------
# Elastic commits
# --------------------------------------------------------------------------------------------------
def commit(pieces: list[StatePiece]) -> dict[str, Any]:
    """Copies of every committed piece, in host or device memory as the piece keeps it."""
    check_unique(pieces)
    return {p.name: p.get() if p.fresh else copy.deepcopy(p.get()) for p in pieces if p.elastic != "none"}


def restore_commit(pieces: list[StatePiece], saved: dict[str, Any], *, world: bool) -> None:
    """Put the committed pieces back: those that depend on the world's ranks (``world=True``, after
    Horovod's re-initialisation) or all the others (``world=False``)."""
    for piece in pieces:
        if piece.elastic != "none" and (piece.elastic == "world") == world:
            piece.put(copy.deepcopy(saved[piece.name]))


def synchronise(pieces: list[StatePiece], hvd: Any, name: str) -> None:
    """Collective: rank 0's state on every rank, the engine's tensor broadcasts first (in the list's
    order), then one broadcast of everything else that is not a rank's own."""
    for piece in pieces:
        if piece.elastic == "tensors" and piece.broadcast is not None:
            piece.broadcast()
    sent = [p for p in pieces if p.elastic in ("object", "world")]
    mine = {p.name: p.get() for p in sent} if hvd.rank() == 0 else None
    shared = hvd.broadcast_object(mine, root_rank=0, name=name)
    for piece in sent:
        (piece.adopt or piece.put)(shared[piece.name])


# --------------------------------------------------------------------------------------------------
# The pieces every training run has
# --------------------------------------------------------------------------------------------------
def training_pieces(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    kfac: Callable[[], KFAC | None],
    hvd: Any = None,
) -> list[StatePiece]:
    """The optimiser, the model, K-FAC, this rank's RNG streams and BatchNorm statistics. ``kfac`` is
    looked up at each use: an elastic run rebuilds K-FAC for every new world. ``hvd``: the engine whose
    tensor broadcasts an elastic synchronisation uses (None: no synchronisation)."""

    def put_model(value: Any) -> None:
        try:
            model.load_state_dict(value)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(_does_not_fit(exc)) from None

    def put_optimizer(value: Any) -> None:
        try:
            optimizer.load_state_dict(value)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(_does_not_fit(exc)) from None

    def put_kfac(value: Any) -> None:
        preconditioner = kfac()
        if preconditioner is None:
            return
        if value is None:
            raise ValueError("it was written by an SGD run; it has no K-FAC state")
        try:
            preconditioner.load_state_dict(value)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(f"its K-FAC state does not fit ({str(exc).splitlines()[0][:200]})") from None

    def adopt_kfac(value: Any) -> None:
        preconditioner = kfac()
        if preconditioner is not None:  # rank 0's factors and schedule; the traffic tally stays this rank's
            preconditioner.load_state_dict({**value, "traffic": preconditioner.traffic.state_dict()})

    def get_kfac() -> Any:
        preconditioner = kfac()
        return preconditioner.state_dict() if preconditioner is not None else None

    def get_buffers() -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in model.named_buffers()}

    def put_buffers(value: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in value:
                    buf.copy_(value[name])

    # The optimiser before the model in an elastic synchronisation: Horovod initialises an empty optimiser
    # state with a step on zero gradients, which weight decay would turn into a change of the weights.
    return [
        StatePiece(
            "optimizer",
            optimizer.state_dict,
            put_optimizer,
            ("optimizer",),
            elastic="tensors",
            broadcast=(lambda: hvd.broadcast_optimizer_state(optimizer, root_rank=0)) if hvd else None,
        ),
        StatePiece(
            "model",
            model.state_dict,
            put_model,
            ("model",),
            elastic="tensors",
            broadcast=(lambda: hvd.broadcast_parameters(model.state_dict(), root_rank=0)) if hvd else None,
        ),
        StatePiece("kfac", get_kfac, put_kfac, ("kfac",), elastic="world", adopt=adopt_kfac, fresh=True),
        StatePiece("rng", rng_state, set_rng_state, ("rng",), elastic="own", per_rank=True, fresh=True),
        # An elastic commit keeps this rank's statistics in the model's own state.
        StatePiece("buffers", get_buffers, put_buffers, ("rank_buffers",), elastic="none", per_rank=True),
    ]


def _does_not_fit(exc: BaseException) -> str:
    return f"its model or optimiser state does not fit this model ({str(exc).splitlines()[0][:200]})"
