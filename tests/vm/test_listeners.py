"""Unit tier (no processes): the listening-socket policy the vm tier applies to booted nodes."""

from __future__ import annotations

import pytest
from listeners import Listener, parse_ss, unexpected

STORAGE = """\
udp   UNCONN 0      0      198.18.0.21%ens3:68         0.0.0.0:*     users:(("systemd-network",pid=201,fd=19))
udp   UNCONN 0      0      [fe80::5054:ff:fe12:3457]%ens3:546  [::]:*  users:(("systemd-network",pid=201,fd=21))
tcp   LISTEN 0      128          0.0.0.0:22        0.0.0.0:*    users:(("sshd",pid=300,fd=3))
tcp   LISTEN 0      128          0.0.0.0:9898      0.0.0.0:*    users:(("nodeagent",pid=250,fd=7))
tcp   LISTEN 0      128             [::]:22           [::]:*    users:(("sshd",pid=300,fd=4))
"""  # noqa: E501


def test_parse_ss_reads_addresses_devices_ports_and_processes():
    sockets = parse_ss(STORAGE)
    assert sockets[0] == Listener("udp", "198.18.0.21", "ens3", 68, "systemd-network")
    assert sockets[1] == Listener("udp", "fe80::5054:ff:fe12:3457", "ens3", 546,
                                  "systemd-network")
    assert sockets[4] == Listener("tcp", "::", "", 22, "sshd")
    assert len(sockets) == 5


@pytest.mark.parametrize("role", ["dom0", "storage"])
def test_the_expected_set_passes(role):
    assert unexpected(role, parse_ss(STORAGE)) == []


@pytest.mark.parametrize("line, why", [
    ('tcp LISTEN 0 5 0.0.0.0:10809 0.0.0.0:* users:(("nbd-server",pid=9,fd=3))', "nbd-server"),
    ("tcp LISTEN 0 256 198.18.0.21:3260 0.0.0.0:*", "kernel"),
    ('tcp LISTEN 0 128 0.0.0.0:8080 0.0.0.0:* users:(("nodeagent",pid=9,fd=3))', "nodeagent"),
    ('tcp LISTEN 0 128 [::]:9898 [::]:* users:(("nodeagent",pid=9,fd=3))', "nodeagent"),
    ('tcp LISTEN 0 128 0.0.0.0:111 0.0.0.0:* users:(("rpcbind",pid=9,fd=3))', "rpcbind"),
    ('udp UNCONN 0 0 0.0.0.0:5353 0.0.0.0:* users:(("avahi-daemon",pid=9,fd=3))', "avahi"),
])
def test_anything_else_is_flagged(line, why):
    found = unexpected("storage", parse_ss(STORAGE + line + "\n"))
    assert len(found) == 1 and why in found[0], found


def test_sshd_and_the_agent_must_be_there():
    found = unexpected("dom0", parse_ss(STORAGE.splitlines()[0]))
    assert [f.split(":")[0] for f in found] == ["missing", "missing"], found
