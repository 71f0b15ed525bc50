"""/metrics under load: a heartbeat storm's throughput with and without a Prometheus-like
scraper fetching /metrics every second, in one run (docs/metrics.md; the goal: at most a 5 %
drop, and the scrape under 50 ms of event loop time).

The real ``configserver serve`` runs on loopback (no DHCP, no TFTP) over a registry holding
``--nodes`` nodes (each with an agent session) and ``--instances`` instances (half of them
claimed by the dom0s, so the guest map is full). A separate process posts heartbeats over
HTTPS with each node's agent token, ``--concurrency`` at a time, for ``--seconds`` per round;
rounds alternate without and with the scraper (another process, over the unix socket), and
each phase's figure is the median of its rounds. The server's own histogram of its event
loop's lag (``netboot_event_loop_lag_seconds``) is read at the end of each phase.

Usage: bench/metrics/run [--nodes 1000] [--instances 5000] [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from configserver.cloud.instances import Instance  # noqa: E402
from configserver.http.agentapi import hash_token  # noqa: E402
from configserver.model import NodeSpec  # noqa: E402
from configserver.registry.sqlite import SqliteRegistry  # noqa: E402

PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
MIB = 1 << 20


def mac_of(index: int) -> str:
    return f"52:54:01:{index >> 16 & 255:02x}:{index >> 8 & 255:02x}:{index & 255:02x}"


def seed(state: Path, nodes: int, instances: int) -> list[dict]:
    """The registry: nodes (a tenth of them dom0s), their sessions, instances; the tokens."""
    state.mkdir(parents=True, exist_ok=True)
    registry = SqliteRegistry(state / "registry.sqlite")
    agents = []
    try:
        dom0s = max(1, nodes // 10)
        registry.apply([NodeSpec(mac=mac_of(i), role="dom0" if i < dom0s else "storage",
                                 hostname=f"n{i}") for i in range(nodes)])
        for i in range(nodes):
            token, boot_id = secrets.token_urlsafe(24), secrets.token_hex(8)
            registry.start_agent_session(mac_of(i), boot_id, hash_token(token))
            agents.append({"mac": mac_of(i), "boot_id": boot_id, "token": token})
        for i in range(instances):
            registry.create_instance(Instance(id=secrets.token_hex(8), name=f"vm{i}",
                                              memory=128 * MIB, vcpus=1, volume=None))
    finally:
        registry.close()
    return agents


# -- the load: its own process, so that the server's CPU is what is measured -----------------

async def storm(url: str, ca: str, agents: list[dict], seconds: float, concurrency: int) -> dict:
    import aiohttp

    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False
    done = failed = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            ssl=context, limit=concurrency)) as session:

        async def worker(k: int) -> None:
            nonlocal done, failed
            i = k
            while time.monotonic() < deadline:
                agent = agents[i % len(agents)]
                i += concurrency
                body = {"mac": agent["mac"], "boot_id": agent["boot_id"],
                        "status": {"uptime": 1.0, "agent": {"version": "bench"}}}
                try:
                    async with session.post(f"{url}/api/v1/agent/heartbeat", json=body,
                                            headers={"Authorization":
                                                     f"Bearer {agent['token']}"}) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                done += ok
                failed += not ok

        started = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        took = time.monotonic() - started
    return {"heartbeats": done, "failed": failed, "seconds": took, "rate": done / took}


async def scrape(socket_path: str, seconds: float) -> dict:
    import aiohttp

    took, sizes = [], []
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path)) as s:
        # Started and imported before the round: only the scrapes themselves overlap it.
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            async with s.get("http://local/metrics") as resp:
                body = await resp.read()
                assert resp.status == 200, resp.status
            took.append(time.monotonic() - started)
            sizes.append(len(body))
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    return {"scrapes": len(took), "median_s": statistics.median(took), "max_s": max(took),
            "bytes": sizes[-1]}


def lag(socket_path: str) -> tuple[float, float]:
    """(count, sum) of the server's event loop lag histogram."""
    text = subprocess.run(["curl", "-sf", "--unix-socket", socket_path, "http://local/metrics"],
                          check=True, capture_output=True, text=True, timeout=60).stdout
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        found[name] = value
    prefix = "netboot_event_loop_lag_seconds"
    return float(found[f"{prefix}_count"]), float(found[f"{prefix}_sum"])


