"""Misbehaving TFTP clients on raw UDP sockets, run inside a test's namespace.

    python tftp_abuser.py silent SERVER FILE BLKSIZE WINDOWSIZE SECONDS
        one RRQ with blksize and windowsize, waits 1.5 s (answering nothing), prints what
        came as one JSON line, ACKs the OACK once, prints ACKED and stays silent for SECONDS
        with its socket open and unread
    python tftp_abuser.py flood SERVER FILE PER_ADDRESS SECONDS ADDRESS...
        PER_ADDRESS RRQs from each ADDRESS (each from a port of its own), as fast as they
        go; prints FLOODED and the time it took, then keeps every socket open, unread and
        unanswered, for SECONDS

Packets are built here by hand (not with configserver's codec), so that the server's
parsing meets bytes it did not make itself.
"""

from __future__ import annotations

import json
import resource
import select
import socket
import struct
import sys
import time

RRQ, DATA, ACK, ERROR, OACK = 1, 3, 4, 5, 6


def _rrq(name: str, options: dict[str, int]) -> bytes:
    fields = [name, "octet"] + [text for item in options.items() for text in map(str, item)]
    return struct.pack("!H", RRQ) + b"".join(f.encode() + b"\0" for f in fields)


def silent(server: str, name: str, blksize: int, windowsize: int, seconds: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(_rrq(name, {"blksize": blksize, "windowsize": windowsize}), (server, 69))
    received: list[dict] = []
    tid = None
    deadline = time.monotonic() + 1.5
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data, sender = sock.recvfrom(70000)
        opcode = struct.unpack_from("!H", data)[0]
        packet: dict = {"opcode": opcode, "bytes": len(data), "at": round(1.5 - left, 3)}
        if opcode == OACK:
            tid = sender
            texts = data[2:].split(b"\0")[:-1]
            packet["options"] = dict(zip(map(bytes.decode, texts[::2]),
                                         map(bytes.decode, texts[1::2]), strict=True))
        received.append(packet)
    print(json.dumps({"before_ack": received}), flush=True)
    if tid is None:
        return
    sock.sendto(struct.pack("!HH", ACK, 0), tid)
    print("ACKED", flush=True)
    time.sleep(seconds)
    sock.close()


def flood(server: str, name: str, per_address: int, seconds: float,
          addresses: list[str]) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    request = _rrq(name, {})
    sockets = []
    started = time.monotonic()
    for _ in range(per_address):
        for address in addresses:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((address, 0))
            sock.sendto(request, (server, 69))
            sockets.append(sock)
    print(f"FLOODED {len(sockets)} {time.monotonic() - started:.3f}", flush=True)
    time.sleep(seconds)
    for sock in sockets:
        sock.close()


def main(argv: list[str]) -> None:
    mode, server, name, *rest = argv
    if mode == "silent":
        silent(server, name, int(rest[0]), int(rest[1]), float(rest[2]))
    elif mode == "flood":
        flood(server, name, int(rest[0]), float(rest[1]), rest[2:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
