"""What a dom0's guests may send: nftables bridge rules keyed on each instance's MAC and
address, so that no guest sends with another MAC, claims another address in ARP, or sends IP
from an address it was not given, and none reaches the config server's API or the nodes.

Every vif of an instance has a name derived from its MAC (``vifname``, set in the guest's xl
config), so the rules follow the instance, not the domain id: the same name on any dom0, after
a reboot or a move. The ruleset is one nftables table (``bridge netboot_guests``) replaced
whole in one ``nft -f`` transaction whenever the dom0's guests or the policy change:

* frames from a vif (``nb*``) pass only with that vif's own MAC; ARP only with its own MAC
  and address (or 0.0.0.0, an address probe); IPv4 only from its own address, except the
  DHCP client's broadcast DISCOVER and REQUEST from 0.0.0.0; DHCP answers (from port 67, or
  to port 68), any other ether type (IPv6, VLAN tags), IP broadcast and multicast, and
  anything to the dom0 itself are dropped;
* to the config server only DHCP and its plain-HTTP port (what the guest's boot fetches);
* to the protected addresses (the boot network outside the instance pool: the nodes, the
  dynamic pool, the router) nothing of its own;
* but answers to what those opened (stateless: TCP segments with ACK set, ICMP replies and
  errors; no fragments): a ping or an ssh from the server's network to the guest is
  answered.

``ruleset`` is pure; ``apply`` runs ``nft``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.errors import XenError
from nodeagent.plugins import ToolUnavailable, run_tool

TABLE = "netboot_guests"
VIF_PREFIX = "nb"
TIMEOUT = 30.0
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


@dataclass(frozen=True)
class Port:
    """One vif of a guest: its stable name, MAC and address."""

    name: str
    mac: str
    ip: str | None


@dataclass(frozen=True)
class Policy:
    """What guests may reach beyond each other (from the work's ``guest_network``)."""

    servers: tuple[str, ...] = ()  # the config server's addresses
    dhcp_port: int = 67
    http_port: int = 8080
    protected: tuple[str, ...] = ()  # addresses or networks no guest reaches


def vifname(mac: str, index: int = 0) -> str:
    """``nb<last three MAC bytes>.<index>``: unique per instance NIC (the MACs are unique and
    ours, 00:16:3e), at most 15 characters (an interface name's limit)."""
    value = mac.lower()
    if not _MAC.match(value) or not 0 <= index <= 99:
        raise XenError(f"cannot name a vif after {mac!r} (index {index})")
    return f"{VIF_PREFIX}{value[9:].replace(':', '')}.{index}"


def ports(guests: Iterable[Mapping[str, Any]]) -> list[Port]:
    """Every vif of the work's guests (entries without usable NICs add none)."""
    found = []
    for entry in guests:
        for index, nic in enumerate(entry.get("nics") or []):
            if not isinstance(nic, Mapping) or not isinstance(nic.get("mac"), str):
                continue
            ip = nic.get("ip")
            try:
                found.append(Port(vifname(nic["mac"], index), nic["mac"].lower(),
                                  str(ipaddress.IPv4Address(ip)) if ip else None))
            except (XenError, ValueError):
                continue
    return found


def policy_from_work(work: Mapping[str, Any] | None) -> Policy:
    if not isinstance(work, Mapping):
        return Policy()

    def addresses(values: Any, *, network: bool) -> tuple[str, ...]:
        kept = []
        for value in values if isinstance(values, list) else []:
            try:
                kept.append(str(ipaddress.IPv4Network(value, strict=False)) if network
                            else str(ipaddress.IPv4Address(value)))
            except ValueError:
                continue
        return tuple(kept)

    def port(key: str, default: int) -> int:
        value = work.get(key)
        return value if isinstance(value, int) and 0 < value < 65536 else default

    return Policy(servers=addresses(work.get("servers"), network=False),
                  dhcp_port=port("dhcp_port", 67), http_port=port("http_port", 8080),
                  protected=addresses(work.get("protected"), network=True))


def _elements(items: Sequence[str]) -> str:
    return "elements = { " + ", ".join(items) + " }" if items else ""


def ruleset(guest_ports: Sequence[Port], policy: Policy) -> str:
    """The whole table, replacing any earlier one in the same transaction."""
    macs = sorted({f'"{p.name}" . {p.mac}' for p in guest_ports})
    pairs = sorted({f'"{p.name}" . {p.mac} . {p.ip}' for p in guest_ports if p.ip})
    sources = sorted({f'"{p.name}" . {p.ip}' for p in guest_ports if p.ip})
    servers = sorted(set(policy.servers))
    protected = sorted(set(policy.protected))
    lines = [
        f"table bridge {TABLE}",
        f"delete table bridge {TABLE}",
        f"table bridge {TABLE} {{",
        "  set port_mac { type ifname . ether_addr; " + _elements(macs) + " }",
        "  set port_arp { type ifname . ether_addr . ipv4_addr; " + _elements(pairs) + " }",
        "  set port_ip { type ifname . ipv4_addr; " + _elements(sources) + " }",
        "  set servers { type ipv4_addr; " + _elements(servers) + " }",
        "  set protected { type ipv4_addr; flags interval; auto-merge; "
        + _elements(protected) + " }",
        "  chain from_guest {",
        "    iifname . ether saddr != @port_mac counter drop",
        "    ether type arp iifname . arp saddr ether . arp saddr ip @port_arp accept",
        "    ether type arp arp saddr ip 0.0.0.0 iifname . arp saddr ether @port_mac accept",
        "    ether type arp counter drop",
        "    ether type != ip counter drop",
        "    ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 "
        f"udp dport {policy.dhcp_port} accept",
        "    iifname . ip saddr != @port_ip counter drop",
        # No DHCP answers from a guest, from port 67 or any other.
        "    udp sport 67 counter drop",
        "    udp dport 68 counter drop",
        "    ip daddr 255.255.255.255 udp sport 68 "
        f"udp dport {policy.dhcp_port} accept",
        # Fragments carry no ports to judge by (and the bridge does not reassemble).
        "    ip frag-off & 0x3fff != 0 ip daddr @servers counter drop",
        "    ip frag-off & 0x3fff != 0 ip daddr @protected counter drop",
        f"    ip daddr @servers udp dport {policy.dhcp_port} accept",
        f"    ip daddr @servers tcp dport {policy.http_port} accept",
        "    ip daddr @servers jump answers_only",
        "    ip daddr @protected jump answers_only",
        # Broadcasts and multicast reach every node on the segment.
        "    ip daddr 255.255.255.255 counter drop",
        "    ip daddr 224.0.0.0/4 counter drop",
        "    accept",
        "  }",
        # To the server and the protected addresses a guest only answers what they opened
        # (the operator's ping and ssh from the server's network): TCP segments with ACK set
        # (everything but a connection's first SYN), ICMP replies and errors; nothing else.
        # Stateless: no conntrack in the bridge needed.
        "  chain answers_only {",
        "    tcp flags & ack == ack accept",
        "    icmp type { echo-reply, destination-unreachable, time-exceeded, "
        "parameter-problem } accept",
        "    counter drop",
        "  }",
        "  chain forward {",
        "    type filter hook forward priority -200; policy accept;",
        f'    iifname "{VIF_PREFIX}*" jump from_guest',
        "  }",
        "  chain input {",
        "    type filter hook input priority -200; policy accept;",
        # Nothing from a guest is for the dom0 itself (its agent API, its sshd).
        f'    iifname "{VIF_PREFIX}*" ether type != arp counter drop',
        f'    iifname "{VIF_PREFIX}*" jump from_guest',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


async def apply(text: str, path: Path) -> None:
    """Load ``text`` with ``nft -f`` (one transaction: the old table stays if it fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    try:
        await run_tool(["nft", "-f", str(path)], TIMEOUT)
    except ToolUnavailable as exc:
        raise XenError(f"guest network rules: {exc.message}") from None


__all__ = ["TABLE", "Policy", "Port", "apply", "policy_from_work", "ports", "ruleset",
           "vifname"]
