"""Issue 13, finding 4: the HTTP server's limits, against a real `configserver serve` on loopback.

Idle connections and heads trickled a byte at a time are closed after ``keepalive_timeout``, a
body that does not arrive within ``body_timeout`` gets 408, and an agent request is refused on
its headers (token, declared size) before its body is read: curl, told to wait for
``100 Continue``, never sends the 4 MiB it was asked to push.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import netlab
import pytest

from configserver.http.client import ApiClient

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MAC = "52:54:00:aa:c0:01"
FOUR_MIB = 4 * 1024 * 1024


class Server:
    """`configserver serve` on 127.0.0.1 with its log in a file (no pipe to fill)."""

    def __init__(self, tmp_path: Path, settings: str = "") -> None:
        self.state = tmp_path / "state"
        images = tmp_path / "images" / "storage"
        images.mkdir(parents=True)
        (images / "vmlinuz").write_bytes(b"kernel")
        (images / "initramfs.img").write_bytes(b"initramfs")
        config = tmp_path / "configserver.toml"
        config.write_text(settings)
        self.log = tmp_path / "serve.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "configserver", "serve", "--config", str(config),
                 "--state-dir", str(self.state), "--images", str(tmp_path / "images"),
                 "--http-port", "0", "--listen", "127.0.0.1"],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            netlab.wait_for((self.state / "server.json").exists, 30, "the server to start",
                            step=0.05, process=self.proc, log=self.log)
        except AssertionError:
            netlab.stop(self.proc)
            raise
        endpoint = json.loads((self.state / "server.json").read_text())
        self.url = endpoint["url"]  # the API: HTTPS
        self.https_port = int(self.url.rsplit(":", 1)[1])
        self.port = int(endpoint["http_url"].rsplit(":", 1)[1])  # boot files: plain HTTP
        self.ca = self.state / "pki" / "ca.pem"
        self.trust = ssl.create_default_context(cafile=self.ca)

    def connect(self, tls: bool = False) -> socket.socket:
        """A raw connection to the plain HTTP port, or to the API's port over TLS."""
        sock = socket.create_connection(("127.0.0.1", self.https_port if tls else self.port),
                                        timeout=10)
        if tls:
            sock = self.trust.wrap_socket(sock, server_hostname="127.0.0.1")
        sock.settimeout(10)
        return sock

    def api(self, method: str, path: str, body: dict) -> dict:
        """As the local admin (the unix socket), or anyone for the agent's lookup (HTTPS)."""
        if not path.startswith("/api/v1/agent/"):
            return ApiClient.for_state_dir(self.state).request(method, path, body)
        request = urllib.request.Request(
            self.url + path, method=method, data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10, context=self.trust) as answer:
            return json.loads(answer.read())


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    yield srv
    netlab.stop(srv.proc)


@pytest.fixture
def quick_server(tmp_path):
    srv = Server(tmp_path, "[http]\nkeepalive_timeout = 2\nbody_timeout = 2\n")
    yield srv
    netlab.stop(srv.proc)


def _closed_after(sock: socket.socket, began: float, limit: float = 10) -> float:
    """Seconds from ``began`` until the server closes ``sock`` (whatever it sent before)."""
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - began


def _agent_token(server: Server) -> str:
    server.api("POST", "/api/v1/nodes", {"mac": MAC, "role": "storage"})
    answer = server.api("POST", "/api/v1/agent/lookup",
                        {"macs": [MAC], "boot_id": "boot-1", "nonce": "n" * 32})
    assert answer["token"], answer
    return str(answer["token"])


def _curl_push(server: Server, body: Path, token: str, *extra: str) -> tuple[int, int]:
    """(status, bytes curl uploaded) of an inventory push with ``Expect: 100-continue``."""
    done = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}",
         "--expect100-timeout", "5", "--cacert", str(server.ca),
         "-H", f"Authorization: Bearer {token}",
         "-H", "Content-Type: application/json", "-H", "Expect: 100-continue", *extra,
         "--data-binary", f"@{body}", f"{server.url}/api/v1/agent/inventory"],
        capture_output=True, text=True, timeout=30, check=False)
    status, uploaded = done.stdout.split()
    return int(status), int(float(uploaded))


