"""Boot storm: N simulated nodes do the network part of a PXE boot against one config server.

Layout (all inside two throwaway namespaces joined by a veth pair, 198.18.0.0/15):

* ``server`` namespace: ``configserver serve --dhcp full`` on ``eth0`` (198.18.0.1/24), with a
  relayed subnet 198.19.0.0/16 for perfdhcp and an images directory holding fake files;
* ``clients`` namespace: perfdhcp (a relay at 198.19.0.1) runs N DHCP exchanges, then N
  concurrent HTTP clients each fetch their iPXE script, kernel and initramfs.

Reported: time until every node has everything, failures, the server's peak RSS, and the
physical limit (bytes moved / veth TCP throughput measured in the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from configserver.farm import network  # noqa: E402

SERVER_IP, CLIENT_IP, RELAY_IP = "198.18.0.1", "198.18.0.2", "198.19.0.1"
HTTP_PORT = 8080
URL = re.compile(r"(https?://\S+)")


def mac_of(index: int) -> str:
    return f"52:54:01:{index >> 16 & 255:02x}:{index >> 8 & 255:02x}:{index & 255:02x}"


# -- client side (runs inside the clients namespace) ---------------------------------------------

async def _fetch(session, url: str) -> int:
    async with session.get(url) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}")
        total = 0
        async for chunk in resp.content.iter_chunked(1 << 20):
            total += len(chunk)
        return total


async def _boot_node(session, index: int, expected: dict[str, int]) -> tuple[int, str | None]:
    base = f"http://{SERVER_IP}:{HTTP_PORT}"
    try:
        async with session.get(f"{base}/boot/{mac_of(index)}.ipxe") as resp:
            script = await resp.text()
            if resp.status != 200:
                return 0, f"script HTTP {resp.status}"
        moved = len(script)
        urls = [URL.search(line).group(1) for line in script.splitlines()
                if line.split()[:1] in (["kernel"], ["initrd"], ["module"]) and URL.search(line)]
        if len(urls) < 2:
            return moved, f"script names {len(urls)} files"
        for url in urls:
            got = await _fetch(session, url)
            name = url.rsplit("/", 1)[-1]
            if name in expected and got != expected[name]:
                return moved, f"{name}: {got} bytes, expected {expected[name]}"
            moved += got
        return moved, None
    except Exception as exc:
        return 0, f"{type(exc).__name__}: {exc}"


async def _http_storm(count: int, expected: dict[str, int], timeout: float) -> dict:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        start = time.monotonic()
        results = await asyncio.gather(*(_boot_node(session, i, expected) for i in range(count)))
        elapsed = time.monotonic() - start
    errors = [e for _, e in results if e]
    return {"seconds": elapsed, "bytes": sum(b for b, _ in results), "failures": len(errors),
            "first_errors": sorted(set(errors))[:5]}


def client_main(argv: list[str]) -> int:
    count, timeout = int(argv[0]), float(argv[1])
    expected = json.loads(argv[2])
    print(json.dumps(asyncio.run(_http_storm(count, expected, timeout))))
    return 0


# -- throughput probe ----------------------------------------------------------------------------

def sink_main(argv: list[str]) -> int:
    """Accept ``streams`` connections and count the bytes until all close."""
    streams = int(argv[0])
    with socket.create_server((CLIENT_IP, 9999)) as srv:
        print("listening", flush=True)
        conns = [srv.accept()[0] for _ in range(streams)]
    start, total = time.monotonic(), 0
    for conn in conns:
        conn.setblocking(False)
    open_conns = list(conns)
    import selectors

    sel = selectors.DefaultSelector()
    for conn in open_conns:
        sel.register(conn, selectors.EVENT_READ)
    buf = bytearray(1 << 20)
    while open_conns:
        for key, _ in sel.select(1):
            n = key.fileobj.recv_into(buf)
            if n == 0:
                sel.unregister(key.fileobj)
                open_conns.remove(key.fileobj)
                key.fileobj.close()
            total += n
    print(json.dumps({"bytes": total, "seconds": time.monotonic() - start}))
    return 0


def source_main(argv: list[str]) -> int:
    """Send as fast as possible over one connection for ``seconds``."""
    seconds = float(argv[0])
    data = os.urandom(1 << 20)
    with socket.create_connection((CLIENT_IP, 9999)) as conn:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.sendall(data)
    return 0


def measure_veth(server: network.FarmNetwork, clients: network.FarmNetwork,
                 streams: int = 2, seconds: float = 4.0) -> float:
    """TCP bytes/s from the server namespace to the clients namespace (``streams`` at once)."""
    me = [sys.executable, str(Path(__file__).resolve())]
    sink = subprocess.Popen(clients.cmd(*me, "sink", str(streams)), stdout=subprocess.PIPE,
                            text=True)
    assert sink.stdout is not None
    sink.stdout.readline()
    sources = [subprocess.Popen(server.cmd(*me, "source", str(seconds)))
               for _ in range(streams)]
    for src in sources:
        src.wait(seconds + 30)
    result = json.loads(sink.communicate(timeout=30)[0])
    return result["bytes"] / result["seconds"]


# -- orchestration -------------------------------------------------------------------------------

def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def perfdhcp(clients: network.FarmNetwork, count: int, rate: int) -> dict:
    if shutil.which("perfdhcp") is None:
        return {"skipped": "perfdhcp not installed (apt-get install kea-admin)"}
    start = time.monotonic()
    proc = network.run(clients.cmd(
        "perfdhcp", "-4", "-l", RELAY_IP, "-r", str(rate), "-R", str(count), "-n", str(count),
        "-u", "-d", "5", "-W", "1000000", SERVER_IP), check=False, timeout=count / rate + 120)
    elapsed = time.monotonic() - start
    out = proc.stdout

    def stat(exchange: str, key: str) -> float:
        part = out.split(f"***Statistics for: {exchange}***", 1)
        match = re.search(rf"^{key}: ([0-9.]+)", part[1] if len(part) > 1 else "", re.M)
        return float(match.group(1)) if match else float("nan")

    return {"seconds": elapsed, "started": stat("DISCOVER-OFFER", "sent packets"),
            "acks": stat("REQUEST-ACK", "received packets"),
            "drops": stat("DISCOVER-OFFER", "drops") + stat("REQUEST-ACK", "drops")}


def write_fixture(work: Path, count: int, kernel_mib: float, initramfs_mib: float
                  ) -> dict[str, int]:
    image = work / "images" / "storage"
    image.mkdir(parents=True)
    sizes = {"vmlinuz": int(kernel_mib * (1 << 20)),
             "initramfs.img": int(initramfs_mib * (1 << 20))}
    for name, size in sizes.items():
        with open(image / name, "wb") as out:
            out.write(os.urandom(size))
    (work / "server.toml").write_text(
        '[dhcp]\nmode = "full"\n\n[[dhcp.relayed]]\nnetwork = "198.19.0.0/16"\n'
        f'pool = "198.19.1.0-198.19.{min(254, 1 + count // 250)}.255"\nrouter = "{RELAY_IP}"\n')
    nodes = "\n".join(f'[[node]]\nmac = "{mac_of(i)}"\nrole = "storage"\n' for i in range(count))
    (work / "inventory.toml").write_text(nodes)
    return sizes


def run_storm(args: argparse.Namespace) -> dict:
    tag = secrets.token_hex(3)
    server = network.Namespace(f"storm-s-{tag}")
    clients = network.Namespace(f"storm-c-{tag}")
    work = Path(tempfile.mkdtemp(prefix="storm-"))
    procs: list[subprocess.Popen] = []
    try:
        for ns in (server, clients):
            ns.create()
        network.veth_pair(server, clients, f"{SERVER_IP}/24", f"{CLIENT_IP}/24")
        clients.ip("addr", "add", f"{RELAY_IP}/16", "dev", "eth0")
        server.ip("route", "add", "198.19.0.0/16", "via", CLIENT_IP)

        sizes = write_fixture(work, args.nodes, args.kernel_mib, args.initramfs_mib)
        state = work / "state"
        cs = [sys.executable, "-m", "configserver"]
        with open(work / "server.log", "wb") as log:
            srv = subprocess.Popen(server.cmd(
                *cs, "serve", "--config", str(work / "server.toml"), "--state-dir", str(state),
                "--images", str(work / "images"), "--http-port", str(HTTP_PORT),
                "--interface", "eth0", "--tftp", "off"), stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT)
        procs.append(srv)
        deadline = time.monotonic() + 60
        while network.run(server.cmd(*cs, "--state-dir", str(state), "node", "list"),
                          check=False).returncode != 0:
            if srv.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"config server did not start; see {work / 'server.log'}")
            time.sleep(0.5)
        network.run(server.cmd(*cs, "--state-dir", str(state), "apply", "-f",
                               str(work / "inventory.toml")), timeout=300)
        rss_idle = peak_rss_kib(srv.pid)

        throughput = measure_veth(server, clients)
        dhcp = perfdhcp(clients, args.nodes, args.dhcp_rate)
        client = network.run(clients.cmd(
            sys.executable, str(Path(__file__).resolve()), "client", str(args.nodes),
            str(args.timeout), json.dumps(sizes)), timeout=args.timeout + 60)
        http = json.loads(client.stdout.strip().splitlines()[-1])
        rss_peak = peak_rss_kib(srv.pid)
        limit = http["bytes"] / throughput
        return {
            "nodes": args.nodes, "kernel_bytes": sizes["vmlinuz"],
            "initramfs_bytes": sizes["initramfs.img"], "dhcp": dhcp, "http": http,
            "total_seconds": (dhcp.get("seconds") or 0) + http["seconds"],
            "veth_bytes_per_s": throughput, "physical_limit_seconds": limit,
            "http_vs_limit": http["seconds"] / limit if limit else None,
            "server_rss_kib": {"after_registration": rss_idle, "peak": rss_peak},
        }
    finally:
        network.stop_pids([p.pid for p in procs if p.poll() is None])
        for ns in (server, clients):
            ns.destroy()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    if argv[:1] == ["sink"]:
        return sink_main(argv[1:])
    if argv[:1] == ["source"]:
        return source_main(argv[1:])
    parser = argparse.ArgumentParser(prog="bench/storm/run", description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--kernel-mib", type=float, default=1.0)
    parser.add_argument("--initramfs-mib", type=float, default=4.0)
    parser.add_argument("--dhcp-rate", type=int, default=500, help="DHCP exchanges per second")
    parser.add_argument("--timeout", type=float, default=600, help="HTTP phase time limit")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/storm/run: needs root (network namespaces)", file=sys.stderr)
        return 1
    if not 1 <= args.nodes <= 20000:
        print("bench/storm/run: --nodes must be 1..20000", file=sys.stderr)
        return 1
    result = run_storm(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        dhcp, http = result["dhcp"], result["http"]
        mib = http["bytes"] / (1 << 20)
        print(f"nodes: {result['nodes']}  (kernel {result['kernel_bytes']} B, "
              f"initramfs {result['initramfs_bytes']} B)")
        print(f"DHCP (perfdhcp, {args.dhcp_rate}/s): {dhcp}")
        print(f"HTTP: {http['seconds']:.1f}s for {mib:.0f} MiB, failures {http['failures']} "
              f"{http['first_errors']}")
        print(f"total until all have everything: {result['total_seconds']:.1f}s")
        print(f"veth TCP throughput: {result['veth_bytes_per_s'] / (1 << 20):.0f} MiB/s -> "
              f"physical limit {result['physical_limit_seconds']:.1f}s; "
              f"HTTP phase = {result['http_vs_limit']:.2f}x the limit")
        print(f"server RSS: {result['server_rss_kib']['after_registration'] / 1024:.0f} MiB "
              f"after registration, peak {result['server_rss_kib']['peak'] / 1024:.0f} MiB")
    return 0 if result["http"]["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
