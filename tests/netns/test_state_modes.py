"""Issue 13, finding 9: the state directory is private (0700) and every file in it 0600.

The real ``configserver serve`` runs with a permissive umask (022) in a namespace, hands out a
DHCP lease to a real client (dhclient) and takes a registry write from the CLI; then, while it
runs (SQLite's -wal and -shm files exist) and after it stopped, nothing in the state directory
is readable by anyone but its owner.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import netlab
import pytest
from netlab import namespaces, veth_pair
from test_dhcp_clients import NODE_MAC, SERVER_IP, dhclient

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
CONFIGSERVER = (sys.executable, "-m", "configserver")  # this checkout's code (cwd=REPO)


# Certificates are public (the CA's is served at /boot/ca.pem); keys and the rest are not.
PUBLIC = {"pki/ca.pem", "pki/server.pem"}


def _modes(state: Path) -> dict[str, int]:
    """Every file's mode, and every directory's with 0o100 added to what files must have:
    a directory 0700 counts as private like a file 0600."""
    modes = {}
    for entry in state.rglob("*"):
        name, mode = entry.relative_to(state).as_posix(), stat.S_IMODE(entry.lstat().st_mode)
        if entry.is_dir():
            mode = 0o600 if mode == 0o700 else mode
        elif name in PUBLIC:
            mode = 0o600 if mode in (0o600, 0o644) else mode
        modes[name] = mode
    return modes


def test_state_directory_and_its_files_are_private(tmp_path):
    state, log = tmp_path / "state", tmp_path / "serve.log"
    state.mkdir(mode=0o755)
    state.chmod(0o755)  # as an older version (or an operator) left it
    (state / "old-notes.txt").write_text("left by hand\n")
    (state / "old-notes.txt").chmod(0o644)
    with namespaces(2, "nbmode") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", "")
        client_ns.ip("link", "set", "eth0", "address", NODE_MAC)
        with log.open("w") as out:
            server = server_ns.popen(
                *CONFIGSERVER, "serve", "--state-dir", str(state), "--interface", "eth0",
                "--http-port", "18069", "--tftp", "off", "--dhcp", "full",
                "--pool", "198.18.0.100-198.18.0.120",
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=lambda: os.umask(0o022))
        try:
            netlab.wait_for((state / "server.json").exists, 30, "configserver serve to start",
                            process=server, log=log)
            lease = dhclient(client_ns, tmp_path)
            assert "fixed-address 198.18.0.1" in lease, log.read_text()
            added = server_ns.run(
                *CONFIGSERVER, "--state-dir", str(state), "node", "add",
                "52:54:00:0a:00:77", "--role", "storage", check=False, cwd=REPO,
                preexec_fn=lambda: os.umask(0o022))
            assert added.returncode == 0, added.stderr
            running = _modes(state)
        finally:
            netlab.stop(server, 15)
    stopped = _modes(state)
    expected = {"registry.sqlite", "registry.sqlite-wal", "registry.sqlite-shm",
                "leases.sqlite", "leases.sqlite-wal", "leases.sqlite-shm", "server.key",
                "api.sock", "pki", "pki/ca.key", "server.json", "old-notes.txt"}
    assert expected <= set(running), running
    assert {name: mode for name, mode in running.items() if mode != 0o600} == {}
    assert {name: mode for name, mode in stopped.items() if mode != 0o600} == {}
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert (state / "old-notes.txt").read_text() == "left by hand\n"
