"""Horovod start-up: tuning knobs, initialisation under horovodrun or mpirun, the world layout."""

from __future__ import annotations

import os
import socket
from typing import Any

# Environment variables set by MPI launchers (Open MPI, MPICH / Intel MPI / PMI, PMIx, MVAPICH, Slurm).
MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
# Set by horovodrun for its Gloo controller.
GLOO_ENV = ("HOROVOD_GLOO_RENDEZVOUS_ADDR", "HOROVOD_CONTROLLER")


def horovod_env(hcfg: Any) -> dict[str, str]:
    """Environment variables that carry the ``horovod`` section to Horovod's core (read at init).

    Values already in the environment win, so a job script can still override a config.
    """
    env = {}
    if hcfg.fusion_threshold_mb is not None:
        env["HOROVOD_FUSION_THRESHOLD"] = str(int(hcfg.fusion_threshold_mb * 1024 * 1024))
    if hcfg.cycle_time_ms is not None:
        env["HOROVOD_CYCLE_TIME"] = f"{hcfg.cycle_time_ms:g}"
    if hcfg.timeline:
        env["HOROVOD_TIMELINE"] = os.path.abspath(hcfg.timeline)
    if hcfg.timeline_mark_cycles:
        env["HOROVOD_TIMELINE_MARK_CYCLES"] = "1"
    if hcfg.hierarchical_allreduce is not None:
        env["HOROVOD_HIERARCHICAL_ALLREDUCE"] = "1" if hcfg.hierarchical_allreduce else "0"
    if hcfg.autotune:
        env["HOROVOD_AUTOTUNE"] = "1"
    if hcfg.stall_check_s is not None:
        if hcfg.stall_check_s == 0:
            env["HOROVOD_STALL_CHECK_DISABLE"] = "1"
        else:
            env["HOROVOD_STALL_CHECK_TIME_SECONDS"] = str(hcfg.stall_check_s)
    if hcfg.stall_shutdown_s is not None:
        env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = str(hcfg.stall_shutdown_s)
    if hcfg.gloo_timeout_s is not None:
        env["HOROVOD_GLOO_TIMEOUT_SECONDS"] = str(hcfg.gloo_timeout_s)
    return env


# Set for each task by srun, or by horovodrun for any controller.
TASK_ENV = ("SLURM_PROCID", "HOROVOD_RANK")


def under_launcher() -> bool:
    """Started by horovodrun, mpirun or srun: their output goes through a pipe, prefixed line by line."""
    return any(k in os.environ for k in GLOO_ENV + MPI_ENV + TASK_ENV)


def started_by_mpi() -> bool:
    if any(k in os.environ for k in GLOO_ENV):
        return False
    return any(k in os.environ for k in MPI_ENV)


def env_rank() -> int:
    """This process's rank as the launcher announced it (before initialisation); 0 if unknown."""
    for key in (
        "HOROVOD_RANK",
        "OMPI_COMM_WORLD_RANK",
        "PMIX_RANK",
        "PMI_RANK",
        "MV2_COMM_WORLD_RANK",
        "SLURM_PROCID",
    ):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 0


def init_horovod(hcfg: Any) -> tuple[Any, str]:
    """Set the knobs, initialise Horovod; returns (hvd, how) with how = 'mpi4py' or 'horovod'."""
    for key, value in horovod_env(hcfg).items():
        os.environ.setdefault(key, value)
    import horovod.torch as hvd

    how = hcfg.init
    if how == "auto":
        how = "mpi4py" if started_by_mpi() else "horovod"
    if how == "mpi4py":
        from mpi4py import MPI

        hvd.init(comm=MPI.COMM_WORLD)
    else:
        hvd.init()
    return hvd, how


def world_layout(hvd: Any, device: str, extra: dict | None = None) -> list[dict]:
    """Collective: (rank, host, local rank, device, pid, ``extra``) of every rank, in rank order."""
    me = {
        "rank": hvd.rank(),
        "host": socket.gethostname(),
        "local_rank": hvd.local_rank(),
        "device": device,
        "pid": os.getpid(),
        **(extra or {}),
    }
    return sorted(hvd.allgather_object(me), key=lambda r: r["rank"])


def describe_layout(layout: list[dict], how: str, controller: str | None) -> str:
    hosts: dict[str, list[dict]] = {}
    for r in layout:
        hosts.setdefault(r["host"], []).append(r)
    head = f"world: {len(layout)} rank(s) on {len(hosts)} host(s); init via {how}" + (
        f", controller {controller}" if controller else ""
    )
    lines = [head]
    for host, ranks in hosts.items():
        devs = sorted({r["device"] for r in ranks})
        ids = [r["rank"] for r in ranks]
        lines.append(f"  {host}: {len(ranks)} rank(s) {_ranges(ids)}; devices {', '.join(devs)}")
    return "\n".join(lines)


def _ranges(ids: list[int]) -> str:
    ids = sorted(ids)
    out, start, prev = [], ids[0], ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return "[" + ",".join(out) + "]"


def controller_name(hvd: Any) -> str | None:
    try:
        if hvd.mpi_enabled():
            return "MPI"
        if hvd.gloo_enabled():
            return "Gloo"
    except Exception:
        return None
    return None
