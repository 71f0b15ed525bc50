#!/usr/bin/env python3
"""Run only the config server's DHCP service (for the netns tests and the benchmark).

Opens (or creates) the SQLite registry in --state-dir, adds the --node reservations and applies
the --inventory file (as ``configserver apply -f`` does), calls ``start_dhcp`` as
``configserver serve`` does, prints READY and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from pathlib import Path

from configserver.config import DhcpConfig, DhcpMode, ServerConfig, Subnet, from_mapping
from configserver.dhcp.service import start_dhcp
from configserver.http.api import spec_from_json
from configserver.inventory import parse_inventory
from configserver.model import NodeSpec, UnknownMacPolicy
from configserver.registry.sqlite import SqliteRegistry


def dhcp_setting(text: str) -> tuple[str, object]:
    """NAME=VALUE of a numeric [dhcp] setting (checked as the config file's would be)."""
    name, _, value = text.partition("=")
    config = from_mapping({"dhcp": {name: float(value) if "." in value else int(value)}})
    return name, getattr(config.dhcp, name)


def subnet(text: str) -> Subnet:
    """NETWORK[,pool=START-END][,router=IP][,dns=IP][,domain=D][,mtu=N][,lease=S]"""
    network, *pairs = text.split(",")
    fields: dict[str, object] = {"network": network}
    for pair in pairs:
        key, value = pair.split("=", 1)
        if key == "pool":
            start, end = value.split("-")
            fields["pool"] = (start, end)
        elif key == "dns":
            fields["dns"] = tuple(value.split("+"))
        elif key in ("mtu", "lease"):
            fields["mtu" if key == "mtu" else "lease_time"] = int(value)
        else:
            fields[key] = value
    return Subnet(**fields)  # type: ignore[arg-type]


async def serve(args: argparse.Namespace) -> None:
    registry = SqliteRegistry(args.state_dir / "registry.sqlite")
    registry.set_unknown_mac_policy(UnknownMacPolicy(args.unknown_mac))
    for spec in args.node:
        mac, ip, hostname = [*spec.split(","), "", ""][:3]
        if registry.lookup(mac) is None:
            registry.add_node(NodeSpec(mac=mac, role="storage", ip=ip or None,
                                       hostname=hostname or None))
    if args.inventory:
        body = parse_inventory(args.inventory.read_text(), source=str(args.inventory))
        result = registry.apply([spec_from_json(n, where=f"node #{i + 1}")
                                 for i, n in enumerate(body["nodes"])])
        logging.getLogger("serve").info("inventory %s: %d nodes created, %d unchanged",
                                        args.inventory, len(result.created),
                                        len(result.unchanged))
    if args.mode == "full" and args.subnet is None:
        # No --subnet: the server's /24, with no pool (reserved addresses only).
        args.subnet = Subnet(network=str(ipaddress.IPv4Network(f"{args.server_address}/24",
                                                               strict=False)))
    dhcp = DhcpConfig(mode=DhcpMode(args.mode), subnet=args.subnet,
                      relayed=tuple(args.relayed), port=args.port, client_port=args.client_port,
                      proxy_port=args.proxy_port, relays=tuple(args.relay),
                      **dict(args.dhcp_setting))
    config = ServerConfig(state_dir=args.state_dir, interface=args.interface, dhcp=dhcp)
    service = await start_dhcp(config, registry, server_address=args.server_address,
                               http_base=args.http_base, tftp_enabled=not args.no_tftp)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await service.close()
    print(f"answered={service.answered} dropped={service.dropped}", flush=True)
    registry.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--interface")
    parser.add_argument("--mode", default="full", choices=["full", "proxy"])
    parser.add_argument("--server-address", required=True)
    parser.add_argument("--http-base", default="")
    parser.add_argument("--subnet", type=subnet)
    parser.add_argument("--relayed", type=subnet, action="append", default=[])
    parser.add_argument("--relay", action="append", default=[],
                        help="source address of a trusted DHCP relay (dhcp.relays)")
    parser.add_argument("--dhcp-setting", action="append", default=[], type=dhcp_setting,
                        metavar="NAME=VALUE", help="another [dhcp] setting, e.g. unknown_rate=50")
    parser.add_argument("--node", action="append", default=[], help="MAC,IP,HOSTNAME")
    parser.add_argument("--inventory", type=Path,
                        help="an inventory TOML file to apply (configserver apply -f)")
    parser.add_argument("--unknown-mac", default="ignore", choices=["ignore", "discover"])
    parser.add_argument("--port", type=int, default=67)
    parser.add_argument("--client-port", type=int, default=68)
    parser.add_argument("--proxy-port", type=int, default=4011)
    parser.add_argument("--no-tftp", action="store_true")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    if not args.http_base:
        args.http_base = f"http://{args.server_address}:8080"
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
