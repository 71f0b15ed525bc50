"""Real ``nodeagent run`` processes against a real ``configserver serve`` on loopback.

Each agent pretends to be another node (``--mac``, ``--boot-id``, its own ``--state-dir``), so
many agents share this one host.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import netlab
import pytest
from netlab import wait_for

from configserver.errors import NetbootError
from configserver.http.client import ApiClient

pytestmark = pytest.mark.integration

HEARTBEAT = 1.0
FLEET = 200
# Measured: 65 s on an idle 2-core host, 141 s with other test suites loading it.
FLEET_DEADLINE = 300.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mac(n: int) -> str:
    return f"52:54:00:fa:{n >> 8:02x}:{n & 0xff:02x}"


class Server:
    """``configserver serve`` on a fixed loopback port (so a restart keeps the URL)."""

    def __init__(self, root: Path, heartbeat: float = HEARTBEAT) -> None:
        self.root = root
        self.state = root / "state"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.https_port = free_port()
        self.api_url = f"https://127.0.0.1:{self.https_port}"
        (root / "images").mkdir(parents=True, exist_ok=True)
        dom0 = root / "images" / "dom0"
        dom0.mkdir(exist_ok=True)
        for name in ("xen", "vmlinuz", "initramfs.img"):
            (dom0 / name).write_bytes(b"stand-in")
        self.config = root / "server.toml"
        self.config.write_text(f"heartbeat_interval = {heartbeat}\nlost_after = 60.0\n")
        self.proc: subprocess.Popen | None = None
        self.log = open(root / "server.log", "ab")  # noqa: SIM115 - closed in stop()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "configserver", "serve", "--config", str(self.config),
             "--state-dir", str(self.state), "--images", str(self.root / "images"),
             "--http-port", str(self.port), "--https-port", str(self.https_port),
             "--listen", "127.0.0.1", "--tftp", "off"],
            stdout=self.log, stderr=self.log)
        netlab.wait_for(self._healthy, 30, "the server to answer", step=0.05,
                        process=self.proc, log=self.root / "server.log")

    def _healthy(self) -> bool:
        try:
            self.get("/api/v1/health")
        except NetbootError:
            return False
        return True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "configserver", "--state-dir",
                               str(self.state), *args], capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        return done

    def get(self, path: str, timeout: float = 10.0):
        """As the local admin, over the state directory's unix socket."""
        client = ApiClient.for_state_dir(self.state)
        client.timeout = timeout
        return client.get(path)

    def post(self, path: str, body: dict, token: str | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.api_url + path, data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        context = ssl.create_default_context(cafile=self.state / "pki" / "ca.pem")
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    @property
    def ca_fingerprint(self) -> str:
        return json.loads((self.state / "server.json").read_text())["ca_fingerprint"]

    def nodes(self) -> dict[str, dict]:
        return {n["mac"]: n for n in self.get("/api/v1/nodes")["nodes"]}

    def node(self, address: str) -> dict:
        return self.get(f"/api/v1/nodes/{address}")


class AgentProcess:
    def __init__(self, server: Server, root: Path, address: str, boot_id: str, *,
                 api_port: int = 0, inventory: Path | None = None,
                 env: dict[str, str] | None = None, cmdline: str = "") -> None:
        self.address, self.boot_id = address, boot_id
        self.state_dir = root / f"agent-{address.replace(':', '')}"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmdline_file = self.state_dir / f"cmdline-{boot_id}"
        # As a boot script would: the CA the agent pins, then what the test adds.
        cmdline_file.write_text(f"netboot.ca={server.ca_fingerprint} {cmdline}\n")
        argv = [sys.executable, "-m", "nodeagent", "run", "--cmdline", str(cmdline_file),
                "--config", "/dev/null", "--server", server.url, "--mac", address,
                "--boot-id", boot_id, "--state-dir", str(self.state_dir),
                "--api-port", str(api_port), "--api-listen", "127.0.0.1"]  # loopback only
        if inventory is not None:
            argv += ["--inventory-file", str(inventory), "--no-watch"]
        self.log_path = self.state_dir / "agent.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)

    @property
    def token(self) -> str:
        return json.loads((self.state_dir / "token.json").read_text())["token"]

    def stop(self) -> None:
        netlab.stop(self.proc)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@contextlib.contextmanager
def running_server(root: Path, heartbeat: float = HEARTBEAT):
    srv = Server(root, heartbeat)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        srv.log.close()


@pytest.fixture
def server(tmp_path):
    with running_server(tmp_path) as srv:
        yield srv


@pytest.fixture
def agents():
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.proc.terminate()
    for agent in started:
        agent.stop()


@pytest.fixture
def recorded_inventory(tmp_path):
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps({"schema": 1, "hostname": "simulated", "disks": [],
                                "nics": [], "cpu": {"threads": 1}}))
    return path


