"""The two loopback hosts themselves: reachable over ssh with the test's key only, on loopback only."""

import subprocess

import psutil

from tests.helpers.twohosts import HOSTS


def test_both_hosts_answer_over_ssh_with_the_test_key(two_hosts, tmp_path):
    for host in HOSTS:
        out = two_hosts.ssh(host, "echo $SSH_CONNECTION")
        assert out.returncode == 0, out.stderr
        client, _, server, port = out.stdout.split()
        assert server == host and port == str(two_hosts.port)
    # Another key is refused: only the test's authorized key logs in.
    other = str(tmp_path / "other_key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other], check=True)
    refused = subprocess.run(
        [
            *("ssh", "-F", "/dev/null", "-p", str(two_hosts.port), "-i", other, "-o", "IdentitiesOnly=yes"),
            *("-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"),
            *(HOSTS[0], "true"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0


def test_sshd_listens_on_loopback_only(two_hosts):
    listening = {
        c.laddr.ip
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == two_hosts.port
    }
    assert listening == set(HOSTS)
