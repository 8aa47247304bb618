"""The launcher as a 2-node job: 2 hosts x 2 ranks on two loopback hosts (tests/helpers/twohosts.py) under
horovodrun (Gloo) and under the cluster job scripts (mpirun over a hostfile, Horovod's MPI controller),
against the same run as 4 ranks on one host under the same controller."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from unittest import mock

import pytest
import torch
from tests.helpers.common import (
    BIN,
    CONFIGS,
    REPO,
    describe,
    horovod_ready,
    launch_cmd,
    read_jsonl,
)
from tests.helpers.common import env as base_env

from launch.config.load import load_config
from launch.dist.device import pick_device
from launch.dist.horovod_setup import check_controller, describe_layout
from launch.errors import ConfigError

pytestmark = [
    pytest.mark.skipif(not horovod_ready(), reason="horovod not installed"),
    pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed"),
]

RANKS_PER_HOST = 2
WORLD = 2 * RANKS_PER_HOST
STEPS = 3
DEMO = os.path.join(CONFIGS, "fashion_mnist", "small_resnet_kfac_lambda0.25.yaml")
# The demo's K-FAC run (lambda = 0.25) on a small subset, 3 steps of 4 ranks x 16 images. No tensor fusion:
# which tensors share a fused allreduce depends on timing, and with it the order of each sum, which
# K-FAC's inverses amplify from fp32 round-off to ~1e-3 in the weights within a few steps.
TINY = {
    "data.train_subset": "256",
    "data.val_subset": "64",
    "data.batch_size": "16",
    "model.width": "8",
    "log.progress": "false",
    "log.tensorboard": "false",
    "horovod.fusion_threshold_mb": "0",
}


def fashion_args(run_dir: str, *extra: str) -> list[str]:
    return [
        "--config",
        DEMO,
        f"log.dir={run_dir}",
        *(f"{k}={v}" for k, v in TINY.items()),
        f"train.world_size={WORLD}",
        f"train.max_steps={STEPS}",
        *extra,
    ]


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), map_location="cpu", weights_only=False)
    return {k: v for k, v in ckpt["model"].items() if v.is_floating_point()}


def decisions(run_dir: str) -> list[dict]:
    """Per step, each layer's K-FAC decision: (due, interval)."""
    records = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "kfac" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [{name: (e["due"], e["interval"]) for name, e in r["kfac"]["layers"].items()} for r in records]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_like_reference(run_dir: str, reference: str) -> float:
    """Same seed, same sharding, same reductions: the same K-FAC decisions at every step and the same
    weights to fp32 round-off. Returns max |dw|."""
    assert decisions(run_dir) == decisions(reference)
    assert any(not due for step in decisions(reference)[1:] for due, _ in step.values())  # lambda acted
    ref = final_weights(reference)
    delta = max_abs_diff(final_weights(run_dir), ref)
    assert delta <= 1e-6 * max(float(v.abs().max()) for v in ref.values())
    return delta


def assert_two_nodes(stdout: str, how: str, controller: str, first: str = "", second: str = "") -> None:
    """Rank 0's picture of the world: two nodes of two ranks, local ranks 0-1 and cross ranks 0, 1 of 2."""
    assert f"world: {WORLD} rank(s) on 2 host(s); init via {how}, controller {controller}" in stdout
    assert f"{first}: 2 rank(s) [0-1]; local ranks [0-1] of 2; cross rank 0 of 2; devices cpu" in stdout
    assert f"{second}: 2 rank(s) [2-3]; local ranks [0-1] of 2; cross rank 1 of 2; devices cpu" in stdout
    assert "warning" not in stdout


def one_host(tmp_path_factory, name: str, launcher: list[str]) -> str:
    run_dir = str(tmp_path_factory.mktemp(name) / "run")
    proc = run(launcher + launch_cmd(fashion_args(run_dir)), base_env())
    assert proc.returncode == 0, describe(proc)
    assert f"world: {WORLD} rank(s) on 1 host(s)" in proc.stdout
    assert f"local ranks [0-3] of {WORLD}; cross rank 0 of 1" in proc.stdout
    return run_dir


@pytest.fixture(scope="module")
def gloo_reference(tmp_path_factory) -> str:
    """The same run as 4 ranks on one host, Gloo."""
    horovodrun = [os.path.join(BIN, "horovodrun"), "-np", str(WORLD), "--gloo", "-H", f"localhost:{WORLD}"]
    return one_host(tmp_path_factory, "gloo_one_host", horovodrun)


