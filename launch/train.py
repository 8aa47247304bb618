"""Entry point: ``python -m launch.train --config FILE [section.key=value ...] [--dry-run]``.

Also installed as ``kfac-hvd-train``.  Start it with ``horovodrun -np N ...`` or ``mpirun -np N ...``
(one process per GPU or per CPU slot); with ``train.engine=torch`` also ``torchrun`` or ``srun``; a single
process runs without a launcher.  See docs/LAUNCHER.md.

Exit codes: 0 success, 1 unexpected error, 2 bad input (configuration, data, checkpoint, ranks that
disagree, a run folder in use or holding another run; one line on stderr, the same on every rank),
3 the job cannot continue (a rank died or hung), 4 training diverged, 5 the run folder cannot be
written (disk full, quota, read-only).  See docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import sys

import torch.distributed

from launch.config.load import Config, data_problems, load_config, resolve_paths
from launch.dist.device import check_device
from launch.dist.engine import check_engine
from launch.dist.horovod_setup import check_controller, env_rank
from launch.errors import EXIT_ABORTED, EXIT_STORAGE, ConfigError, RunStop, StorageError, storage_problem
from launch.plan import dry_run
from launch.store.checkpoint import resume_candidates
from launch.store.run_folder import claim, release
from launch.training.elastic import check_elastic
from launch.training.run import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kfac-hvd-train",
        description="Distributed K-FAC (or SGD) training on Horovod, configured by a YAML file.",
        epilog="Example: horovodrun -np 2 --gloo -H localhost:2 python -m launch.train "
        "--config configs/fashion_mnist/small_resnet_kfac_lambda0.25.yaml train.epochs=1",
    )
    parser.add_argument("--config", required=True, help="YAML experiment file")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override a config value (parsed as YAML: null, 0.25, [30, 60], true)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan for train.world_size ranks and exit; launches nothing",
    )
    parser.add_argument("--plan-json", metavar="FILE", help="with --dry-run: also write the plan as JSON")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def config_error(err: ConfigError) -> int:
    print(str(err), file=sys.stderr, flush=True)
    return 2


def precheck(cfg: Config) -> None:
    """Everything that can be checked by each process alone, before Horovod starts (raises ConfigError).

    Files only rank 0 touches (the checkpoint to resume from, the run folder) are checked by the
    process the launcher announced as rank 0; the launcher ends the others when it exits.
    """
    problems = data_problems(cfg)
    if problems:
        raise problems[0]
    if env_rank() == 0:
        resume = cfg.checkpoint.resume
        if resume and resume != "auto":
            if os.path.isdir(resume):
                raise cfg.error("checkpoint.resume", f"is a directory, not a checkpoint file: {resume}")
            if not os.path.isfile(resume):
                raise cfg.error("checkpoint.resume", f"file not found: {resume}")
        for key, folder in (("log.dir", cfg.log.dir), ("checkpoint.dir", cfg.checkpoint.dir)):
            assert folder is not None  # resolve_paths filled it in
            problem = _unwritable(folder)
            if problem:
                raise cfg.error(key, problem)
    check_engine(cfg)
    if cfg.train.engine == "horovod":
        check_horovod(cfg)
        check_controller(cfg)
        check_elastic(cfg)
    check_device(cfg)  # CUDA present when asked for, precision supported, Horovod able to take CUDA tensors


def check_horovod(cfg: Config) -> None:
    """horovod.torch imports with its compiled extension, or ConfigError with one line.

    A Horovod built without PyTorch support does not raise on import: horovod.torch prints the problem
    and defines no ``init``. What it prints is kept off stdout and its first line becomes the reason.
    """
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            import horovod.torch as hvd
    except ImportError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            cfg.path, None, f"cannot import horovod.torch ({reason}); run 'make setup'"
        ) from None
    if not hasattr(hvd, "init"):
        reason = (printed.getvalue().strip().splitlines() or ["its PyTorch extension was not built"])[0]
        raise ConfigError(cfg.path, None, f"cannot import horovod.torch ({reason}); run 'make setup'")


def _unwritable(path: str) -> str | None:
    """Why the folder ``path`` cannot be created or written, or None (nothing is created here)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"cannot create {path}: {probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"cannot create or write {path}: {probe} is not writable"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        resolve_paths(cfg)
        if args.print_config:
            print(cfg.dump(), end="")
            return 0
        if args.dry_run:
            return dry_run(cfg, args.plan_json)
        precheck(cfg)
        assert cfg.checkpoint.dir is not None  # resolve_paths filled it in
        candidates = resume_candidates(cfg.checkpoint.resume, cfg.checkpoint.dir)
    except ConfigError as err:
        return config_error(err)
    locks = None
    try:
        if env_rank() == 0:  # the only rank that writes: it holds the run folder before writing anything
            locks, lines = claim(cfg, fresh=not candidates, command=" ".join(sys.argv))
            for line in lines:
                print(line, file=sys.stderr if line.startswith("warning") else sys.stdout, flush=True)
        return run(cfg, candidates)
    except ConfigError as err:  # also found while reading the data (e.g. class folders that differ)
        return config_error(err)
    except RunStop as stop:  # decided on every rank alike
        print(stop.message, file=sys.stderr, flush=True)
        return stop.code
    except StorageError as err:  # a checkpoint that could not be written, on every rank alike
        print(str(err), file=sys.stderr, flush=True)
        return EXIT_STORAGE
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        print(
            storage_problem(exc, f"cannot write {exc.filename or 'the run folder'}"),
            file=sys.stderr,
            flush=True,
        )
        return EXIT_STORAGE
    except Exception as exc:
        if not _peer_lost(exc):
            raise
        text = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"error: rank {env_rank()}: Horovod shut down: another rank failed, exited or stopped "
            f"answering ({type(exc).__name__}: {text[:300]})",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        # At once, as the watchdog does: a launcher ends the survivors moments after a rank dies, and an
        # orderly interpreter shutdown (Horovod's own included) would lose the exit code to its SIGTERM.
        os._exit(EXIT_ABORTED)
    finally:
        release(locks)


# Disk full, quota exceeded, read-only file system, file too large (RLIMIT_FSIZE).
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _peer_lost(exc: BaseException) -> bool:
    """A collective failed because a peer went away: Horovod's error (only where Horovod is loaded: a
    torch run never imports it), or torch.distributed's."""
    horovod_errors = sys.modules.get("horovod.common.exceptions")
    if horovod_errors is not None and isinstance(exc, horovod_errors.HorovodInternalError):
        return True
    return isinstance(exc, torch.distributed.DistError)


if __name__ == "__main__":
    sys.exit(main())
