"""The dashboard's cost to DHCP: the config server's DHCP answer latency with and without a
browser showing the dashboard, in one run (docs/dashboard.md; the goal: at most 10 % higher).

The real ``configserver serve`` (DHCP full mode, HTTPS) runs in a namespace over a registry of
``--nodes`` registered machines (a tenth of them dom0s) and ``--instances`` instances, half of
them placed. perfdhcp, from a second namespace and acting as a relay, plays the registered
fleet at ``--rate`` exchanges per second for ``--seconds`` per round; each exchange writes the
node's boot events, so the dashboard's picture changes every second and its feed pushes a new
change every second. Each round runs four phases in turn: nothing (plain); the live feed read
by curl and drawn by nobody (feed: the server's own cost); Debian's Chromium (headless, in
the server's namespace) on an empty page (browser: its share of the two cores); Chromium
showing the dashboard through a login link (dashboard: the goal's figure). Each phase's
figure is the median of its rounds' mean DISCOVER-OFFER and REQUEST-ACK delays as perfdhcp
measured them.

Usage (root): bench/dashboard/run [--nodes 1000] [--instances 2000] [--rate 200]
[--seconds 10] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from browserlab import chromium  # noqa: E402
from netlab import Netns, namespaces, veth_pair, wait_for  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from configserver.cloud.instances import Instance  # noqa: E402
from configserver.http.dashfeed import snapshot  # noqa: E402
from configserver.model import NodeSpec  # noqa: E402
from configserver.registry.sqlite import SqliteRegistry  # noqa: E402

PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
SERVER_IP, CLIENT_IP, RELAY_IP = "198.18.0.1", "198.18.0.2", "198.19.0.1"
HTTPS_PORT = 18443
MAC_BASE = 0x525400C00000  # perfdhcp -b mac=52:54:00:c0:00:00: its clients are MAC_BASE + n
FIRST_RESERVED = 0xC6130010  # 198.19.0.16
MIB = 1 << 20
CONFIG = f"""
[dhcp]
mode = "full"
relays = ["{RELAY_IP}"]

