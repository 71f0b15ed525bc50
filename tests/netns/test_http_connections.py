"""Issue 13, finding 4: 1000 idle HTTP connections neither stop HTTP boot nor TFTP.

The real ``configserver serve --interface eth0`` runs in a namespace under a low soft limit of
open files (``prlimit --nofile=512:4096``, as a shell's default 1024 would be at a larger
scale). A client namespace opens 1000 TCP connections to its HTTP port and sends nothing.
While they are open, curl fetches a boot script and tftp-hpa a file; then the server closes
every idle connection after its keep-alive timeout (20 s by default). Before the fix the
server kept its soft limit, stopped accepting at about 500 connections (EMFILE), and curl
and tftp both failed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import netlab
import pytest
from netlab import namespaces, veth_pair

pytestmark = pytest.mark.netns

SERVER_IP, CLIENT_IP = "198.18.43.1", "198.18.43.2"
MAC = "52:54:00:43:00:01"
CONNECTIONS = 1000
IDLE_TIMEOUT = 20.0  # HttpConfig.keepalive_timeout's default
REPO = Path(__file__).resolve().parents[2]

# Opens COUNT connections and keeps them, sending nothing; prints "open N SECONDS" when they
# are all up, then "closed N SECONDS" once the server closed them all (or LIMIT passed).
HOLDER = r"""
import resource, select, socket, sys, time
host, port, count, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
began = time.monotonic()
socks = {}
for _ in range(count):
    sock = socket.create_connection((host, port), timeout=5)
    socks[sock.fileno()] = sock
print(f"open {len(socks)} {time.monotonic() - began:.2f}", flush=True)
poller = select.poll()
for fd in socks:
    poller.register(fd, select.POLLIN)
while socks and time.monotonic() - began < limit:
    for fd, _ in poller.poll(200):
        sock = socks.get(fd)
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            poller.unregister(fd)
            del socks[fd]
            sock.close()
print(f"closed {count - len(socks)} {time.monotonic() - began:.2f}", flush=True)
"""


def test_boot_and_tftp_work_while_1000_idle_connections_are_open(tmp_path):
    served = tmp_path / "tftp"
    served.mkdir()
    payload = os.urandom(256 * 1024)
    (served / "payload.bin").write_bytes(payload)
    images = tmp_path / "images" / "storage"
    images.mkdir(parents=True)
    (images / "vmlinuz").write_bytes(b"kernel")
    (images / "initramfs.img").write_bytes(b"initramfs")
    state, log = tmp_path / "state", tmp_path / "serve.log"
    with namespaces(2, "nbconn") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", f"{CLIENT_IP}/24")
        with log.open("w") as out:
            server = server_ns.popen(
                "prlimit", "--nofile=512:4096", "--", sys.executable, "-m", "configserver",
                "serve", "--state-dir", str(state), "--interface", "eth0", "--tftp", "on",
                "--ipxe-dir", str(served), "--images", str(tmp_path / "images"),
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        holder = None
        try:
            netlab.wait_for((state / "server.json").exists, 30, "configserver serve to start",
                            process=server, log=log)
            added = server_ns.run(sys.executable, "-m", "configserver", "--state-dir",
                                  str(state), "node", "add", MAC, "--role", "storage",
                                  check=False, cwd=REPO)
            assert added.returncode == 0, added.stderr
            holder = client_ns.popen(sys.executable, "-c", HOLDER, SERVER_IP, "8080",
                                     str(CONNECTIONS), str(IDLE_TIMEOUT + 25),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
            opened = holder.stdout.readline().split()
            assert opened[:2] == ["open", str(CONNECTIONS)], (opened, holder.stderr.read())
            began = time.monotonic()

            script = client_ns.run("curl", "-sS", "-m", "10",
                                   f"http://{SERVER_IP}:8080/boot/{MAC}.ipxe", check=False)
            target = tmp_path / "fetched.bin"
            fetched = client_ns.run("timeout", "20", "tftp", "-m", "binary", SERVER_IP, "-c",
                                    "get", "payload.bin", str(target), check=False, timeout=40)
            results = (f"curl: {script.returncode} {script.stderr.strip()}; tftp: "
                       f"{fetched.returncode} {(fetched.stdout + fetched.stderr).strip()}")
            assert script.returncode == 0 and script.stdout.startswith("#!ipxe"), results
            assert fetched.returncode == 0 and target.exists(), results
            assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(
                payload).digest()
            during = time.monotonic() - began

            closed = holder.stdout.readline().split()
            holder.wait(timeout=60)
            assert closed[:2] == ["closed", str(CONNECTIONS)], closed
            print(f"{CONNECTIONS} idle connections open in {float(opened[2]):.1f}s; curl and "
                  f"tftp done in {during:.1f}s while they were; all closed by the server "
                  f"{float(closed[2]):.1f}s after the first opened")
            assert float(closed[2]) < IDLE_TIMEOUT + float(opened[2]) + 5
        finally:
            if holder is not None and holder.poll() is None:
                holder.kill()
                holder.wait()
            netlab.stop(server, 15)
    text = log.read_text()
    assert "open files limit: 4096" in text, text[-2000:]