def child(argv: list[str]) -> int:
    what, rest = argv[0], argv[1:]
    if what == "storm":
        url, ca, agents_file, seconds, concurrency = rest
        agents = json.loads(Path(agents_file).read_text())
        print(json.dumps(asyncio.run(storm(url, ca, agents, float(seconds), int(concurrency)))))
    else:
        print(json.dumps(asyncio.run(scrape(rest[0], float(rest[1])))))
    return 0


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="netboot-metrics-bench-"))
    state = work / "state"
    began = time.monotonic()
    agents = seed(state, args.nodes, args.instances)
    seeded = time.monotonic() - began
    agents_file = work / "agents.json"
    agents_file.write_text(json.dumps(agents))
    log = (work / "serve.log").open("w")
    server = subprocess.Popen([PYTHON, "-m", "configserver", "serve", "--state-dir", str(state),
                               "--listen", "127.0.0.1", "--http-port", "0", "--https-port",
                               str(args.https_port), "--dhcp", "off", "--tftp", "off"],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoint = state / "server.json"
        deadline = time.monotonic() + 60
        while not endpoint.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {(work / 'serve.log').read_text()}")
            time.sleep(0.2)
        info = json.loads(endpoint.read_text())
        url, sock, ca = info["url"], info["socket"], str(state / "pki" / "ca.pem")
        phases: dict[str, list[dict]] = {"alone": [], "scraped": []}
        scrapes, lags = [], {"alone": [0.0, 0.0], "scraped": [0.0, 0.0]}
        for _ in range(args.rounds):
            for phase in ("alone", "scraped"):
                before = lag(sock)
                scraper = None
                if phase == "scraped":
                    scraper = subprocess.Popen([PYTHON, __file__, "--child", "scrape", sock,
                                                str(args.seconds)], stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, text=True)
                    assert scraper.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
                    scraper.stdin.write("go\n")  # type: ignore[union-attr]
                    scraper.stdin.flush()  # type: ignore[union-attr]
                load = subprocess.run([PYTHON, __file__, "--child", "storm", url, ca,
                                       str(agents_file), str(args.seconds),
                                       str(args.concurrency)], check=True,
                                      capture_output=True, text=True,
                                      timeout=args.seconds + 120)
                phases[phase].append(json.loads(load.stdout))
                if scraper is not None:
                    out, _ = scraper.communicate(timeout=args.seconds + 60)
                    scrapes.append(json.loads(out.strip().splitlines()[-1]))
                after = lag(sock)
                lags[phase][0] += after[0] - before[0]
                lags[phase][1] += after[1] - before[1]
        rss = int(next(line.split()[1] for line in Path(f"/proc/{server.pid}/status")
                       .read_text().splitlines() if line.startswith("VmRSS:")))
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    alone = statistics.median(r["rate"] for r in phases["alone"])
    scraped = statistics.median(r["rate"] for r in phases["scraped"])
    return {
        "nodes": args.nodes, "instances": args.instances, "seed_seconds": round(seeded, 1),
        "seconds_per_round": args.seconds, "rounds": args.rounds,
        "concurrency": args.concurrency,
        "heartbeats_per_s_alone": round(alone, 1),
        "heartbeats_per_s_scraped": round(scraped, 1),
        "drop_percent": round(100 * (1 - scraped / alone), 1),
        "failed": sum(r["failed"] for rs in phases.values() for r in rs),
        "scrape_median_ms": round(1000 * statistics.median(s["median_s"] for s in scrapes), 1),
        "scrape_max_ms": round(1000 * max(s["max_s"] for s in scrapes), 1),
        "exposition_bytes": scrapes[-1]["bytes"],
        "loop_lag_mean_ms_alone": round(1000 * lags["alone"][1] / max(1, lags["alone"][0]), 2),
        "loop_lag_mean_ms_scraped": round(1000 * lags["scraped"][1]
                                          / max(1, lags["scraped"][0]), 2),
        "server_rss_mib": round(rss / 1024, 1),
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--https-port", type=int, default=18943)
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    print(f"metrics: {result['heartbeats_per_s_alone']} heartbeats/s alone, "
          f"{result['heartbeats_per_s_scraped']} with a scrape every second "
          f"({result['drop_percent']} % drop; goal <= 5 %); scrape {result['scrape_median_ms']} "
          f"ms median, {result['exposition_bytes']} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