@pytest.fixture(scope="module")
def mpi_reference(tmp_path_factory) -> str:
    """The same run as 4 ranks on one host, MPI."""
    mpirun = [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(WORLD)]
    mpirun += ["-bind-to", "none", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
    return one_host(tmp_path_factory, "mpi_one_host", mpirun)


def test_gloo_two_hosts_equal_one_host(two_hosts, gloo_reference, tmp_path):
    run_dir = str(tmp_path / "gloo")
    horovodrun = [os.path.join(BIN, "horovodrun"), "-np", str(WORLD), "--gloo"]
    cmd = horovodrun + two_hosts.horovodrun_args(RANKS_PER_HOST) + launch_cmd(fashion_args(run_dir))
    proc = run(cmd, two_hosts.launch_env(base_env()))
    assert proc.returncode == 0, describe(proc)
    assert_two_nodes(proc.stdout, "horovod", "Gloo", *two_hosts.hosts)
    assert "horovod settings on every rank: HOROVOD_FUSION_THRESHOLD=0" in proc.stdout
    print(f"gloo 2x2 vs 1x4: max |dw| = {assert_like_reference(run_dir, gloo_reference):.3g}")


def test_device_of_each_rank_follows_its_local_rank():
    """pick_device, fed the local ranks of a 2-node job (rank r: local rank r % 2) on nodes of 4 GPUs: the
    second node's ranks take cuda:0 and cuda:1 as the first node's (the global rank would give 2 and 3)."""
    bound: list[int] = []
    with mock.patch.multiple(
        torch.cuda,
        is_available=lambda: True,
        device_count=lambda: 4,
        set_device=bound.append,
        current_device=lambda: bound[-1],
    ):
        chosen = [str(pick_device("cuda", local_rank)) for local_rank in (0, 1, 0, 1)]
    assert chosen == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_hierarchical_allreduce_refused_under_gloo(monkeypatch):
    """Before Horovod starts, from what horovodrun --gloo sets for its ranks (HOROVOD_CONTROLLER=gloo);
    under mpirun the same config passes."""
    cfg = load_config(DEMO, ["horovod.hierarchical_allreduce=true"])
    monkeypatch.setenv("HOROVOD_CONTROLLER", "gloo")
    with pytest.raises(ConfigError) as err:
        check_controller(cfg)
    assert str(err.value) == (
        f"config error: {DEMO} (command line): horovod.hierarchical_allreduce: true needs Horovod's MPI "
        "controller (launch with mpirun, or horovodrun --mpi); under Gloo (horovodrun --gloo) Horovod would "
        "ignore it: set it to false or null"
    )
    monkeypatch.delenv("HOROVOD_CONTROLLER")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    check_controller(cfg)


# --------------------------------------------------------------------------------------------------
# The job scripts, with their scheduler's variables naming the two loopback hosts
# --------------------------------------------------------------------------------------------------
PBS_KINDS = ("abci", "pbs")  # ABCI 3.0 is PBS Professional; its scripts run the PBS script's body


def pbs_nodefile(folder, hosts, per_node: int) -> str:
    """$PBS_NODEFILE as PBS Professional writes it: each node once per MPI process (mpiprocs)."""
    path = folder / "pbs_nodefile"
    path.write_text("".join(f"{h}\n" * per_node for h in hosts))
    return str(path)


def scheduler_env(kind: str, two_hosts, folder) -> dict[str, str]:
    hosts = two_hosts.hosts
    if kind in PBS_KINDS:  # select=2:mpiprocs=2
        path = pbs_nodefile(folder, hosts, RANKS_PER_HOST)
        return {"PBS_NODEFILE": path, "PBS_JOBID": "1.pbs", "PBS_O_WORKDIR": REPO}
    assert kind == "slurm"  # the compressed node list; no scontrol here, hostfile.py expands it
    prefix = os.path.commonprefix(list(hosts))
    nodelist = f"{prefix}[{hosts[0][len(prefix) :]}-{hosts[1][len(prefix) :]}]"
    return {
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_TASKS_PER_NODE": f"{RANKS_PER_HOST}(x2)",
        "SLURM_NTASKS": str(WORLD),
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_CPUS_PER_TASK": "1",
        "LAUNCH": "mpirun",
        "WORKERS": "0",  # as the reference: workers draw their own augmentation randomness
    }


SCRIPTS = {
    "abci": "scripts/abci/kfac_resnet50_128gpu.sh",  # ABCI 3.0; the Grid Engine scripts went with ABCI 2.0
    "pbs": "scripts/pbs/kfac_resnet50_128gpu.sh",
    "slurm": "scripts/slurm/kfac_resnet50.sbatch",
}


def job_env(scheduler: dict[str, str], tmp_path, extra: list[str]) -> dict[str, str]:
    """What a job script reads, sized down: 2 ranks a node, 3 steps of the demo config."""
    return {
        **base_env(),
        **scheduler,
        "CONFIG": DEMO,
        "EXTRA": " ".join(extra),
        "VENV": os.path.join(REPO, ".venv"),
        "IMAGENET": str(tmp_path / "imagenet"),  # not read: the config's data set is Fashion-MNIST
        "GPUS_PER_NODE": str(RANKS_PER_HOST),
        "MAX_STEPS": str(STEPS),
        "HOROVOD_CYCLE_TIME": "2",  # the job's own setting: forwarded to every rank
        "TMPDIR": str(tmp_path),
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    }


# The PBS scripts' one line where the module command is absent (as here): the module step is skipped.
NO_MODULES = "no /etc/profile.d/modules.sh: MODULES not loaded"


@pytest.mark.parametrize("kind", sorted(SCRIPTS))
def test_job_script_two_hosts_equal_one_host(kind, two_hosts, mpi_reference, tmp_path):
    run_dir = str(tmp_path / "run")
    extra = [f"log.dir={run_dir}", *(f"{k}={v}" for k, v in TINY.items())]
    if kind == "pbs":
        extra.append("horovod.hierarchical_allreduce=true")
    env = job_env(scheduler_env(kind, two_hosts, tmp_path), tmp_path, extra)
    proc = run(["bash", SCRIPTS[kind]], two_hosts.launch_env(env))
    assert proc.returncode == 0, describe(proc)
    assert f"{WORLD} ranks" in proc.stdout.splitlines()[0]
    if kind in PBS_KINDS and not os.path.exists("/etc/profile.d/modules.sh"):
        assert [line for line in proc.stderr.splitlines() if "MODULES" in line] == [
            f"{NO_MODULES} (python/3.12/3.12.9 cuda/12.6/12.6.1 cudnn/9.5/9.5.1 nccl/2.23/2.23.4-1 hpcx/2.20)"
        ]
    assert_two_nodes(proc.stdout, "mpi4py", "MPI")
    knobs = "HOROVOD_CYCLE_TIME=2, HOROVOD_FUSION_THRESHOLD=0"
    if kind == "pbs":
        knobs += ", HOROVOD_HIERARCHICAL_ALLREDUCE=1"
    assert f"horovod settings on every rank: {knobs}" in proc.stdout
    assert not [p for p in os.listdir(tmp_path) if p.startswith("hosts.")]  # the hostfile is removed
    print(f"{kind} 2x2 vs 1x4: max |dw| = {assert_like_reference(run_dir, mpi_reference):.3g}")


PBS_SCRIPTS = (
    "scripts/abci/kfac_resnet50_128gpu.sh",
    "scripts/abci/sgd_resnet50_128gpu.sh",
    "scripts/pbs/kfac_resnet50_128gpu.sh",
)


@pytest.mark.parametrize("script", PBS_SCRIPTS)
def test_pbs_job_without_mpiprocs_stops_with_one_line(script, tmp_path):
    """A select without mpiprocs lists each node once: the script stops before mpirun, naming the fix,
    rather than run one rank on each node."""
    nodefile = pbs_nodefile(tmp_path, ("node1", "node2"), 1)
    scheduler = {"PBS_NODEFILE": nodefile, "PBS_JOBID": "1.pbs", "PBS_O_WORKDIR": REPO}
    proc = run(["bash", script], job_env(scheduler, tmp_path, []))
    assert proc.returncode == 2, describe(proc)
    assert proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if not line.startswith(NO_MODULES)]
    assert errors == [
        "scripts/pbs/kfac_resnet50_128gpu.sh: $PBS_NODEFILE lists node node1 1 time(s), not GPUS_PER_NODE=2: "
        "submit with -l select=N:mpiprocs=2 (PBS lists each node once per MPI process)"
    ]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("hosts.")]