def test_agent_lookup_heartbeat_inventory_and_local_api(server, agents, tmp_path):
    address = mac(1)
    server.cli("node", "add", address, "--role", "storage", "--hostname", "store1")
    api_port = free_port()
    agent = AgentProcess(server, tmp_path, address, "boot-a", api_port=api_port)
    agents.append(agent)
    wait_for(lambda: server.node(address)["state"] == "ready", 30, "the node to be ready")
    inventory = wait_for(lambda: server.node(address).get("inventory"), 60, "an inventory")
    assert inventory["schema"] == 1 and inventory["cpu"]["threads"] >= 1
    assert any(n["name"] for n in inventory["nics"])

    token = agent.token
    # The token is issued once per boot: looking up again yields none.
    status, answer = server.post("/api/v1/agent/lookup", {"macs": [address],
                                                          "boot_id": "boot-a"})
    assert status == 200 and answer["token"] is None
    assert answer["node"] == {"mac": address, "hostname": "store1", "role": "storage"}
    body = {"mac": address, "boot_id": "boot-a", "status": {}}
    assert server.post("/api/v1/agent/heartbeat", body, token="wrong")[0] == 401
    assert server.post("/api/v1/agent/heartbeat", body)[0] == 401
    assert server.post("/api/v1/agent/heartbeat", body, token=token)[0] == 200
    # Unknown MAC: the same answer as any refusal.
    unknown = server.post("/api/v1/agent/lookup", {"macs": [mac(999)], "boot_id": "x"})
    assert unknown[0] == 404

    # The agent's own API: HTTPS with the node's certificate (of our CA, naming 127.0.0.1),
    # answering only with the agent token (or an admin's or node's certificate).
    trust = ssl.create_default_context(cafile=server.state / "pki" / "ca.pem")
    wait_for((agent.state_dir / "node.pem").exists, 30, "the node's certificate")
    local = f"https://127.0.0.1:{api_port}/v1/status"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(local, timeout=5, context=trust)
    assert refused.value.code == 401
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):  # no HTTP
        urllib.request.urlopen(f"http://127.0.0.1:{api_port}/v1/status", timeout=5)
    request = urllib.request.Request(local, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5, context=trust) as response:
        local_status = json.load(response)
    assert local_status["phase"] == "heartbeat" and local_status["node"]["mac"] == address
    # Still beating after that.
    beats = server.node(address)["last_heartbeat"]
    wait_for(lambda: server.node(address)["last_heartbeat"] > beats, 10, "more heartbeats")
    assert agent.proc.poll() is None


def test_agents_recover_from_a_server_restart(server, agents, tmp_path, recorded_inventory):
    addresses = [mac(n) for n in range(10, 15)]
    for address in addresses:
        server.cli("node", "add", address, "--role", "storage")
    agents.extend(AgentProcess(server, tmp_path, a, f"boot-{a[-2:]}",
                               inventory=recorded_inventory) for a in addresses)
    wait_for(lambda: all(server.nodes()[a]["state"] == "ready" for a in addresses), 60,
             "every node ready")
    server.stop(signal.SIGKILL)
    time.sleep(3 * HEARTBEAT)
    restarted = time.time()
    server.start()
    wait_for(lambda: all((server.nodes()[a]["last_heartbeat"] or 0) > restarted
                         for a in addresses), 60, "heartbeats after the restart")
    assert all(agent.proc.poll() is None for agent in agents)
    tokens_issued = sum(1 for a in addresses
                        for e in server.get(f"/api/v1/nodes/{a}/events")["events"]
                        if e["stage"] == "agent.lookup")
    assert tokens_issued == len(addresses), "the agents kept their tokens"


