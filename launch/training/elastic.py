"""Elastic training (``train.elastic``): hosts leave and join while K-FAC trains, under horovodrun's
elastic driver (``horovodrun --gloo --min-np N --max-np M --host-discovery-script S``).

The state is committed in host memory on every rank every ``train.elastic_commit_steps`` steps and at each
epoch's end (before and after its evaluation and checkpoint): the model's and the optimiser's state
dicts, K-FAC's ``state_dict`` (step, intervals and t_last, factors, inverses, traffic), the loop's
progress (:class:`launch.training.run_state.RunState`), the sampler's position in the epoch, the epoch's train sums
over all ranks and the loss scaler's state. A commit also asks rank 0 (one small broadcast) whether the
driver announced a change of hosts.

A reset re-initialises Horovod for the new set of ranks:

- hosts added or removed (the driver's notice, acted on at the next commit, so no step is lost): the
  ranks that stay rebuild K-FAC for the new world size from the committed state (layer ownership and
  the inverse allgather re-assigned, the factors, inverses and schedule kept), new ranks receive
  everything from rank 0;
- a peer lost inside a collective (killed, crashed, its host gone): the step in flight is abandoned and
  every rank that stays goes back to the last commit; the steps since then are taken again with the
  same step numbers, and rank 0 removes their records from metrics.jsonl first.

The data continue from the committed position: Horovod's :class:`ElasticSampler` takes the epoch's
permutation (seeded by train.seed and the epoch, the same on every rank), drops the samples already
taken and deals the rest out over the ranks there are now. Within an epoch no sample is taken twice and
none is skipped, but for the last samples of an epoch (fewer than ranks × batch_size, dropped as
``data.drop_last`` says; the padding of the last round repeats fewer than one sample per rank). K-FAC's
traffic counters stay each rank's own: a rank keeps its counters across resets, a new rank starts at 0.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

import kfac_hvd
from launch.dist.horovod_setup import started_by_mpi
from launch.dist.world import check_world
from launch.errors import EXIT_ABORTED, EXIT_INPUT, RunStop
from launch.record.console import log0
from launch.store.snapshot import StatePiece, commit, restore_commit, synchronise
from launch.training.data import ShardSampler, steps_per_epoch
from launch.training.loop import EpochTally, end_epoch, run_step, start
from launch.training.run_state import Run, RunState, state_pieces


def check_elastic(cfg) -> None:
    """Before Horovod starts: ConfigError (one line) where ``train.elastic: true`` cannot work."""
    if not cfg.train.elastic:
        return
    if cfg.train.world_size is not None:
        raise cfg.error(
            "train.world_size",
            f"is {cfg.train.world_size} but train.elastic is true: the number of ranks changes during an "
            "elastic run; set train.world_size=null",
        )
    if cfg.checkpoint.every_steps is not None:
        raise cfg.error(
            "checkpoint.every_steps",
            "mid-epoch checkpoints cannot be combined with train.elastic (the commits, "
            "train.elastic_commit_steps, are its mid-epoch recovery); use checkpoint.every_epochs",
        )
    if cfg.horovod.init == "mpi4py" or started_by_mpi():
        raise cfg.error(
            "train.elastic",
            "needs Horovod's Gloo controller under horovodrun's elastic driver; MPI (mpirun, srun, "
            "horovod.init=mpi4py) cannot add or remove ranks",
        )
    if os.environ.get("HOROVOD_ELASTIC") != "1":
        raise cfg.error(
            "train.elastic",
            "is true but this process was not started by horovodrun's elastic driver: launch with "
            "horovodrun --gloo --min-np N --max-np M --host-discovery-script S",
        )


def loader_like(old: torch.utils.data.DataLoader, sampler) -> torch.utils.data.DataLoader:
    """A loader with ``old``'s settings over another sampler (a DataLoader's sampler cannot be set)."""
    return torch.utils.data.DataLoader(
        old.dataset,
        batch_size=old.batch_size,
        sampler=sampler,
        drop_last=old.drop_last,
        num_workers=old.num_workers,
        pin_memory=old.pin_memory,
        persistent_workers=old.persistent_workers,
        worker_init_fn=old.worker_init_fn,
        generator=old.generator,
    )


def build_elastic_loader(run: Run, hvd) -> None:
    """The training loader over Horovod's ElasticSampler, with the launcher's loader settings."""
    run.sampler = hvd.elastic.ElasticSampler(run.train_loader.dataset, shuffle=True, seed=run.cfg.train.seed)
    run.train_loader = loader_like(run.train_loader, run.sampler)


def reshard_val_loader(run: Run, rank: int, size: int) -> None:
    """The evaluation loader over this rank's share of the validation set in the current world."""
    run.val_loader = loader_like(run.val_loader, ShardSampler(len(run.val_loader.dataset), rank, size))


