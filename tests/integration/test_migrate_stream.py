"""The migration stream between two agents (``nodeagent.migratestream``), as ``xl`` drives
it: real processes on loopback, mutual TLS with node certificates of the config server's CA,
a program standing in for ``xl migrate-receive`` that answers on the same stream."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time

import pytest

from configserver.pki import Identity

pytestmark = pytest.mark.integration

SOURCE = Identity("node", "52:54:00:00:d0:01", boot_id="boot-source")
TARGET = Identity("node", "52:54:00:00:d0:02", boot_id="boot-target")
SIZE = 24 << 20
# Stands in for `xl migrate-receive`: reads the guest's bytes, answers with their digest (the
# receiver's messages go back on the same stream), exits 3 to show the status comes through.
RECEIVER = ("import hashlib, sys; d = hashlib.sha256(); n = int(sys.argv[1])\n"
            "while n: b = sys.stdin.buffer.read(min(n, 1 << 16)); d.update(b); n -= len(b)\n"
            "sys.stdout.write(d.hexdigest() + '\\n'); sys.exit(3)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stream(pki, identity: Identity, peer: Identity, *argv: str) -> list[str]:
    cert, key, _ = pki.bundle(identity)
    return [sys.executable, "-m", "nodeagent.migratestream", "--cert", str(cert),
            "--key", str(key), "--ca", str(pki.dir / "pki" / "ca.pem"), "--peer", peer.uri(),
            *argv]


def receiver(pki, expect: Identity, timeout: float = 20) -> tuple[subprocess.Popen, int]:
    """The target's side on any free port (as the agent runs it): the process and its port."""
    process = subprocess.Popen(
        stream(pki, TARGET, expect, "receive", "--listen", "127.0.0.1:0", "--timeout",
               str(timeout), "--", sys.executable, "-c", RECEIVER, str(SIZE)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = process.stdout.readline().split()
    assert said[:1] == ["listening"] and said[1].isdigit() and int(said[1]) > 0, \
        process.stderr.read()
    return process, int(said[1])


def test_the_guest_bytes_cross_and_the_receivers_answer_and_status_come_back(pki):
    target, port = receiver(pki, SOURCE)
    payload = os.urandom(SIZE)
    began = time.monotonic()
    # As xl runs it: `exec CMD HOST xl migrate-receive ...` with CMD ending in '#'.
    rune = " ".join(stream(pki, SOURCE, TARGET, "connect", f"127.0.0.1:{port}")) + \
        " # dom0-2 xl migrate-receive -e"
    done = subprocess.run(["sh", "-c", f"exec {rune}"], input=payload, capture_output=True,
                          check=False, timeout=60)
    seconds = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == hashlib.sha256(payload).hexdigest()
    assert target.wait(timeout=20) == 3, target.stderr.read()
    print(f"{SIZE >> 20} MiB through the stream in {seconds:.2f} s "
          f"({SIZE / seconds / 1e6:.0f} MB/s)")


@pytest.mark.parametrize("caller", [
    Identity("node", "52:54:00:00:d0:03", boot_id="boot-source"),  # another node
    Identity("node", "52:54:00:00:d0:01", boot_id="an-earlier-boot"),  # not its current boot
    Identity("admin", "someone"),  # a person, even an admin
])
def test_anyone_but_the_expected_source_is_refused_before_the_command_runs(pki, caller):
    target, port = receiver(pki, SOURCE, timeout=4)
    done = subprocess.run(stream(pki, caller, TARGET, "connect", f"127.0.0.1:{port}"),
                          input=b"x" * 1024, capture_output=True, timeout=30, check=False)
    assert done.stdout == b""  # nothing answered: the command never ran
    assert target.wait(timeout=20) == 2
    said = target.stderr.read()
    assert f"the peer is {caller.uri()}, not {SOURCE.uri()}" in said, said
    assert f"no connection from {SOURCE.uri()}" in said, said


def test_the_source_refuses_a_target_that_is_not_the_node_it_was_sent_to(pki):
    port = free_port()
    impostor = Identity("node", "52:54:00:00:d0:09", boot_id="boot-x")
    process = subprocess.Popen(
        stream(pki, impostor, SOURCE, "receive", "--listen", f"127.0.0.1:{port}",
               "--timeout", "5", "--", "cat"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    assert process.stdout.readline().split() == ["listening", str(port)]
    done = subprocess.run(stream(pki, SOURCE, TARGET, "connect", f"127.0.0.1:{port}"),
                          input=b"secret guest memory", capture_output=True, timeout=30,
                          check=False)
    assert done.returncode == 2
    assert f"the peer is {impostor.uri()}, not {TARGET.uri()}" in done.stderr.decode()
    process.kill()
    process.wait()