def test_idle_connections_and_slow_heads_are_closed(quick_server):
    began = time.monotonic()
    idle = [quick_server.connect() for _ in range(50)]
    slow = quick_server.connect()
    slow.sendall(b"GET /images/storage/vmlinuz HTTP/1.1\r\n")
    trickled = 0
    try:
        while time.monotonic() - began < 8:  # one byte every 0.2 s: never a whole head
            slow.sendall(b"X")
            trickled += 1
            time.sleep(0.2)
    except (BrokenPipeError, ConnectionResetError):
        pass
    slow_closed = _closed_after(slow, began)
    idle_closed = max(_closed_after(sock, began) for sock in idle)
    print(f"50 idle connections closed after {idle_closed:.1f}s, a head trickled a byte per "
          f"0.2s after {slow_closed:.1f}s ({trickled} bytes); keepalive_timeout 2s")
    assert 1.5 < idle_closed < 5 and 1.5 < slow_closed < 5
    # A served connection stays open for the next request, then idles out too.
    sock = quick_server.connect()
    sock.sendall(b"GET /images/storage/vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    assert 1.5 < _closed_after(sock, time.monotonic()) < 5
    # The HTTPS API's connections idle out the same way.
    api = quick_server.connect(tls=True)
    api.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert api.recv(65536).startswith(b"HTTP/1.1 200")
    assert 1.5 < _closed_after(api, time.monotonic()) < 5
    with urllib.request.urlopen(quick_server.url + "/api/v1/health", timeout=5,
                                context=quick_server.trust) as answer:
        assert answer.status == 200


def test_a_slow_body_gets_408_and_the_connection_closes(quick_server):
    began = time.monotonic()
    sock = quick_server.connect(tls=True)
    sock.sendall(b"POST /api/v1/agent/lookup HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"macs\": ")
    answer = sock.recv(65536)
    elapsed = time.monotonic() - began
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"code": "request_timeout"' in answer
    assert 1.5 < elapsed < 4, elapsed
    assert _closed_after(sock, began) < 8
    print(f"slow body: 408 after {elapsed:.1f}s (body_timeout 2s)")


def test_unauthenticated_inventory_push_is_refused_before_its_body(server, tmp_path):
    body = tmp_path / "inventory.json"
    body.write_bytes(b'{"mac": "%s", "boot_id": "boot-1", "inventory": {"pad": "' % MAC.encode()
                     + b"x" * (FOUR_MIB - 100) + b'"}}')
    assert _curl_push(server, body, "not-a-token") == (401, 0)
    # Without Expect: the answer comes on the headers alone, before any byte of the body.
    sock = server.connect(tls=True)
    began = time.monotonic()
    sock.sendall(b"POST /api/v1/agent/inventory HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer not-a-token\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % FOUR_MIB)
    answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401") and b"Connection: close" in answer, answer
    assert time.monotonic() - began < 2
    sock.close()

    token = _agent_token(server)
    # With the node's token, a body over the route's limit is refused on its length alone.
    oversized = tmp_path / "oversized.json"
    oversized.write_bytes(body.read_bytes()[:-3] + b"x" * 1024 + b'"}}')
    assert _curl_push(server, oversized, token) == (413, 0)
    # And the same 4 MiB push goes through with the token (under the limit).
    status, uploaded = _curl_push(server, body, token)
    assert (status, uploaded) == (200, body.stat().st_size)
    # A heartbeat with a bad token: 401 before its (small) body too.
    small = tmp_path / "heartbeat.json"
    small.write_text(json.dumps({"mac": MAC, "boot_id": "boot-1", "status": {}}))
    done = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}",
         "--cacert", str(server.ca), "-H", "Authorization: Bearer nope",
         "-H", "Expect: 100-continue",
         "--data-binary", f"@{small}", f"{server.url}/api/v1/agent/heartbeat"],
        capture_output=True, text=True, timeout=30, check=False)
    assert done.stdout.split() == ["401", "0"], done.stdout + done.stderr