[[dhcp.relayed]]
network = "198.19.0.0/16"
router = "{RELAY_IP}"
pool = "198.19.16.0-198.19.255.250"
"""


def _mac(value: int) -> str:
    return ":".join(f"{(value >> shift) & 0xFF:02x}" for shift in range(40, -8, -8))


def _ip(value: int) -> str:
    return ".".join(str((value >> shift) & 0xFF) for shift in (24, 16, 8, 0))


def seed(state: Path, nodes: int, instances: int) -> float:
    """The registry; returns the seconds one snapshot of it takes to build here."""
    registry = SqliteRegistry(state / "registry.sqlite")
    try:
        dom0s = max(1, nodes // 10)
        registry.apply([NodeSpec(mac=_mac(MAC_BASE + n), role="dom0" if n < dom0s else "storage",
                                 hostname=f"node-{n:04d}", ip=_ip(FIRST_RESERVED + n))
                        for n in range(nodes)])
        for i in range(instances):
            registry.create_instance(Instance(id=f"id-{i}", name=f"vm-{i}", memory=128 * MIB,
                                              vcpus=1, volume=None))
            if i % 2 == 0:
                registry.start_instance(f"vm-{i}", _mac(MAC_BASE + i % dom0s))
        started = time.perf_counter()
        size = len(json.dumps(snapshot(registry), separators=(",", ":")))
        took = time.perf_counter() - started
        print(f"registry: {nodes} nodes, {instances} instances; one snapshot: "
              f"{size / 1024:.0f} KiB in {took * 1000:.0f} ms", flush=True)
        return took
    finally:
        registry.close()


def delays(output: str, exchange: str) -> dict[str, float]:
    section = output.split(f"***Statistics for: {exchange}***", 1)[-1]
    section = section.split("***Statistics for:", 1)[0]  # up to the next exchange's
    found = dict(re.findall(r"^(min delay|avg delay|max delay|received packets|sent packets)"
                            r": ([0-9.]+)", section, re.MULTILINE))
    return {k: float(v) for k, v in found.items()}


def perfdhcp(client_ns: Netns, rate: int, seconds: int, nodes: int) -> dict[str, float]:
    result = client_ns.run("perfdhcp", "-4", "-l", RELAY_IP, "-r", str(rate),
                           "-b", f"mac={_mac(MAC_BASE)}", "-R", str(nodes), "-p", str(seconds),
                           SERVER_IP, check=False, timeout=seconds + 60)
    offer, ack = delays(result.stdout, "DISCOVER-OFFER"), delays(result.stdout, "REQUEST-ACK")
    if not offer.get("received packets"):
        raise RuntimeError(f"perfdhcp got no answer:\n{result.stdout}\n{result.stderr}")
    return {"offer_ms": offer["avg delay"], "ack_ms": ack.get("avg delay", 0.0),
            "sent": offer.get("sent packets", 0.0), "acks": ack.get("received packets", 0.0)}


def login_url(state: Path) -> str:
    done = subprocess.run([PYTHON, "-m", "configserver", "--state-dir", str(state),
                           "dashboard", "login", "--json"], check=True, capture_output=True,
                          text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(done.stdout)["url"]


def with_dashboard(server_ns: Netns, client_ns: Netns, state: Path, scratch: Path,
                   args: argparse.Namespace) -> dict[str, float]:
    with chromium(server_ns, state / "pki" / "server.pem", scratch) as driver:
        started = time.perf_counter()
        driver.get(login_url(state))
        WebDriverWait(driver, 60, poll_frequency=0.1).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")) >= args.nodes,
            message="the dashboard's node table")
        shown = time.perf_counter() - started
        before = int(driver.execute_script("return document.body.dataset.updates || 0"))
        result = perfdhcp(client_ns, args.rate, args.seconds, args.nodes)
        after = int(driver.execute_script("return document.body.dataset.updates || 0"))
    result.update(load_s=shown, updates=after - before)
    return result


def with_feed(client_ns: Netns, state: Path, scratch: Path,
              args: argparse.Namespace) -> dict[str, float]:
    """The server's side alone: curl reads the live feed (as the local admin, through the
    unix socket), no browser draws it."""
    out = scratch / "feed.txt"
    with out.open("wb") as sink:
        curl = subprocess.Popen(["curl", "-sN", "--unix-socket", str(state / "api.sock"),
                                 "http://configserver/api/v1/dashboard/events"], stdout=sink)
        try:
            time.sleep(2)
            result = perfdhcp(client_ns, args.rate, args.seconds, args.nodes)
        finally:
            curl.terminate()
            curl.wait(10)
    events = out.read_bytes().count(b"\nevent: ") + out.read_bytes().startswith(b"event: ")
    result.update(updates=events)
    return result


def with_idle_browser(server_ns: Netns, client_ns: Netns, state: Path, scratch: Path,
                      args: argparse.Namespace) -> dict[str, float]:
    """The browser's share alone: Chromium runs with an empty page."""
    with chromium(server_ns, state / "pki" / "server.pem", scratch) as driver:
        driver.get("about:blank")
        return perfdhcp(client_ns, args.rate, args.seconds, args.nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--rate", type=int, default=200, help="DHCP exchanges per second")
    parser.add_argument("--seconds", type=int, default=10, help="per round")
    parser.add_argument("--rounds", type=int, default=3, help="per phase")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/dashboard/run: needs root (network namespaces)")
    assert args.nodes <= 0x10000
    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
        state, scratch = Path(tmp) / "state", Path(tmp)
        state.mkdir()
        build_s = seed(state, args.nodes, args.instances)
        (scratch / "server.toml").write_text(CONFIG)
        with namespaces(2, "nbdashb") as (server_ns, client_ns):
            veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", f"{CLIENT_IP}/24")
            client_ns.ip("addr", "add", f"{RELAY_IP}/16", "dev", "eth0")
            server_ns.ip("route", "add", "198.19.0.0/16", "via", CLIENT_IP)
            log = scratch / "serve.log"
            server = server_ns.popen(
                PYTHON, "-m", "configserver", "serve", "--config", str(scratch / "server.toml"),
                "--state-dir", str(state), "--interface", "eth0", "--http-port", "18080",
                "--https-port", str(HTTPS_PORT), "--tftp", "off",
                stdout=log.open("w"), stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO)})
            try:
                wait_for((state / "server.json").exists, 60, "configserver serve",
                         process=server, log=log)
                perfdhcp(client_ns, args.rate, 3, args.nodes)  # warm up the caches
                phases: dict[str, list[dict[str, float]]] = {
                    "plain": [], "feed": [], "browser": [], "dashboard": []}
                for round_ in range(args.rounds):
                    for phase, results in phases.items():
                        if phase == "plain":
                            result = perfdhcp(client_ns, args.rate, args.seconds, args.nodes)
                        elif phase == "feed":
                            result = with_feed(client_ns, state, scratch, args)
                        elif phase == "browser":
                            result = with_idle_browser(server_ns, client_ns, state, scratch,
                                                       args)
                        else:
                            result = with_dashboard(server_ns, client_ns, state, scratch, args)
                        results.append(result)
                        extra = (f", page shown in {result['load_s']:.1f} s"
                                 if "load_s" in result else "") + (
                            f", {result['updates']:.0f} updates" if "updates" in result else "")
                        print(f"round {round_ + 1} {phase:9}: offer {result['offer_ms']:.2f} ms,"
                              f" ack {result['ack_ms']:.2f} ms, {result['acks']:.0f} of "
                              f"{result['sent']:.0f} exchanges{extra}", flush=True)
            finally:
                server.terminate()
                server.wait(15)
    summary: dict[str, dict[str, float]] = {}
    for key in ("offer_ms", "ack_ms"):
        plain = statistics.median(r[key] for r in phases["plain"])
        summary[key] = {"plain": plain}
        line = f"{key[:-3]:5}: {plain:.2f} ms without"
        for phase in ("feed", "browser", "dashboard"):
            value = statistics.median(r[key] for r in phases[phase])
            summary[key][phase] = value
            line += f"; {phase} {value:.2f} ms (x{value / plain:.3f})"
        print(line + "  (goal: dashboard <= x1.10)")
    load = statistics.median(r["load_s"] for r in phases["dashboard"])
    print(f"dashboard with {args.nodes} nodes shown in {load:.1f} s (median); one snapshot "
          f"built in {build_s * 1000:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "phases": phases, "summary": summary,
                                         "snapshot_build_s": build_s}, indent=1))


if __name__ == "__main__":
    main()
