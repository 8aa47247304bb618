"""Horovod start-up: tuning knobs, the controller, initialisation under horovodrun or mpirun, the world layout."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

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
    if hcfg.fixed_fusion and hcfg.fusion_threshold_mb != 0:  # without fusion every tensor travels alone
        env["HOROVOD_DISABLE_GROUP_FUSION"] = "1"
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


# Horovod's fusion buffer when HOROVOD_FUSION_THRESHOLD is unset.
DEFAULT_FUSION_BYTES = 64 * 2**20


def gradient_groups(hcfg: Any, model: torch.nn.Module) -> list[list[torch.nn.Parameter]] | None:
    """The fixed groups of the gradient allreduce (``DistributedOptimizer(groups=...)``), or None to let
    Horovod fuse the gradients that are ready in each cycle.

    Which gradients share a fusion buffer decides where each one lies in it, and with that the order in
    which a ring allreduce sums its elements at 3+ ranks; fixed groups (each kept to itself by
    HOROVOD_DISABLE_GROUP_FUSION=1) make that order the same in every run. The parameters are taken in
    reverse order (the order backward produces their gradients) into groups of at most one fusion buffer,
    so a group starts as soon as its last gradient is ready, as a fused message would.
    """
    threshold = os.environ.get("HOROVOD_FUSION_THRESHOLD")
    limit = int(threshold) if threshold is not None else DEFAULT_FUSION_BYTES
    if not hcfg.fixed_fusion or limit == 0:
        return None  # no fixed groups asked for, or no fusion at all: every gradient travels alone
    groups: list[list[torch.nn.Parameter]] = []
    size = limit
    for param in reversed([p for p in model.parameters() if p.requires_grad]):
        nbytes = param.numel() * param.element_size()
        if size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(param)
        size += nbytes
    return groups


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
        "RANK",  # torchrun
    ):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 0


# The local rank as launchers announce it before Horovod starts (the GPU checks of the pre-checks use it).
LOCAL_RANK_ENV = (
    "HOROVOD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
    "PMI_LOCAL_RANK",
    "LOCAL_RANK",  # torchrun
)


def env_local_rank() -> int | None:
    """This process's local rank as the launcher announced it (before initialisation); None if unknown."""
    for key in LOCAL_RANK_ENV:
        try:
            return int(os.environ[key])
        except (KeyError, ValueError):
            continue
    return None


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


# The Horovod settings a rank reads from its environment at start-up (the config's ``horovod`` section sets
# them through :func:`horovod_env`; a job script may set them itself and must then forward them to every
# node, e.g. ``mpirun -x``). Each rank reports its own, so a setting that reached only some nodes shows.
HOROVOD_KNOBS = (
    "HOROVOD_FUSION_THRESHOLD",
    "HOROVOD_DISABLE_GROUP_FUSION",
    "HOROVOD_CYCLE_TIME",
    "HOROVOD_TIMELINE",
    "HOROVOD_TIMELINE_MARK_CYCLES",
    "HOROVOD_HIERARCHICAL_ALLREDUCE",
    "HOROVOD_HIERARCHICAL_ALLGATHER",
    "HOROVOD_AUTOTUNE",
    "HOROVOD_STALL_CHECK_DISABLE",
    "HOROVOD_STALL_CHECK_TIME_SECONDS",
    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
    "HOROVOD_GLOO_TIMEOUT_SECONDS",
)


def host_name() -> str:
    """The name of this rank's host: horovodrun's name for it (its ``-H`` entry) where set, else the
    machine's host name."""
    return os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()


def world_layout(hvd: Any, device: str, extra: dict | None = None) -> list[dict]:
    """Collective: every rank's place in the job (rank, host, local and cross rank and size), device,
    pid, Horovod settings and ``extra``, in rank order."""
    me = {
        "rank": hvd.rank(),
        "host": host_name(),
        "local_rank": hvd.local_rank(),
        "announced_local_rank": env_local_rank(),
        "local_size": hvd.local_size(),
        "cross_rank": hvd.cross_rank(),
        "cross_size": hvd.cross_size(),
        "device": device,
        "pid": os.getpid(),
        "knobs": {k: os.environ[k] for k in HOROVOD_KNOBS if k in os.environ},
        **(extra or {}),
    }
    return sorted(hvd.allgather_object(me), key=lambda r: r["rank"])