def test_agent_restarted_with_a_new_boot_id(server, agents, tmp_path, recorded_inventory):
    address = mac(20)
    server.cli("node", "add", address, "--role", "dom0")
    first = AgentProcess(server, tmp_path, address, "boot-1", inventory=recorded_inventory)
    agents.append(first)
    wait_for(lambda: server.node(address)["state"] == "ready", 30, "ready")
    old_token = first.token
    first.stop()
    # A reboot of a diskless node passes through PXE: its boot script names the kernel
    # command line, with this boot's ticket, that the new boot's agent reads.
    with urllib.request.urlopen(f"{server.url}/boot/{address}.ipxe", timeout=10) as resp:
        script = resp.read().decode()
    assert "/images/dom0/xen" in script
    kernel_line = next(line for line in script.splitlines() if "netboot.ticket=" in line)
    words = kernel_line.split()
    cmdline = " ".join(words[2:words.index("||")])
    assert server.node(address)["state"] == "ready", "fetching a script changes nothing"

    second = AgentProcess(server, tmp_path, address, "boot-2", inventory=recorded_inventory,
                          cmdline=cmdline)
    agents.append(second)
    wait_for(lambda: (second.state_dir / "token.json").exists()
             and second.token != old_token, 30, "a new token")
    since = time.time()
    wait_for(lambda: (server.node(address)["last_heartbeat"] or 0) > since, 30,
             "heartbeats of the new boot")
    old = {"mac": address, "boot_id": "boot-1", "status": {}}
    assert server.post("/api/v1/agent/heartbeat", old, token=old_token)[0] == 401
    old["boot_id"] = "boot-2"
    assert server.post("/api/v1/agent/heartbeat", old, token=old_token)[0] == 401
    lookups = [e["detail"] for e in server.get(f"/api/v1/nodes/{address}/events")["events"]
               if e["stage"] == "agent.lookup"]
    # boot-2's first lookups may come while boot-1's last heartbeat is fresh: refused, until
    # the old agent is silent; then its ticket takes the session over, once.
    issued = [(d["boot_id"], d["token_issued"]) for d in lookups]
    assert issued[0] == ("boot-1", True) and issued[-1] == ("boot-2", True)
    assert issued.count(("boot-2", True)) == 1
    assert {d.get("refused") for d in lookups[1:-1]} <= {"the node's agent is heartbeating"}


def test_fleet_of_agents_all_reach_ready(agents, tmp_path, recorded_inventory):
    # A longer interval than the other tests: the first heartbeat (which makes a node ready)
    # goes out right after the lookup anyway, and the host also runs 200 agents.
    with running_server(tmp_path / "fleet", heartbeat=5.0) as server:
        addresses = [mac(n) for n in range(100, 100 + FLEET)]
        nodes = "".join(f'[[node]]\nmac = "{a}"\nrole = "storage"\nhostname = "fleet{i}"\n'
                        for i, a in enumerate(addresses))
        (tmp_path / "fleet.toml").write_text(nodes)
        server.cli("apply", "-f", str(tmp_path / "fleet.toml"))
        began = time.monotonic()
        for address in addresses:
            agents.append(AgentProcess(server, tmp_path, address, f"boot-{address[-5:]}",
                                       inventory=recorded_inventory))
        spawned = time.monotonic() - began

        def all_ready() -> bool:
            try:
                ready = server.get("/api/v1/nodes?state=ready", timeout=30)["nodes"]
            except OSError:  # a busy host: ask again
                return False
            return len({n["mac"] for n in ready} & set(addresses)) == FLEET

        wait_for(all_ready, FLEET_DEADLINE, f"{FLEET} nodes ready", step=2.0)
        elapsed = time.monotonic() - began
        crashed = [a.address for a in agents if a.proc.poll() is not None]
        assert not crashed
        inventories = sum(1 for a in addresses[:20] if server.node(a).get("inventory"))
        rss = sorted(a.rss_kb() for a in agents)
        report = {"agents": FLEET, "spawn_s": round(spawned, 1), "ready_s": round(elapsed, 1),
                  "rss_kb_median": rss[len(rss) // 2], "rss_kb_max": rss[-1]}
        print(f"fleet: {report}")
        assert inventories == 20
        if os.environ.get("AGENT_FLEET_REPORT"):
            Path(os.environ["AGENT_FLEET_REPORT"]).write_text(json.dumps(report))


def test_agent_notifies_systemd_readiness(server, tmp_path, recorded_inventory):
    address = mac(30)
    server.cli("node", "add", address, "--role", "storage", "--hostname", "notify1")
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify_path))
        listener.settimeout(30)
        agent = AgentProcess(server, tmp_path, address, "n-1", inventory=recorded_inventory,
                             env={**os.environ, "NOTIFY_SOCKET": str(notify_path)}).proc
        try:
            messages = [listener.recv(4096).decode() for _ in range(2)]
            assert messages[0].startswith("READY=1\n")
            assert messages[1] == (f"STATUS=reporting to {server.url} as {address} "
                                   "(notify1, role storage)")
            agent.terminate()
            assert agent.wait(timeout=15) == 0
            assert listener.recv(4096) == b"STOPPING=1"
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