def rebuild_kfac(run: Run, state: dict[str, Any] | None) -> None:
    """K-FAC for the current world size (owners re-assigned), continuing from ``state``."""
    trainer = run.trainer
    if trainer.kfac is None:
        return
    trainer.kfac.remove_hooks()
    # The warm-up's length comes with the state (rank 0's): counted in the launch's steps per epoch.
    trainer.kfac = kfac_hvd.KFAC(trainer.model, options=run.cfg.kfac_options(run.steps_per_epoch))
    if state is not None:
        trainer.kfac.load_state_dict(state)


def beat(run: Run, what: str) -> None:
    if run.watchdog is not None:
        run.watchdog.beat(what)


def rewind_metrics(out, step: int) -> None:
    """Rank 0: drop the metrics.jsonl records of the steps after ``step`` (they are taken again)."""
    out.metrics.close()
    out._truncate_after(step)
    out.metrics = open(out.metrics_path, "a", encoding="utf-8")


class ElasticState:
    """Horovod's elastic state of a launcher run: what is committed, restored and synchronised."""

    def __init__(self, run: Run, hvd):
        from horovod.common.elastic import State

        self.run, self.hvd = run, hvd
        self._horovod = State(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self._horovod.save, self._horovod.restore = self.save, self.restore
        self._horovod.sync, self._horovod.reset = self.sync, self.reset
        self.progress = RunState()
        self.started = False  # the run was started or resumed (a new rank learns it in sync)
        self.epoch_sums = torch.zeros(3, dtype=torch.float64)  # committed: loss*images, correct, images
        self.tally = self.fresh_tally()  # this rank's sums since the last commit
        self.events: list[dict[str, Any]] = []  # resets not yet recorded in metrics.jsonl
        self._saved: dict[str, Any] = {}
        self._world = hvd.size()

    @property
    def horovod(self):
        """The object ``hvd.elastic.run`` drives (commit, restore, sync, reset, the host notices)."""
        return self._horovod

    def fresh_tally(self) -> EpochTally:
        return EpochTally(torch.zeros(2, dtype=torch.float64, device=self.run.device), 0, 0)

    def commit(self) -> None:
        """Collective: the epoch's sums of every rank folded in, the state saved, host changes checked
        (HostsUpdatedInterrupt on every rank alike when the driver announced one)."""
        beat(self.run, f"the elastic commit of step {self.progress.step}")
        tally = torch.cat(
            [self.tally.sums.cpu(), torch.tensor([float(self.tally.images)], dtype=torch.float64)]
        )
        self.epoch_sums += self.hvd.allreduce(tally, op=self.hvd.Sum, name="elastic.sums")
        self.tally = self.fresh_tally()
        self._horovod.commit()

    def pieces(self) -> list[StatePiece]:
        """The run's state (:func:`state_pieces`) and what only a commit holds: the progress as a whole,
        the sampler's position, the epoch's committed sums, whether the run has started, and the launch's
        steps per epoch (the learning rate's clock)."""
        run = self.run

        def put_progress(value: RunState) -> None:
            self.progress = value

        def put_sums(value: torch.Tensor) -> None:
            self.epoch_sums = value.clone()

        def put_started(value: bool) -> None:
            self.started = value

        def put_steps_per_epoch(value: int) -> None:
            run.steps_per_epoch = value

        return [
            *state_pieces(run, self.progress),
            StatePiece("progress", lambda: self.progress, put_progress, None),
            StatePiece(
                "sampler",
                lambda: run.sampler.state_dict(),
                lambda v: run.sampler.load_state_dict(v),
                None,
                elastic="world",
            ),
            StatePiece("epoch_sums", lambda: self.epoch_sums, put_sums, None),
            StatePiece("started", lambda: self.started, put_started, None),
            StatePiece("steps_per_epoch", lambda: run.steps_per_epoch, put_steps_per_epoch, None),
        ]

    def save(self) -> None:
        # Every committed piece, this rank's RNG streams too (augmentation, mixup): the steps taken again
        # draw what they drew.
        self._saved = commit(self.pieces())

    def restore(self) -> None:
        """A peer was lost inside a collective: back to the last commit (K-FAC and the sampler in reset)."""
        lost_step = self.progress.step
        # The optimiser's state put back also forgets the step's pending allreduces.
        restore_commit(self.pieces(), self._saved, world=False)
        self.tally = self.fresh_tally()
        self.run.timer.take()
        if self.run.out is not None:
            rewind_metrics(self.run.out, self.progress.step)
        self.events.append({"event": "peer_lost", "lost_step": lost_step})

    def reset(self) -> None:
        """After Horovod's re-initialisation, before sync: K-FAC and the sampler for the new world."""
        rebuild_kfac(self.run, None)
        restore_commit(self.pieces(), self._saved, world=True)
        reshard_val_loader(self.run, self.hvd.rank(), self.hvd.size())
        if not self.events or "world_size" in self.events[-1]:
            self.events.append({"event": "hosts_updated"})
        self.events[-1].update(world_size=self.hvd.size(), previous_world_size=self._world)
        self._world = self.hvd.size()

    def sync(self) -> None:
        """Collective: rank 0's state to every rank (a new rank starts from here); then committed."""
        beat(self.run, "the elastic state's broadcast")
        synchronise(self.pieces(), self.hvd, "elastic.state")
        self.tally = self.fresh_tally()
        self._world = self.hvd.size()
        self.save()


def train_elastic(run: Run, candidates: list[str]) -> RunState:
    """The epochs under ``hvd.elastic.run``: the run ends with the last epoch (or train.max_steps),
    whatever hosts come and go."""
    import horovod.torch as hvd

    build_elastic_loader(run, hvd)
    elastic = ElasticState(run, hvd)

    @hvd.elastic.run
    def train(_) -> RunState:
        enter(run, elastic, candidates)
        cfg = run.cfg
        while not elastic.progress.done and elastic.progress.epoch < cfg.train.epochs:
            elastic_epoch(run, elastic)
        return elastic.progress

    return train(elastic.horovod)


def enter(run: Run, elastic: ElasticState, candidates: list[str]) -> None:
    """On every (re-)entry, after sync: the ranks' agreement and layout; the first time, the start."""
    hvd = run.hvd
    check_world(run.cfg, hvd, "horovod", run.device, run.train_loader.dataset, run.val_loader.dataset)
    # Decided on every rank alike (rank 0's answer): a new rank 0 holds no run folder.
    if elastic.started and not hvd.broadcast_object(run.out is not None, root_rank=0, name="elastic.out"):
        raise RunStop(
            EXIT_ABORTED,
            "error: train.elastic: rank 0's host left the job, and rank 0 alone writes the run folder; "
            "resubmit with checkpoint.resume: auto",
        )
    if not elastic.started:
        elastic.progress = start(run, candidates)
        if elastic.progress.skip_batches:
            raise RunStop(
                EXIT_INPUT,
                f"config error: checkpoint.resume: {elastic.progress.resume_path} was written mid-epoch; "
                "an elastic run resumes from an epoch's end only",
            )
        elastic.started = True
        run.sampler.set_epoch(elastic.progress.epoch)
        elastic.save()
    state = elastic.progress
    remaining = len(run.train_loader) + (run.cfg.train.epochs - state.epoch - 1) * steps_per_epoch(
        len(run.sampler.dataset), hvd.size(), run.cfg.data.batch_size, run.cfg.data.drop_last
    )
    run.total_steps = state.step + remaining
    if run.cfg.train.max_steps is not None:
        run.total_steps = min(run.total_steps, run.cfg.train.max_steps)
    state.done = state.step >= run.total_steps
    for event in elastic.events:
        log0(
            hvd,
            f"elastic: {event['event'].replace('_', ' ')}: {event['previous_world_size']} -> "
            f"{event['world_size']} rank(s), continuing after step {state.step}",
        )
        if run.out is not None:
            run.out.record({"step": state.step, "elastic": event})
    elastic.events = []


def elastic_epoch(run: Run, elastic: ElasticState) -> None:
    """The epoch's remaining samples over the current ranks, with commits; then the epoch's end."""
    cfg, hvd, sampler = run.cfg, run.hvd, run.sampler
    state = elastic.progress
    run.trainer.model.train()
    t_epoch = time.perf_counter()
    beat(run, f"epoch {state.epoch + 1} on {hvd.size()} rank(s)")
    exhausted = True
    run.timer.start()
    for x, y in run.train_loader:
        # The records' epoch position from the samples taken (the steps per epoch vary with the world).
        taken = (sampler.processed_num + cfg.data.batch_size * hvd.size()) / len(sampler.dataset)
        elastic.tally.batch_in_epoch = round(taken * run.steps_per_epoch) - 1  # run_step counts the step
        run_step(run, state, elastic.tally, x, y)
        sampler.record_batch(0, cfg.data.batch_size)
        if cfg.train.max_steps is not None and state.step >= cfg.train.max_steps:
            state.done, exhausted = True, False
            break
        if state.step % cfg.train.elastic_commit_steps == 0:
            elastic.commit()
        run.timer.start()
    state.train_time += sum(run.timer.take())
    elastic.commit()  # the epoch's steps are safe before its evaluation and checkpoint
    sums = elastic.epoch_sums if hvd.rank() == 0 else torch.zeros(3, dtype=torch.float64)
    position = sampler.processed_num / max(len(sampler.dataset), 1)
    tally = EpochTally(
        sums[:2].to(run.device),
        int(sums[2]),
        run.steps_per_epoch if exhausted else int(position * run.steps_per_epoch),
    )
    end_epoch(run, state, tally, time.perf_counter() - t_epoch)  # train sums of rank 0 = of all ranks
    state.epoch += 1
    sampler.set_epoch(state.epoch)
    elastic.epoch_sums.zero_()
    elastic.commit()
