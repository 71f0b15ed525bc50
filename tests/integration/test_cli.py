"""The CLI against a real `configserver serve` process on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import netlab
import pytest

from configserver.errors import NetbootError
from configserver.http.client import ApiClient

pytestmark = pytest.mark.integration

MAC = "52:54:00:aa:bb:01"


class Server:
    def __init__(self, state: Path, images: Path, *extra: str) -> None:
        self.state, self.images, self.extra = state, images, extra
        self.proc: subprocess.Popen | None = None
        self.startup = 0.0

    def start(self) -> None:
        endpoint = self.state / "server.json"
        endpoint.unlink(missing_ok=True)
        began = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "configserver", "serve", "--state-dir", str(self.state),
             "--images", str(self.images), "--http-port", "0", "--https-port", "0",
             "--listen", "127.0.0.1", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            netlab.wait_for(endpoint.exists, 20, "the server to start", step=0.02,
                            process=self.proc)
        except AssertionError as exc:
            exited = self.proc.poll() is not None  # only then does reading stderr end
            raise AssertionError(f"{exc}: {self.proc.stderr.read() if exited else ''}") from None
        self.startup = time.monotonic() - began
        answer = json.loads(endpoint.read_text())
        self.url, self.api_url = answer["http_url"], answer["url"]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill(signal.SIGTERM)


@pytest.fixture
def server(tmp_path):
    images = tmp_path / "images" / "storage"
    images.mkdir(parents=True)
    (images / "vmlinuz").write_bytes(b"kernel")
    (images / "initramfs.img").write_bytes(b"initramfs")
    srv = Server(tmp_path / "state", tmp_path / "images")
    srv.start()
    yield srv
    srv.stop()


def cli(server: Server, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "configserver", "--state-dir",
                           str(server.state), *args], capture_output=True, text=True,
                          timeout=60, input=stdin, check=False)


def test_issue_walkthrough(server):
    print(f"server up in {server.startup:.2f} s")
    done = cli(server, "node", "add", MAC, "--role", "storage", "--hostname", "sn1",
               "--ip", "198.18.0.21")
    assert done.returncode == 0, done.stderr
    with urllib.request.urlopen(f"{server.url}/boot/{MAC}.ipxe", timeout=5) as resp:
        script = resp.read().decode()
    assert script.startswith("#!ipxe") and "netboot.role=storage" in script
    assert "netboot.hostname=sn1" in script

    for args in (("node", "add", MAC, "--role", "storage"),
                 ("node", "add", "52:54:00:aa:bb:02", "--role", "storage", "--ip",
                  "198.18.0.21"),
                 ("node", "add", "52:54:00:aa:bb:02", "--role", "nosuch"),
                 ("node", "show", "52:54:00:aa:bb:09"),
                 ("node", "add", "not-a-mac", "--role", "storage")):
        done = cli(server, *args)
        assert done.returncode == 1, args
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("configserver: error:")
        assert "Traceback" not in done.stderr
    listed = json.loads(cli(server, "node", "list", "--json").stdout)
    assert [(n["mac"], n["ip"]) for n in listed] == [(MAC, "198.18.0.21")]

    shown = cli(server, "node", "show", MAC)
    assert "Boot timeline:" in shown.stdout and "script" in shown.stdout
    assert cli(server, "node", "set", MAC, "--hostname", "sn2").returncode == 0
    assert json.loads(cli(server, "node", "show", MAC, "--json").stdout)["hostname"] == "sn2"
    assert cli(server, "role", "add", "gpu", "--image", "dom0", "--template", "xen"
               ).returncode == 0
    assert "gpu" in cli(server, "role", "list").stdout
    assert cli(server, "node", "rm", MAC).returncode == 0
    assert json.loads(cli(server, "node", "list", "--json").stdout) == []


def test_cli_without_a_server_says_so(tmp_path):
    done = subprocess.run([sys.executable, "-m", "configserver", "--state-dir",
                           str(tmp_path), "node", "list"], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 1
    assert "no config server is running" in done.stderr and "Traceback" not in done.stderr


def test_the_ca_key_and_the_local_socket_are_private(server):
    assert (server.state / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (server.state / "pki" / "server.key").stat().st_mode & 0o777 == 0o600
    socket_path = server.state / "api.sock"
    assert socket_path.stat().st_mode & 0o777 == 0o600
    assert json.loads((server.state / "server.json").read_text())["socket"] == str(socket_path)
    assert not (server.state / "admin.token").exists()  # no passwords


def test_sigkill_during_adds_loses_no_acknowledged_node(server):
    client = ApiClient.for_state_dir(server.state)
    acknowledged = []
    for i in range(1000):
        mac = f"52:54:00:10:{i // 256:02x}:{i % 256:02x}"
        if i == 400:
            os.kill(server.proc.pid, signal.SIGKILL)
        try:
            client.post("/api/v1/nodes", {"mac": mac, "role": "storage",
                                          "ip": f"198.18.{2 + i // 250}.{1 + i % 250}"})
        except NetbootError:
            continue
        acknowledged.append(mac)
    server.proc.wait(timeout=10)
    assert 300 <= len(acknowledged) <= 400
    server.start()
    client = ApiClient.for_state_dir(server.state)
    stored = {n["mac"] for n in client.get("/api/v1/nodes")["nodes"]}
    assert set(acknowledged) <= stored


def test_apply_1000_nodes_is_fast_enough_and_idempotent(server, tmp_path):
    lines = []
    for i in range(1000):
        lines += ["[[node]]", f'mac = "52:54:00:20:{i // 256:02x}:{i % 256:02x}"',
                  'role = "storage"', f'hostname = "n{i}"',
                  f'ip = "198.19.{i // 250}.{1 + i % 250}"', 'tags = ["rack1"]', ""]
    inventory = tmp_path / "inventory.toml"
    inventory.write_text("\n".join(lines))
    began = time.monotonic()
    done = cli(server, "apply", "-f", str(inventory))
    first = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    assert "1000 created" in done.stdout
    began = time.monotonic()
    done = cli(server, "apply", "-f", str(inventory))
    second = time.monotonic() - began
    assert "0 created, 0 updated, 1000 unchanged" in done.stdout
    print(f"apply of 1000 nodes: {first:.2f} s, again (no change): {second:.2f} s")
    exported = cli(server, "export").stdout
    (tmp_path / "export.toml").write_text(exported)
    done = cli(server, "apply", "-f", str(tmp_path / "export.toml"), "--prune")
    assert "1000 unchanged, 0 removed" in done.stdout, done.stdout + done.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[[node]]\nmac = "52:54:00:30:00:01"\nrole = "storage"\nip = "198.19.0.1"\n')
    done = cli(server, "apply", "-f", str(bad))
    assert done.returncode == 1 and "198.19.0.1" in done.stderr
    bad.write_text("[[node]\n")
    done = cli(server, "apply", "-f", str(bad))
    assert done.returncode == 1 and "not valid TOML" in done.stderr


def test_server_notifies_systemd_when_ready_and_stopping(tmp_path):
    import socket

    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(20)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "configserver", "serve", "--state-dir",
             str(tmp_path / "state"), "--http-port", "0", "--https-port", "0",
             "--listen", "127.0.0.1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert sock.recv(4096).startswith(b"READY=1")
            assert (tmp_path / "state" / "server.json").exists()
            proc.terminate()
            assert sock.recv(4096) == b"STOPPING=1"
            assert proc.wait(timeout=20) == 0
            assert not (tmp_path / "state" / "server.json").exists()
            assert not (tmp_path / "state" / "api.sock").exists()
        finally:
            proc.kill()


def test_node_purge_pending_and_lease_commands(server):
    from configserver.registry.sqlite import SqliteRegistry

    registry = SqliteRegistry(server.state / "registry.sqlite")
    for i in range(3):
        registry.discover(f"02:00:00:00:03:{i:02x}", {"arch": 0})
    registry.close()
    kept = cli(server, "node", "purge", "--pending", "--older-than", "1h", "--json")
    assert kept.returncode == 0 and json.loads(kept.stdout) == {"removed": []}, kept.stderr
    purged = cli(server, "node", "purge", "--pending")
    assert purged.returncode == 0 and purged.stdout.strip() == "removed 3 pending nodes"
    assert json.loads(cli(server, "node", "list", "--pending", "--json").stdout) == []
    bad = cli(server, "node", "purge", "--pending", "--older-than", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    # This server runs without DHCP: the lease commands say so in one line.
    leases = cli(server, "lease", "list", "--unknown")
    assert leases.returncode == 1 and "DHCP server is not running" in leases.stderr
    assert len(leases.stderr.strip().splitlines()) <= 2


def test_cli_escapes_terminal_sequences_from_the_network(server):
    """Facts from a boot request's query string reach `node show/list/events` escaped."""
    title, clear = "\x1b]0;pwned\x07", "\x1b[2J"
    assert cli(server, "settings", "--unknown-mac", "discover").returncode == 0
    mac = "52:54:00:aa:bb:0e"
    query = urllib.parse.urlencode({"manufacturer": title, "product": clear})
    with urllib.request.urlopen(f"{server.url}/boot/{mac}.ipxe?{query}", timeout=5) as resp:
        assert resp.status == 200
    outputs = {args: cli(server, "node", *args) for args in
               (("show", mac), ("list",), ("events", mac))}
    for args, done in outputs.items():
        assert done.returncode == 0, (args, done.stderr)
        assert not any(c in done.stdout for c in "\x1b\x07\x9b"), (args, done.stdout)
        assert all(line.isprintable() for line in done.stdout.splitlines()), args
    for args in (("show", mac), ("events", mac)):
        assert "\\x1b]0;pwned\\x07" in outputs[args].stdout, outputs[args].stdout
        assert "\\x1b[2J" in outputs[args].stdout, outputs[args].stdout
    assert mac in outputs[("list",)].stdout
    shown = json.loads(cli(server, "node", "show", mac, "--json").stdout)
    assert shown["facts"]["manufacturer"] == title and shown["facts"]["product"] == clear
    events = json.loads(cli(server, "node", "events", mac, "--json").stdout)
    assert [(e["detail"]["manufacturer"], e["detail"]["product"]) for e in events["events"]
            if e["stage"] == "discovered"] == [(title, clear)]
