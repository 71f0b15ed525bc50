"""``configserver volume create|list|show|delete|attach|detach``: replicated volumes.

Every command is one API call (``/api/v1/volumes``); ``--json`` prints the API's JSON.
"""

from __future__ import annotations

import argparse
import urllib.parse
from typing import Any

from configserver.cli.format import answer, object_timeline, printable, table
from configserver.cloud.model import format_size
from configserver.http.client import ApiClient


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    volume = sub.add_parser("volume", parents=[common], help="replicated volumes")
    vsub = volume.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = vsub.add_parser("create", parents=[common],
                             help="a volume on two storage nodes")
    create.add_argument("name")
    create.add_argument("--size", required=True,
                        help="e.g. 2G, 512M, 1T or bytes (binary units)")
    create.add_argument("--image", help="start as a copy of this image's root file system")
    vsub.add_parser("list", parents=[common], help="list volumes")
    for action, text in (("show", "one volume, with its legs and timeline"),
                         ("delete", "delete a (detached) volume")):
        command = vsub.add_parser(action, parents=[common], help=text)
        command.add_argument("name")
    for action, text in (("attach", "let a dom0 use the volume"),
                         ("detach", "take the volume from a dom0")):
        command = vsub.add_parser(action, parents=[common], help=text)
        command.add_argument("name")
        command.add_argument("node", help="the dom0's hostname or MAC")
        if action == "detach":
            command.add_argument("--force", action="store_true",
                                 help="revoke at once: the storage nodes drop the dom0's "
                                      "sessions without waiting for it (fencing)")


def _path(name: str, rest: str = "") -> str:
    return f"/api/v1/volumes/{urllib.parse.quote(name, safe='')}{rest}"


def _print(args: argparse.Namespace, data: Any, text: str) -> int:
    return answer(getattr(args, "json", False), data, text)


def _who(item: dict[str, Any]) -> str:
    return f"{item['hostname']} ({item['node']})" if item.get("hostname") else item["node"]


def _sync(sync: dict[str, Any] | None) -> str:
    if not sync:
        return ""
    percent = sync.get("percent")
    return f", {sync.get('action') or 'sync'} {percent:.1f}%" if percent is not None else (
        f", {sync.get('action') or 'sync'}")


def volume_table(volumes: list[dict[str, Any]]) -> str:
    if not volumes:
        return "no volumes"
    return table(("NAME", "SIZE", "STATE", "REDUNDANCY", "ATTACHED", "TENANT", "ID"),
                 [(v["name"], format_size(v["size"]), v["state"], v["redundancy"],
                   ", ".join(a.get("hostname") or a["node"] for a in v["attached"]),
                   v["tenant"], v["id"]) for v in volumes])


def volume_details(volume: dict[str, Any]) -> str:
    lines = [
        f"Volume:       {volume['name']} ({volume['id']})",
        f"Size:         {format_size(volume['size'])} ({volume['size']} bytes)",
        f"State:        {volume['state']}" + (f": {volume['error']}" if volume["error"]
                                              else ""),
        f"Redundancy:   {volume['redundancy']}",
        f"Initialized:  {'yes' if volume['initialized'] else 'no'}",
        f"Image:        {volume['image'] or '-'}",
        f"Tenant:       {volume['tenant'] or '- (admin)'}",
    ]
    for leg in volume["legs"]:
        member = f", in the array: {leg['member']}" if leg.get("member") else ""
        error = f" ({leg['error']})" if leg.get("error") else ""
        lines.append(f"Leg:          {_who(leg)} {leg['portal'] or '-'} {leg['state']}"
                     f"{error}{member}")
    attached = volume["attached"]
    if not attached:
        lines.append("Attached:     - (no dom0 may reach it)")
    for item in attached:
        error = f" ({item['error']})" if item.get("error") else ""
        lines.append(f"Attached:     {_who(item)} {item['state']} {item['device'] or ''}"
                     f"{_sync(item.get('sync'))}{error}".rstrip())
    lines += object_timeline(volume.get("timeline") or [])
    return "\n".join(printable(line) for line in lines)


def cmd_volume(args: argparse.Namespace, client: ApiClient) -> int:
    if args.action == "list":
        volumes = client.get("/api/v1/volumes")["volumes"]
        return _print(args, volumes, volume_table(volumes))
    if args.action == "create":
        body: dict[str, Any] = {"name": args.name, "size": args.size}
        if args.image:
            body["image"] = args.image
        volume = client.post("/api/v1/volumes", body)
        legs = " and ".join(_who(g) for g in volume["legs"])
        return _print(args, volume, f"created volume {volume['name']} "
                                    f"({format_size(volume['size'])}) on {legs}")
    if args.action == "show":
        volume = client.get(_path(args.name))
        return _print(args, volume, volume_details(volume))
    if args.action == "delete":
        volume = client.delete(_path(args.name))
        return _print(args, volume, f"deleting volume {volume['name']}: the storage nodes "
                                    "remove its legs")
    body = {"node": args.node}
    if args.action == "detach" and args.force:
        body["force"] = True
    volume = client.post(_path(args.name, f"/{args.action}"), body)
    verb = ("attached to" if args.action == "attach" else
            "access revoked for" if body.get("force") else "detaching from")
    return _print(args, volume, f"volume {volume['name']} {verb} {args.node}")
