"""Human-readable tables and details for the CLI (pure: data in, text out).

Everything shown comes from the server, and much of it from the network: hostnames and vendor
classes in DHCP requests, facts in boot-script query strings, agents' inventories. Every value
passes through ``printable`` before it reaches the terminal, so none can move the cursor, set
the window title or clear the screen.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO


def printable(text: object, *, newlines: bool = False) -> str:
    """``text`` with every character that a terminal would not simply show escaped.

    C0 controls (ESC, BEL, CR, TAB...), DEL and C1 controls (CSI, OSC...), and so every
    escape sequence, become ``\\xNN``; other invisible characters (bidirectional overrides,
    zero-width ones, line separators) become ``\\uNNNN``. With ``newlines``, line breaks stay
    (for text that is already made of lines); the result is always printable line by line.
    """
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable() or (newlines and char == "\n"):
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return "".join(out)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[printable(h) for h in headers]] + [
        ["-" if c in (None, "") else printable(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def ago(moment: float | None, now: float | None = None) -> str:
    if not moment:
        return "never"
    seconds = max(0, int((now or time.time()) - moment))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def node_table(nodes: Sequence[dict[str, Any]], now: float | None = None) -> str:
    if not nodes:
        return "no nodes"
    return table(("MAC", "ROLE", "HOSTNAME", "IP", "STATE", "LAST SEEN"),
                 [(n["mac"], n["role"], n["hostname"], n["ip"], n["state"],
                   ago(n.get("last_seen"), now)) for n in nodes])


def node_details(node: dict[str, Any], now: float | None = None) -> str:
    lines = [
        f"MAC:             {node['mac']}",
        f"Role:            {node['role'] or '-'}",
        f"Hostname:        {node['hostname'] or '-'}",
        f"State:           {node['state']}",
        f"Last heartbeat:  {ago(node.get('last_heartbeat'), now)}",
        f"Last seen:       {ago(node.get('last_seen'), now)}",
    ]
    for nic in node["nics"]:
        lines.append(f"NIC:             {nic['mac']}  {nic['ip'] or '(dynamic)'}")
    if node.get("kernel_args"):
        lines.append(f"Kernel args:     {node['kernel_args']}")
    if node.get("tags"):
        lines.append(f"Tags:            {', '.join(node['tags'])}")
    facts = {k: v for k, v in (node.get("facts") or {}).items() if k != "status"}
    if facts:
        lines.append("Facts:           " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    inventory = node.get("inventory")
    if inventory:
        lines.append("Inventory:       " + inventory_summary(inventory))
    timeline = node.get("timeline") or []
    if timeline:
        lines.append("Boot timeline:")
        lines.extend(timeline_lines(timeline))
    events = node.get("events") or []
    if events:
        lines.append("Recent events:")
        lines.extend(event_lines(events[-15:]))
    return "\n".join(printable(line) for line in lines)


def timeline_lines(timeline: Sequence[dict[str, Any]]) -> list[str]:
    return [printable(f"  +{item['offset']:8.3f}s  {item['stage']:<10} ({item['event']})")
            for item in timeline]


def event_lines(events: Sequence[dict[str, Any]]) -> list[str]:
    """One line per boot event: time, stage, details."""
    lines = []
    for event in events:
        stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
        detail = ", ".join(f"{k}={v}" for k, v in event["detail"].items())
        lines.append(printable(f"  {stamp}  {event['stage']:<16} {detail}".rstrip()))
    return lines


def node_events(answer: dict[str, Any]) -> str:
    """``GET /api/v1/nodes/{mac}/events``: the boot timeline, then every event."""
    lines = [f"Boot timeline of {answer['mac']}:" if answer.get("timeline") else
             f"No boot timeline for {answer['mac']}"]
    lines.extend(timeline_lines(answer.get("timeline") or []))
    lines.append("Events:" if answer.get("events") else "No events")
    lines.extend(event_lines(answer.get("events") or []))
    return "\n".join(printable(line) for line in lines)


def inventory_summary(inventory: dict[str, Any]) -> str:
    """One line: CPU, memory, disks, NICs (whatever the agent reported)."""
    parts = []
    cpu = inventory.get("cpu") or {}
    if cpu:
        parts.append(f"{cpu.get('count') or cpu.get('threads') or '?'} CPU "
                     f"({cpu.get('model', '?')})")
    memory = inventory.get("memory") or {}
    total = memory.get("total_bytes") or memory.get("total")
    if total:
        parts.append(f"{int(total) / 2**30:.1f} GiB RAM")
    disks = inventory.get("disks")
    if isinstance(disks, list):
        parts.append(f"{len(disks)} disk(s)")
    nics = inventory.get("nics") or inventory.get("interfaces")
    if isinstance(nics, list):
        parts.append(f"{len(nics)} NIC(s)")
    return ", ".join(parts) or "reported"


def role_table(roles: Sequence[dict[str, Any]]) -> str:
    return table(("ROLE", "IMAGE", "TEMPLATE", "BUILT-IN", "DESCRIPTION"),
                 [(r["name"], r["image"], r["template"], "yes" if r["builtin"] else "no",
                   r["description"]) for r in roles])


def image_table(images: Sequence[dict[str, Any]]) -> str:
    if not images:
        return "no images built (see 'make images')"
    return table(("IMAGE", "KERNEL", "INITRAMFS", "HYPERVISOR", "BUILT"),
                 [(i["name"], i["kernel"], i["initramfs"], i["hypervisor"], i.get("built"))
                  for i in images])


def lease_table(leases: Sequence[dict[str, Any]], now: float | None = None) -> str:
    if not leases:
        return "no leases"
    moment = now or time.time()
    return table(("IP", "MAC", "STATE", "REGISTERED", "EXPIRES IN", "HOSTNAME"),
                 [(x["ip"], x["mac"], x["state"], "yes" if x["registered"] else "no",
                   f"{max(0, int(x['expires'] - moment))}s", x["hostname"]) for x in leases])


def answer(json_wanted: bool, data: Any, text: str) -> int:
    """Print the API's ``data`` as JSON (ASCII, every control character escaped) or ``text``
    for people (no character from the network reaches the terminal raw); exit status 0."""
    if json_wanted:
        print(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=True))
    else:
        print(printable(text, newlines=True))
    return 0


def object_timeline(timeline: Sequence[dict[str, Any]]) -> list[str]:
    """A volume's or an instance's timeline (``time``, ``stage``, ``detail``), one line each."""
    lines = ["Timeline:"] if timeline else []
    for event in timeline:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
        detail = ", ".join(f"{k}={v}" for k, v in event["detail"].items())
        lines.append(f"  {stamp}  {event['stage']:<18} {detail}".rstrip())
    return lines


class StatusLine:
    """One line of progress, rewritten in place on a terminal; nothing at all elsewhere (logs
    and pipes get only the command's result)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = self.stream.isatty()
        self.shown = ""

    def show(self, text: str) -> None:
        if self.terminal and text != self.shown:
            self.stream.write(f"\r\x1b[K{printable(text)}")
            self.stream.flush()
            self.shown = text

    def close(self) -> None:
        if self.terminal and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = ""