def test_abci_scripts_ask_for_whole_h200_nodes_with_one_rank_per_gpu():
    """ABCI 3.0: 16 rt_HF nodes x 8 H200 = 128 ranks, as the paper's 128 x 128 = 16,384; the SGD job the
    SGD config. The directives are read by qsub only, so the tests that run the scripts do not see them."""
    for script in PBS_SCRIPTS:
        with open(os.path.join(REPO, script), encoding="utf-8") as fh:
            text = fh.read()
        directives = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#PBS ")]
        assert "-q rt_HF" in directives and "-l select=16:mpiprocs=8" in directives, script
        assert "#$" not in text and "SGE_" not in text, script  # no Grid Engine left
    with open(os.path.join(REPO, PBS_SCRIPTS[1]), encoding="utf-8") as fh:
        assert "CONFIG=${CONFIG:-configs/imagenet/resnet50_sgd_bs16k.yaml}" in fh.read()
    for name in ("resnet50_kfac_bs16k_lambda0.25.yaml", "resnet50_sgd_bs16k.yaml"):
        cfg = load_config(os.path.join(CONFIGS, "imagenet", name), [])
        assert cfg.data.batch_size * 16 * 8 == 16384, name
        assert cfg.train.precision == "bf16", name  # H200 has bf16: the scripts pass no precision


