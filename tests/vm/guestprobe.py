"""Run inside a guest (``python3 - PROBES < guestprobe.py``, Debian's python3, standard
library only): what it can reach as itself and what it cannot as somebody else. PROBES is a
JSON list of probes, each a list of words; it prints a JSON list: for each probe, whether it
got through. One ssh and one interpreter for all (each costs seconds in a farm guest).

    connect IP PORT [SOURCE]   a TCP connection (from SOURCE, an address of ours)
    arp IFACE MAC IP TARGET    a forged ARP reply "IP is at MAC", sent from MAC (ours or
                               not) to TARGET's MAC
"""

from __future__ import annotations

import json
import socket
import sys
import time


def connect(ip: str, port: int, source: str | None = None, timeout: float = 4.0) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout,
                                      source_address=(source, 0) if source else None):
            return True
    except OSError:
        return False


def arp_reply(iface: str, mac: str, ip: str, target_mac: str) -> None:
    """An ARP reply claiming ``ip`` for ``mac``, from ``mac``, to ``target_mac``."""
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    raw.bind((iface, 0))
    src, dst = bytes.fromhex(mac.replace(":", "")), bytes.fromhex(target_mac.replace(":", ""))
    frame = (dst + src + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x02" + src
             + socket.inet_aton(ip) + dst + socket.inet_aton("0.0.0.0"))
    for _ in range(3):
        raw.send(frame)
        time.sleep(0.2)
    raw.close()


def run(probe: list[str]) -> bool:
    kind, args = probe[0], probe[1:]
    if kind == "connect":
        return connect(args[0], int(args[1]), args[2] if len(args) > 2 else None)
    if kind == "arp":
        arp_reply(args[0], args[1], args[2], args[3])
        return True
    raise SystemExit(f"unknown probe {kind!r}")


if __name__ == "__main__":
    print(json.dumps([run(probe) for probe in json.loads(sys.argv[1])]))
