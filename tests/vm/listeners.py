"""What may listen on a booted node, by role (issue 13, finding 10), and ``ss`` parsing.

The farm logs in as root (``ss -Hltunp`` needs root to name the processes) and compares every
listening TCP socket and every unconnected UDP socket with the role's allowed set. A socket
that no process owns (a kernel server such as an LIO iSCSI portal) is never allowed here: no
export exists before the agent is asked for one.
"""

from __future__ import annotations

from dataclasses import dataclass

AGENT_PORT = 9898  # nodeagent's local API (nodeagent/config.py DEFAULT_API_PORT)


@dataclass(frozen=True)
class Listener:
    proto: str  # "tcp" or "udp"
    address: str  # without brackets or %device
    device: str  # the interface the socket is bound to, or ""
    port: int
    process: str  # the owning process's name, or "" for a kernel socket

    def __str__(self) -> str:
        where = f"{self.address}%{self.device}" if self.device else self.address
        return f"{self.proto} {where}:{self.port} ({self.process or 'kernel'})"


def parse_ss(text: str) -> list[Listener]:
    """``ss -Hltunp`` lines: Netid State Recv-Q Send-Q Local:Port Peer:Port [Process]."""
    found = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 6 or cols[0] not in ("tcp", "udp"):
            continue
        # 198.18.0.21%ens3:68, [fe80::1]%ens3:546, [::]:22, *:22 (a dual-stack socket)
        local, _, port = cols[4].rpartition(":")
        host, _, device = local.partition("%")
        address = "::" if host == "*" else host.strip("[]")
        process = ""
        if len(cols) > 6 and '(("' in cols[6]:
            process = cols[6].split('(("', 1)[1].split('"', 1)[0]
        found.append(Listener(cols[0], address, device, int(port), process))
    return found


def _allowed(role: str, sock: Listener) -> bool:
    if sock.proto == "tcp":
        # sshd on every address, only because root has keys (the farm hands out its key);
        # the agent's API on every IPv4 address: HTTPS with this boot's certificate, for the
        # config server (guests' consoles) and admins' certificates only.
        return ((sock.port == 22 and sock.process == "sshd"
                 and sock.address in ("0.0.0.0", "::"))
                or (sock.port == AGENT_PORT and sock.address == "0.0.0.0"
                    and sock.process in ("nodeagent", "python3", "python3.11")))
    # UDP: systemd-networkd's DHCP clients (v4 on port 68 bound to the leased address, v6 on
    # 546 on a link-local address) and timesyncd's NTP client port while it asks a server;
    # none of them serves anything.
    return ((sock.process == "systemd-network" and sock.port in (68, 546))
            or (sock.process == "systemd-timesyn" and sock.port >= 32768))


def unexpected(role: str, sockets: list[Listener]) -> list[str]:
    """Every socket that ``role`` does not need, plus the ones it must have and lacks."""
    if role not in ("dom0", "storage"):
        raise ValueError(f"no listening-socket policy for role {role!r}")
    extra = [str(s) for s in sockets if not _allowed(role, s)]
    missing = []
    if not any(s.proto == "tcp" and s.port == 22 and s.process == "sshd" for s in sockets):
        missing.append("missing: sshd on TCP 22 (the farm gives root a key)")
    if not any(s.proto == "tcp" and s.port == AGENT_PORT for s in sockets):
        missing.append(f"missing: the agent's API on 0.0.0.0:{AGENT_PORT}")
    return extra + missing
