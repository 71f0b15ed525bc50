"""``configserver instance create|list|show|start|stop|reboot|destroy|set|usage|console``:
Xen guests.

Every command is one API call (``/api/v1/instances``; ``create --start`` is two); ``--json``
prints the API's JSON. The dom0 holding an instance's claim carries the change out and
reports back: ``show`` has its timeline.
"""

from __future__ import annotations

import argparse
import time
import urllib.parse
from pathlib import Path
from typing import Any

from configserver.cli import console, migrate
from configserver.cli.format import answer, object_timeline, printable, table
from configserver.cloud.guestreports import totals
from configserver.cloud.model import format_size
from configserver.errors import InvalidRequest
from configserver.http.client import ApiClient


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    instance = sub.add_parser("instance", parents=[common], help="Xen guests")
    isub = instance.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = isub.add_parser("create", parents=[common],
                             help="an instance and its disk (<name>-disk) from an image")
    create.add_argument("name")
    create.add_argument("--image", default="guest", help="what it boots (default guest)")
    create.add_argument("--memory", default="256M", help="e.g. 256M, 1G (default 256M)")
    create.add_argument("--vcpus", type=int, default=1)
    create.add_argument("--disk", default="2G", help="its volume's size (default 2G)")
    create.add_argument("--ip", help="its address (default: the instance pool's lowest free)")
    create.add_argument("--ssh-key", action="append", type=Path, default=[], metavar="FILE",
                        help="a public key file root accepts (repeatable)")
    _resource_options(create)
    create.add_argument("--max-memory", metavar="SIZE",
                        help="the ceiling its memory may be raised to while it runs")
    create.add_argument("--start", action="store_true", help="start it right away")
    create.add_argument("--on", metavar="DOM0", help="with --start: on this dom0 (admins)")
    isub.add_parser("list", parents=[common], help="list instances")
    for action, text in (("show", "one instance, with its timeline"),
                         ("stop", "shut it down cleanly"),
                         ("reboot", "reboot it where it runs")):
        command = isub.add_parser(action, parents=[common], help=text)
        command.add_argument("name")
    start = isub.add_parser("start", parents=[common], help="run it (the scheduler picks "
                                                            "the dom0 unless --on)")
    start.add_argument("name")
    start.add_argument("--on", metavar="DOM0", help="this dom0's hostname or MAC (admins)")
    move = isub.add_parser("migrate", parents=[common],
                           help="move it live to another dom0 (admins)")
    move.add_argument("name")
    move.add_argument("--to", metavar="DOM0", help="this dom0 (else the scheduler's choice)")
    move.add_argument("--wait", action="store_true",
                      help="until it runs there (progress on a terminal)")
    destroy = isub.add_parser("destroy", parents=[common],
                              help="stop it hard and forget it (its disk stays unless "
                                   "--delete-disk)")
    destroy.add_argument("name")
    destroy.add_argument("--delete-disk", action="store_true", help="delete its volume too")
    change = isub.add_parser("set", parents=[common],
                             help="change its memory or resource controls (also running)")
    change.add_argument("name")
    change.add_argument("--memory", help="e.g. 512M (while it runs: up to --max-memory)")
    _resource_options(change)
    change.add_argument("--max-memory", metavar="SIZE", help="only while it is stopped")
    console = isub.add_parser("console", parents=[common],
                              help="attach to its console wherever it runs (Ctrl-] detaches)")
    console.add_argument("name")
    console.add_argument("--force", action="store_true",
                         help="take the console over from whoever has it attached")
    usage = isub.add_parser("usage", parents=[common],
                            help="CPU seconds, network and disk bytes (for billing)")
    usage.add_argument("name")
    usage.add_argument("--since", metavar="T",
                       help="from this time on: unix seconds or ISO 8601 (UTC unless it says)")


def _resource_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weight", type=int, metavar="N",
                        help="its CPU share against others (Xen's credit weight, default 256)")
    parser.add_argument("--cap", type=int, metavar="PERCENT",
                        help="at most this %% of one CPU (100: one CPU; 0: no cap)")
    parser.add_argument("--rate", metavar="RATE",
                        help="what it may send: bytes/s (10M) or bits (100Mbit); 0: no limit")


def _resources(args: argparse.Namespace) -> dict[str, Any]:
    chosen = {"cpu_weight": args.weight, "cpu_cap": args.cap, "net_rate": args.rate,
              "max_memory": args.max_memory}
    return {k: v for k, v in chosen.items() if v is not None}


def _path(name: str, rest: str = "") -> str:
    return f"/api/v1/instances/{urllib.parse.quote(name, safe='')}{rest}"


def _print(args: argparse.Namespace, data: Any, text: str) -> int:
    return answer(getattr(args, "json", False), data, text)


def _where(item: dict[str, Any]) -> str:
    if not item.get("node"):
        return "-"
    return item["hostname"] or item["node"]


def _ips(item: dict[str, Any]) -> str:
    return ", ".join(n["ip"] or "-" for n in item["nics"])


def instance_table(instances: list[dict[str, Any]]) -> str:
    if not instances:
        return "no instances"
    return table(("NAME", "DESIRED", "ACTUAL", "DOM0", "IP", "MEMORY", "VCPUS", "TENANT"),
                 [(i["name"], i["desired"], i["actual"], _where(i), _ips(i),
                   format_size(i["memory"]), i["vcpus"], i["tenant"]) for i in instances])


