"""The one list of a run's state (launch.store.snapshot, launch.training.run_state.state_pieces): a piece
registered once is written by a checkpoint, kept by an elastic commit and put back by both; state that
changed after a commit or checkpoint comes back as it was."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import kfac_hvd
from launch.dist.mixed_precision import MixedPrecision
from launch.store import checkpoint as ck
from launch.store.snapshot import StatePiece, check_unique, checkpoint_contents, commit, restore_commit
from launch.training.elastic import ElasticState
from launch.training.run_state import RunState, state_pieces


class WorldOfOne:
    """The collectives of a checkpoint and an elastic commit, for a world of one."""

    def rank(self):
        return 0

    def size(self):
        return 1

    def broadcast_object(self, obj, root_rank=0, name=None):
        return obj

    def allgather_object(self, obj, name=None):
        return [obj]

    def broadcast_parameters(self, params, root_rank=0):
        pass

    def broadcast_optimizer_state(self, optimizer, root_rank=0):
        pass


class Sampler:
    """Where an epoch's sampling stands (Horovod's ElasticSampler keeps more; the registry sees only this)."""

    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def make_run(scale: float = 2.0**16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kfac = kfac_hvd.KFAC(model, damping=1e-2)
    precision = MixedPrecision("fp16", False, torch.device("cpu"))
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    trainer = SimpleNamespace(model=model, optimizer=optimizer, kfac=kfac, precision=precision)
    run = SimpleNamespace(
        trainer=trainer,
        hvd=WorldOfOne(),
        device=torch.device("cpu"),
        sampler=Sampler(),
        steps_per_epoch=7,
        timer=SimpleNamespace(take=lambda: []),
        out=None,
    )
    return run


def train_one_step(run):
    model, optimizer, kfac = run.trainer.model, run.trainer.optimizer, run.trainer.kfac
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    kfac.step()
    optimizer.step()
    optimizer.zero_grad()


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in tensors])


def test_every_registered_piece_is_in_a_checkpoint_and_in_an_elastic_commit():
    run = make_run()
    state = RunState(step=5, epoch=1, history=[{"epoch": 1, "step": 5}])
    pieces = state_pieces(run, state, batch_in_epoch=3)
    contents = checkpoint_contents(pieces, run.hvd)
    assert contents is not None
    for piece in pieces:
        node = contents
        for part in piece.checkpoint_key or ():
            assert part in node, f"{piece.name} is not in the checkpoint at {piece.checkpoint_key}"
            node = node[part]
    # The on-disk layout the earlier checkpoints have: the keys a checkpoint of today still writes.
    assert {"model", "optimizer", "kfac", "rng", "rank_buffers", "step", "epoch", "batch_in_epoch"} <= set(
        contents
    )
    assert set(contents["extra"]) == {"grad_scaler", "history", "pending_eval"}
    assert contents["extra"]["grad_scaler"]["scale"] == 2.0**16
    assert contents["batch_in_epoch"] == 3 and contents["step"] == 5

    elastic = ElasticState(run, run.hvd)
    committed = commit(elastic.pieces())
    elastic_names = {p.name for p in elastic.pieces() if p.elastic != "none"}
    assert set(committed) == elastic_names
    assert {"model", "optimizer", "kfac", "loss_scaler", "rng", "progress", "sampler"} <= elastic_names


def test_checkpoint_restores_the_loss_scale_and_the_progress_of_the_run_that_wrote_it():
    writer = make_run(scale=1024.0)
    train_one_step(writer)
    state = RunState(step=9, epoch=2, history=[{"epoch": 2, "step": 9}])
    contents = checkpoint_contents(state_pieces(writer, state, batch_in_epoch=4), writer.hvd)
    ckpt = {"format": ck.FORMAT, "world_size": 1, **contents}

    reader = make_run()  # a fresh run: default loss scale, untrained weights
    resumed = RunState()
    ck.restore(ckpt, reader.hvd, state_pieces(reader, resumed), seed=0)
    assert reader.trainer.precision.state_dict()["scale"] == 1024.0
    assert (resumed.step, resumed.epoch, resumed.skip_batches) == (9, 2, 4)
    assert resumed.history == [{"epoch": 2, "step": 9}]
    assert torch.equal(
        flat(reader.trainer.model.state_dict().values()), flat(writer.trainer.model.state_dict().values())
    )
    assert (
        reader.trainer.optimizer.state_dict()["state"].keys()
        == writer.trainer.optimizer.state_dict()["state"].keys()
    )
    assert reader.trainer.kfac.state_dict()["steps"] == writer.trainer.kfac.state_dict()["steps"] == 1


def test_elastic_restore_undoes_every_change_since_the_commit():
    run = make_run(scale=512.0)
    train_one_step(run)
    elastic = ElasticState(run, run.hvd)
    elastic.progress = RunState(step=3, epoch=0)
    run.sampler.position = 96
    elastic.save()
    weights = flat(run.trainer.model.parameters()).clone()

    train_one_step(run)
    run.trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    run.sampler.position = 160
    run.steps_per_epoch = 11
    elastic.progress.step = 4
    assert not torch.equal(flat(run.trainer.model.parameters()), weights)

    elastic.restore()
    restore_commit(elastic.pieces(), elastic._saved, world=True)  # what reset does after re-initialisation
    assert torch.equal(flat(run.trainer.model.parameters()), weights)
    assert run.trainer.precision.state_dict()["scale"] == 512.0
    assert run.sampler.position == 96
    assert run.steps_per_epoch == 7
    assert elastic.progress.step == 3


def test_a_piece_registered_twice_is_refused():
    piece = StatePiece("scale", lambda: 1.0, lambda v: None, ("extra", "scale"))
    with pytest.raises(ValueError, match="'scale' is registered twice"):
        check_unique([piece, StatePiece("scale", lambda: 2.0, lambda v: None, None)])
    with pytest.raises(ValueError, match="registered twice"):
        check_unique([piece, StatePiece("other", lambda: 2.0, lambda v: None, ("extra", "scale"))])
