"""Two "hosts" on one machine for multi-node tests: an sshd on two loopback addresses, a key made for it.

``127.0.0.2`` and ``127.0.0.3`` are not addresses of any interface (``lo`` carries ``127.0.0.1/8``, which
routes them but lists only ``127.0.0.1``), so Horovod's ``horovodrun`` (it compares a host's address with
``psutil.net_if_addrs()``) and Open MPI's ``mpirun`` (it compares with its interface list and its node
name) both take them for remote hosts and reach them over ssh. The sshd listens on those two addresses
only, on an unprivileged port, with its own host key, config and pid file in a temporary folder: no PAM,
no passwords, only the test's client key, for the current user. The client side is an ``ssh`` wrapper
first on ``PATH`` that reads a generated ``ssh_config`` (the port, the key, a ``known_hosts`` holding the
host key), so neither the user's ``~/.ssh`` nor the system's ssh configuration is read or written.

``two_hosts`` (session-scoped, in conftest.py) starts it for the tests that ask for it and stops it at the
end of the session. Where ``sshd`` is missing the tests that need it are skipped, or fail under
``KFAC_HVD_STRICT=1`` (``scripts/install_system.sh`` installs ``openssh-server``).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field

HOSTS = ("127.0.0.2", "127.0.0.3")
SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def sshd_path() -> str | None:
    for path in (shutil.which("sshd"), *SSHD_CANDIDATES):
        if path and os.access(path, os.X_OK):
            return path
    return None


def sshd_problem() -> str | None:
    """Why two loopback hosts cannot be set up here, or None when they can."""
    if sshd_path() is None:
        return "sshd is not installed (apt-get install openssh-server)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (apt-get install openssh-client)"
    return None


@dataclass
class TwoHosts:
    """What a test needs to address two hosts: names, the ssh settings, the environment to launch with."""

    hosts: tuple[str, str]
    port: int
    identity_file: str  # the client's private key
    ssh_config: str  # a config for ``ssh -F``: port, user, key, known_hosts for both hosts
    bin_dir: str  # holds ``ssh``, a wrapper that runs the system's ssh with ``-F ssh_config``
    folder: str
    env: dict[str, str] = field(default_factory=dict)  # add to a launcher's environment (see launch_env)

    def horovodrun_args(self, slots: int) -> list[str]:
        """``horovodrun`` options for ``slots`` ranks on each host, over ssh, on the loopback interface."""
        return [
            "-H",
            ",".join(f"{h}:{slots}" for h in self.hosts),
            "--ssh-port",
            str(self.port),
            "--ssh-identity-file",
            self.identity_file,
            "--network-interface",
            "lo",
        ]

    def mpirun_args(self, slots: int) -> list[str]:
        """``mpirun`` options for ``slots`` ranks on each host: Open MPI's ssh launcher with the test's ssh
        config, its TCP transports on ``lo`` (excluded by default)."""
        return [
            "-H",
            ",".join(f"{h}:{slots}" for h in self.hosts),
            *mpi_mca_args(self.ssh_config),
        ]

    def hostfile(self, path: str, slots: int | None = None) -> str:
        """A hostfile of the two hosts (Open MPI's syntax, ``slots=`` when given); returns ``path``."""
        with open(path, "w", encoding="utf-8") as fh:
            for h in self.hosts:
                fh.write(f"{h} slots={slots}\n" if slots else f"{h}\n")
        return path

    def launch_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with the wrapper first on PATH and Open MPI's
        settings as ``OMPI_MCA_*`` variables, for commands that run ``mpirun`` themselves (job scripts)."""
        out = dict(os.environ if base is None else base)
        out.update(self.env)
        out["PATH"] = self.bin_dir + os.pathsep + out.get("PATH", "")
        return out

    def ssh(self, host: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", "-F", self.ssh_config, host, command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


# Open MPI's settings for two hosts on one machine; as command-line options and as environment variables.
def _mca(ssh_config: str) -> dict[str, str]:
    return {
        "plm_rsh_agent": "ssh",
        "plm_rsh_args": f"-F {ssh_config}",
        # No shared-memory transport: both "nodes" would name their segments alike (host name, job, local
        # rank) in one /dev/shm and overwrite each other's; between nodes Open MPI uses TCP anyway.
        "btl": "tcp,self",
        "btl_tcp_if_include": "lo",
        "oob_tcp_if_include": "lo",
        # The daemons started over ssh too: no topology in shared memory (tests/conftest.py says why).
        "rtc_hwloc_vmhole": "none",
    }


def mpi_mca_args(ssh_config: str) -> list[str]:
    return [x for key, value in _mca(ssh_config).items() for x in ("--mca", key, value)]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _keygen(path: str) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kfac-hvd-test", "-f", path],
        check=True,
        capture_output=True,
    )
    with open(path + ".pub", encoding="utf-8") as fh:
        return fh.read().strip()


def _write(path: str, text: str, mode: int = 0o600) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, mode)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class SshdServer:
    """An sshd in ``folder`` on the two loopback hosts; ``start()`` returns a :class:`TwoHosts`."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> TwoHosts:
        problem = sshd_problem()
        sshd = sshd_path()
        if problem or sshd is None:
            raise RuntimeError(problem)
        f = self.folder
        os.makedirs(f, exist_ok=True)
        user = getpass.getuser()
        host_pub = _keygen(os.path.join(f, "host_ed25519"))
        client_pub = _keygen(os.path.join(f, "client_ed25519"))
        _write(os.path.join(f, "authorized_keys"), client_pub + "\n")
        port = _free_port(HOSTS[0])
        listen = "".join(f"ListenAddress {h}:{port}\n" for h in HOSTS)
        _write(
            os.path.join(f, "sshd_config"),
            listen + f"HostKey {f}/host_ed25519\n"
            f"PidFile {f}/sshd.pid\n"
            f"AuthorizedKeysFile {f}/authorized_keys\n"
            f"AllowUsers {user}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"  # the keys live in a temporary folder, not under ~/.ssh
            "PermitRootLogin prohibit-password\n"
            "PermitUserEnvironment no\n"
            "X11Forwarding no\n"
            "AllowTcpForwarding no\n"
            "AllowAgentForwarding no\n"
            "PrintMotd no\n"
            "LogLevel ERROR\n",
        )
        known = "".join(f"[{h}]:{port} {host_pub}\n" for h in HOSTS)
        _write(os.path.join(f, "known_hosts"), known, 0o644)
        ssh_config = os.path.join(f, "ssh_config")
        _write(
            ssh_config,
            f"Host {' '.join(HOSTS)}\n"
            f"  Port {port}\n"
            f"  User {user}\n"
            f"  IdentityFile {f}/client_ed25519\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {f}/known_hosts\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
            "  LogLevel ERROR\n",
            0o644,
        )
        bin_dir = os.path.join(f, "bin")
        os.makedirs(bin_dir, exist_ok=True)
        system_ssh = shutil.which("ssh")
        _write(os.path.join(bin_dir, "ssh"), f'#!/bin/sh\nexec {system_ssh} -F {ssh_config} "$@"\n', 0o755)

        if os.geteuid() == 0:
            # sshd started as root needs its privilege-separation folder (made by the Debian service unit).
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", os.path.join(f, "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(f, "sshd.log"), "w"),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not all(_listening(h, port) for h in HOSTS):
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self._log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not listen on {HOSTS} port {port} in {timeout:.0f} s")
            time.sleep(0.05)
        two = TwoHosts(
            hosts=HOSTS,
            port=port,
            identity_file=os.path.join(f, "client_ed25519"),
            ssh_config=ssh_config,
            bin_dir=bin_dir,
            folder=f,
            env={f"OMPI_MCA_{key}": value for key, value in _mca(ssh_config).items()},
        )
        for h in HOSTS:
            probe = two.ssh(h, "true")
            if probe.returncode != 0:
                self.stop()
                raise RuntimeError(f"ssh {h} -p {port} failed: {probe.stderr.strip()} {self._log()}")
        return two

    def _log(self) -> str:
        try:
            with open(os.path.join(self.folder, "sshd.log"), encoding="utf-8") as fh:
                return fh.read().strip()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