def instance_details(item: dict[str, Any]) -> str:
    claim = f"{_where(item)} (epoch {item['epoch']})" if item.get("node") else "- (nowhere)"
    lines = [
        f"Instance:     {item['name']} ({item['id']})",
        f"Desired:      {item['desired']}",
        f"Actual:       {item['actual']}",
        f"Dom0:         {claim}",
        *([f"Migrating:    to {item['migration']['target']} ({item['migration']['phase']}, "
           f"epoch {item['migration']['epoch']})"] if item.get("migration") else []),
        *([f"Failover:     {item['failover']['reason'] or 'fenced: restarting elsewhere'}"]
          if item.get("failover") else []),
        f"Domain:       {item['domain']} {item['uuid']}",
        f"Memory:       {format_size(item['memory'])}, {item['vcpus']} vCPU(s)",
        f"Image:        {item['image'] or '-'}",
        f"Disk:         {item.get('disk') or item['volume'] or '-'}",
        f"Tenant:       {item['tenant'] or '- (admin)'}",
        f"SSH keys:     {item['ssh_keys']}",
        f"Reboots:      {item['reboots']}",
        "Resources:    " + ", ".join(f"{k} {v}" for k, v in (item.get("resources") or {})
                                     .items()),
    ]
    for nic in item["nics"]:
        lines.append(f"NIC:          {nic['mac']} {nic['ip'] or '-'}")
    if item.get("usage"):
        lines.append("Usage:        " + ", ".join(
            f"{k} {v}" for k, v in totals(item["usage"]).items()))
    lines += object_timeline(item.get("timeline") or [])
    return "\n".join(printable(line) for line in lines)


def usage_text(data: dict[str, Any]) -> str:
    def stamp(value: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))

    lines = [f"Instance:     {data['instance']} ({data['id']})",
             f"From:         {stamp(data['since'])}",
             f"Until:        {stamp(data['until'])}"]
    lines += [f"{name + ':':<18}{value}" for name, value in data["usage"].items()]
    return "\n".join(printable(line) for line in lines)


def _keys(files: list[Path]) -> list[str]:
    keys = []
    for path in files:
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidRequest(f"cannot read {path}: {exc.strerror}") from None
        keys += [line.strip() for line in text.splitlines()
                 if line.strip() and not line.startswith("#")]
    return keys


def _start(client: ApiClient, name: str, on: str | None) -> dict[str, Any]:
    return client.post(_path(name, "/start"), {"node": on} if on else {})


def cmd_instance(args: argparse.Namespace, client: ApiClient) -> int:
    if args.action == "list":
        instances = client.get("/api/v1/instances")["instances"]
        return _print(args, instances, instance_table(instances))
    if args.action == "create":
        if args.on and not args.start:
            raise InvalidRequest("--on places a start: give --start too")
        body: dict[str, Any] = {"name": args.name, "image": args.image,
                                "memory": args.memory, "vcpus": args.vcpus,
                                "disk": args.disk, "ssh_keys": _keys(args.ssh_key)}
        if args.ip:
            body["ip"] = args.ip
        body.update(_resources(args))
        made = client.post("/api/v1/instances", body)
        text = (f"created instance {made['name']} ({_ips(made)}) with disk {made['disk']}")
        if args.start:
            made = _start(client, args.name, args.on)
            text += f"; starting on {_where(made)}"
        return _print(args, made, text)
    if args.action == "show":
        item = client.get(_path(args.name))
        return _print(args, item, instance_details(item))
    if args.action == "set":
        changes = _resources(args)
        if args.memory:
            changes["memory"] = args.memory
        item = client.request("PATCH", _path(args.name), changes)
        return _print(args, item, f"instance {item['name']}: " + ", ".join(
            f"{k} {v}" for k, v in {"memory": format_size(item["memory"]),
                                    **item["resources"]}.items()))
    if args.action == "usage":
        query = "?" + urllib.parse.urlencode({"since": args.since}) if args.since else ""
        data = client.get(_path(args.name, "/usage") + query)
        return _print(args, data, usage_text(data))
    if args.action == "console":
        return console.attach(client, args.name, force=args.force)
    if args.action == "start":
        item = _start(client, args.name, args.on)
        return _print(args, item, f"instance {item['name']} starting on {_where(item)}")
    if args.action == "migrate":
        item, text = migrate.migrate(client, _path(args.name), args.to, wait=args.wait)
        return _print(args, item, text)
    if args.action == "destroy":
        query = "?delete_disk=true" if args.delete_disk else ""
        item = client.delete(_path(args.name) + query)
        disk = " and its disk" if args.delete_disk else ""
        text = (f"instance {item['name']}{disk} destroyed" if item.get("gone") else
                f"destroying instance {item['name']}{disk}: {_where(item)} stops it")
        return _print(args, item, text)
    item = client.post(_path(args.name, f"/{args.action}"), {})
    verb = {"stop": "stopping", "reboot": "rebooting"}[args.action]
    return _print(args, item, f"instance {item['name']} {verb} on {_where(item)}")


__all__ = ["add_parser", "cmd_instance", "instance_details", "instance_table", "usage_text"]