def _hostfile_module():
    spec = importlib.util.spec_from_file_location("slurm_hostfile", os.path.join(REPO, SLURM_HOSTFILE))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SLURM_HOSTFILE = "scripts/slurm/hostfile.py"


def test_slurm_nodelist_expanded_without_scontrol():
    hf = _hostfile_module()
    assert hf.expand_nodelist("gpu[08-10,12],login2") == ["gpu08", "gpu09", "gpu10", "gpu12", "login2"]
    assert hf.expand_nodelist("r[1-2]-n[0-1]") == ["r1-n0", "r1-n1", "r2-n0", "r2-n1"]
    assert hf.expand_nodelist("127.0.0.[2-3]") == ["127.0.0.2", "127.0.0.3"]
    assert hf.expand_tasks_per_node("8(x3),4") == [8, 8, 8, 4]
    for bad in ("gpu[1-", "gpu[3-1]", "gpu[a-b]"):
        with pytest.raises(ValueError):
            hf.expand_nodelist(bad)


def test_slurm_hostfile_one_line_per_node_and_one_line_errors(tmp_path):
    env = {
        **base_env(),
        "PATH": "/usr/bin:/bin",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_TASKS_PER_NODE": "2,1",
    }
    out = run([shutil.which("python3") or "python3", SLURM_HOSTFILE], env)
    assert out.returncode == 0 and out.stdout.splitlines() == ["n1 slots=2", "n2 slots=1"]
    env["SLURM_TASKS_PER_NODE"] = "2(x3)"
    out = run([shutil.which("python3") or "python3", SLURM_HOSTFILE], env)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "hostfile.py: SLURM_TASKS_PER_NODE='2(x3)' gives 3 node(s), SLURM_JOB_NODELIST='n[1-2]' 2"
    ]


def test_layout_groups_nodes_that_share_a_host_name_and_flags_unforwarded_settings():
    """Two nodes named alike (as under mpirun on the loopback hosts) are told apart by cross rank; a
    setting only the first node's ranks were started with is named with the ranks that lack it."""
    layout = [
        {"rank": r, "host": "vm", "local_rank": r % 2, "local_size": 2, "cross_rank": r // 2, "cross_size": 2}
        | {
            "device": "cpu",
            "announced_local_rank": r % 2,
            "knobs": {"HOROVOD_CYCLE_TIME": "2"} if r < 2 else {},
        }
        for r in range(WORLD)
    ]
    text = describe_layout(layout, "mpi4py", "MPI").splitlines()
    assert text[:3] == [
        "world: 4 rank(s) on 2 host(s); init via mpi4py, controller MPI",
        "  vm: 2 rank(s) [0-1]; local ranks [0-1] of 2; cross rank 0 of 2; devices cpu",
        "  vm: 2 rank(s) [2-3]; local ranks [0-1] of 2; cross rank 1 of 2; devices cpu",
    ]
    assert text[3] == (
        "warning: ranks started with different Horovod settings: HOROVOD_CYCLE_TIME is '2' on ranks [0-1], "
        "unset on ranks [2-3] (a job script that sets one must forward it to every node, e.g. mpirun -x NAME)"
    )
    layout[3]["announced_local_rank"] = 3  # the launcher's local rank and Horovod's disagree
    assert "warning: rank 3 was started as local rank 3 but Horovod made it local rank 1" in describe_layout(
        layout, "mpi4py", "MPI"
    )
