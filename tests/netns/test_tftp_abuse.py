"""Clients that try to turn the TFTP server against others (issue 13, findings 2 and 3).

A silent client that acknowledges the OACK once and then nothing gets a bounded number of
bytes; a flood of unanswered requests from 125 addresses does not keep a fresh client out.
The misbehaving clients are raw UDP sockets (``tftp_abuser.py``) in the client namespace;
afterwards tftp-hpa, a real client, must still fetch a file intact.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import netlab
import pytest
from netlab import namespaces, veth_pair
from tftplab import TftpServerProcess, sha256

from configserver.config import TftpConfig

pytestmark = pytest.mark.netns

SERVER_IP, CLIENT_IP = "198.18.42.1", "198.18.42.2"
FLOODERS = [f"198.18.42.{10 + i}" for i in range(125)]
ABUSER = Path(__file__).with_name("tftp_abuser.py")
BOOT_SIZE = 1024 * 1024


@pytest.fixture
def lab(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with (root / "huge.bin").open("wb") as stream:
        stream.truncate(512 * 1024 * 1024)  # sparse: far more than any bound below
    (root / "boot.bin").write_bytes(os.urandom(BOOT_SIZE))
    with namespaces(2, "tftpx") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", f"{CLIENT_IP}/24")
        server = TftpServerProcess(server_ns, root, tmp_path, address=SERVER_IP)
        try:
            yield {"server": server, "server_ns": server_ns, "client": client_ns,
                   "root": root}
        finally:
            server.stop()


def _tx_bytes(ns) -> int:
    """Bytes sent on eth0 (Ethernet frames, so headers and fragments included)."""
    [link] = json.loads(ns.run("ip", "-s", "-j", "link", "show", "dev", "eth0").stdout)
    return link["stats64"]["tx"]["bytes"]


def _tftp_hpa_fetch(lab, target: Path) -> float:
    """tftp-hpa fetches boot.bin intact (it exits 0 even on an error: judge by the file)."""
    started = time.monotonic()
    result = lab["client"].run("tftp", "-m", "binary", SERVER_IP, "-c", "get", "boot.bin",
                               str(target), check=False, timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result
    assert sha256(target) == sha256(lab["root"] / "boot.bin")
    return elapsed


def test_a_silent_client_gets_a_bounded_number_of_bytes(lab, tmp_path):
    """RRQ with blksize 65464 and windowsize 64, one ACK of the OACK, then silence.

    Bound (the defaults): the window is lowered until it fits max_inflight_per_client (256 KiB:
    4 blocks of 65464 bytes); it is sent, resent once at the first timeout, and then only its
    first and last blocks go out at each further timeout, of which there are at most 10 before
    the one that gives up (the timer doubles from min_timeout, 20 ms, to its ceiling of 8 s in
    9 timeouts, 10.2 s, and the transfer gives up at the first timeout 30 s after progress).
    So 2 x 4 x 65464 + 10 x 2 x 65464 bytes of UDP payload (1.83 MB); on the wire (IP
    fragments of 1480 bytes, 34 bytes of Ethernet and IP header each) 2.3% more, plus 64 KiB
    for the OACKs, the ERROR and ARP. Before the fix the server resent the whole 64-block
    window (4.2 MB) on every timeout for 38 s: 25.7 MB on the wire (part of each window was
    lost to a full socket buffer).
    """
    config = TftpConfig()
    window = config.max_inflight_per_client // 65464 * 65464
    bound = (2 * window + 10 * 2 * 65464) * 1.03 + 64 * 1024
    server_ns, server = lab["server_ns"], lab["server"]
    before = _tx_bytes(server_ns)
    proc = lab["client"].popen(sys.executable, str(ABUSER), "silent", SERVER_IP, "huge.bin",
                               "65464", "64", "60", stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())["before_ack"]
        # RFC 2347 / 7440: nothing but the OACK (and its retransmission) before ACK 0.
        assert first and all(p["opcode"] == 6 for p in first), first
        options = first[0]["options"]
        assert proc.stdout.readline().strip() == "ACKED"
        acked = time.monotonic()
        gave_up = netlab.wait_for(
            lambda: re.search(r"huge.bin.*failed: (.*)", server.log()), 45,
            "the server to give up on the silent client", step=0.5)
        elapsed = time.monotonic() - acked
        sent = _tx_bytes(server_ns) - before
    finally:
        netlab.stop(proc)
    print(f"silent client: {sent} bytes sent in {elapsed:.1f} s until '{gave_up.group(1)}' "
          f"(bound {bound:.0f}; window {options})")
    assert sent <= bound
    assert int(options["blksize"]) * int(options["windowsize"]) <= window, options
    # It gives up at a timeout at most give_up_after (30 s) after the ACK: the longest wait
    # (8 x timeout) later at worst.
    assert elapsed < 30 + 8 * config.timeout + 2
    _tftp_hpa_fetch(lab, tmp_path / "boot.bin")


def test_a_flood_of_silent_requests_does_not_lock_out_a_fresh_client(lab, tmp_path):
    """1000 RRQs from 125 addresses (8 each, the per-address cap), never answered, fill every
    slot (max_transfers 1000); a fresh tftp-hpa client is still served at once (the oldest
    silent transfer makes room for it), and the silent ones end after silent_timeout."""
    config = TftpConfig()
    per_address = config.max_transfers_per_client
    assert per_address * len(FLOODERS) >= config.max_transfers
    client_ns, server = lab["client"], lab["server"]
    client_ns.run("ip", "-batch", "-", input="".join(
        f"addr add {address}/24 dev eth0\n" for address in FLOODERS))
    proc = client_ns.popen(sys.executable, str(ABUSER), "flood", SERVER_IP, "boot.bin",
                           str(per_address), "30", *FLOODERS, stdout=subprocess.PIPE,
                           text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[:2] == ["FLOODED", str(per_address * len(FLOODERS))], line
        flooded = time.monotonic()
        fetch_seconds = _tftp_hpa_fetch(lab, tmp_path / "boot.bin")

        def flood_ended() -> int:
            ended = re.findall(r"to 198\.18\.42\.(\d+) .* failed:", server.log())
            return sum(1 for host in ended if int(host) >= 10)

        netlab.wait_for(lambda: flood_ended() >= config.max_transfers,
                        config.silent_timeout + 10, "the silent transfers to end", step=0.2)
        reclaimed = time.monotonic() - flooded
    finally:
        netlab.stop(proc)
    print(f"flood of {line[1]} RRQs in {line[2]} s: tftp-hpa fetched 1 MiB in "
          f"{fetch_seconds:.2f} s; every silent transfer ended {reclaimed:.1f} s after the flood")
    assert fetch_seconds < 5
    assert reclaimed < config.silent_timeout + 10