def nodes(layout: list[dict]) -> list[list[dict]]:
    """The ranks of each node, in order of their lowest rank.

    Horovod's local communicator defines a node (ranks that share memory under MPI, one ``-H`` entry under
    Gloo); with equal local sizes everywhere a node's ranks share one cross rank per local rank, and the
    cross rank of its local rank k is the node's index, so (host, cross rank) names it even where hosts
    share a name. Otherwise the host name does.
    """
    same_size = len({r.get("local_size") for r in layout}) == 1
    groups: dict[tuple, list[dict]] = {}
    for r in layout:
        key = (r["host"], r.get("cross_rank")) if same_size else (r["host"], None)
        groups.setdefault(key, []).append(r)
    return sorted(groups.values(), key=lambda ranks: min(x["rank"] for x in ranks))


def describe_layout(layout: list[dict], how: str, controller: str | None) -> str:
    grouped = nodes(layout)
    head = f"world: {len(layout)} rank(s) on {len(grouped)} host(s); init via {how}" + (
        f", controller {controller}" if controller else ""
    )
    lines = [head]
    for ranks in grouped:
        devs = sorted({r["device"] for r in ranks})
        ids = [r["rank"] for r in ranks]
        lines.append(
            f"  {ranks[0]['host']}: {len(ranks)} rank(s) {_ranges(ids)}; local ranks "
            f"{_ranges([r['local_rank'] for r in ranks])} of {_values(ranks, 'local_size')}; cross rank "
            f"{_values(ranks, 'cross_rank')} of {_values(ranks, 'cross_size')}; devices {', '.join(devs)}"
        )
    moved = [r for r in layout if r.get("announced_local_rank") not in (None, r["local_rank"])]
    if moved:
        r = moved[0]
        lines.append(
            f"warning: rank {r['rank']} was started as local rank {r['announced_local_rank']} but Horovod "
            f"made it local rank {r['local_rank']} ({len(moved)} rank(s) so): the pre-checks looked at "
            f"another GPU than the one it uses"
        )
    knobs = describe_knobs(layout)
    if knobs:
        lines.append(knobs)
    return "\n".join(lines)


def _values(ranks: list[dict], key: str) -> str:
    """The value of ``key`` the ranks share, or all their values when they differ."""
    values = sorted({r[key] for r in ranks})
    return str(values[0]) if len(values) == 1 else "{" + ",".join(map(str, values)) + "}"


def describe_knobs(layout: list[dict]) -> str | None:
    """The Horovod settings of the environment, when any: one line if every rank has the same, otherwise
    a warning naming the setting and the ranks that lack it or differ."""
    seen = [r.get("knobs", {}) for r in layout]
    names = sorted({k for knobs in seen for k in knobs})
    if not names:
        return None
    differ = [k for k in names if len({knobs.get(k) for knobs in seen}) > 1]
    if not differ:
        return "horovod settings on every rank: " + ", ".join(f"{k}={seen[0][k]}" for k in names)
    parts = []
    for k in differ:
        by_value: dict[str | None, list[int]] = {}
        for r, knobs in zip(layout, seen, strict=True):
            by_value.setdefault(knobs.get(k), []).append(r["rank"])
        parts.append(
            f"{k} is "
            + ", ".join(
                f"{'unset' if v is None else repr(v)} on ranks {_ranges(ids)}" for v, ids in by_value.items()
            )
        )
    return (
        "warning: ranks started with different Horovod settings: "
        + "; ".join(parts)
        + " (a job script that sets one must forward it to every node, e.g. mpirun -x NAME)"
    )


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


def expected_controller() -> str | None:
    """The controller Horovod will take in this process, as the launcher's environment says before
    initialisation: 'Gloo' under horovodrun --gloo, 'MPI' under mpirun; None when not announced."""
    chosen = {"gloo": "Gloo", "mpi": "MPI"}.get(os.environ.get("HOROVOD_CONTROLLER", "").lower())
    if chosen:
        return chosen
    if "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ:
        return "Gloo"
    if started_by_mpi():
        return "MPI"
    return None


def check_controller(cfg: Any) -> None:
    """The ``horovod`` section asks only for what the controller can do (raises ConfigError).

    Horovod's hierarchical allreduce is NCCL within a node and MPI across nodes: it exists only under
    the MPI controller, and Horovod ignores the setting under Gloo without a word.
    """
    controller = expected_controller()
    if cfg.horovod.hierarchical_allreduce and controller == "Gloo":
        raise cfg.error(
            "horovod.hierarchical_allreduce",
            "true needs Horovod's MPI controller (launch with mpirun, or horovodrun --mpi); under "
            "Gloo (horovodrun --gloo) Horovod would ignore it: set it to false or null",
        )


def controller_name(hvd: Any) -> str | None:
    try:
        if hvd.mpi_enabled():
            return "MPI"
        if hvd.gloo_enabled():
            return "Gloo"
    except Exception:
        return None
    return None
