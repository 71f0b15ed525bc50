"""perfdhcp (Kea's load generator) against our server: 1000 complete exchanges, no failure.

perfdhcp talks to a server address as a DHCP relay would: every request carries giaddr (here
198.19.0.1, a relayed subnet declared in the config) and our answers go back to the relay.
"""

from __future__ import annotations

import re
import shutil

import pytest
from netlab import namespaces, veth_pair
from test_dhcp_clients import SERVER_IP, DhcpServer

pytestmark = pytest.mark.netns

RELAY_IP = "198.19.0.1"
EXCHANGES = 1000
# More simulated clients than exchanges: perfdhcp may start one or two exchanges past -n, and a
# client it reuses gets its own address again, which perfdhcp counts as "non unique".
CLIENTS = 4 * EXCHANGES


def stats(output: str, exchange: str) -> dict[str, float]:
    section = output.split(f"***Statistics for: {exchange}***", 1)[1].split("***", 1)[0]
    return {key: float(value) for key, value in
            re.findall(r"^(sent packets|received packets|drops|rejected leases|"
                       r"non unique addresses): ([0-9.]+)", section, re.MULTILINE)}


@pytest.mark.skipif(shutil.which("perfdhcp") is None, reason="perfdhcp (kea-admin) missing")
def test_perfdhcp_thousand_relayed_exchanges(tmp_path):
    with namespaces(2, "nbperf") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", "198.18.0.2/24")
        client_ns.ip("addr", "add", f"{RELAY_IP}/16", "dev", "eth0")
        server_ns.ip("route", "add", "198.19.0.0/16", "via", "198.18.0.2")
        server = DhcpServer(server_ns, tmp_path, "--log-level", "WARNING",
                            "--subnet", "198.18.0.0/24",
                            "--relayed", "198.19.0.0/16,pool=198.19.1.0-198.19.9.255,"
                                         f"router={RELAY_IP}", "--relay", RELAY_IP,
                            # 1000 new clients in 5 s: above the defaults for unregistered MACs.
                            "--dhcp-setting", "unknown_rate=1000",
                            "--dhcp-setting", "unknown_burst=1000")
        try:
            result = client_ns.run(
                # -d 5: an answer is "lost" only after 5 s (the CI host may be busy).
                "perfdhcp", "-4", "-l", RELAY_IP, "-r", "200", "-R", str(CLIENTS),
                "-n", str(EXCHANGES), "-u", "-d", "5", "-W", "6000000", SERVER_IP,
                check=False, timeout=90)
        finally:
            summary = server.stop()
        output = result.stdout
        assert "***Statistics for: REQUEST-ACK***" in output, (result.stderr,
                                                               server.log_text())
        offers, acks = stats(output, "DISCOVER-OFFER"), stats(output, "REQUEST-ACK")
        # perfdhcp may start a couple more than -n before it stops.
        started = offers["sent packets"]
        assert started >= EXCHANGES
        assert offers["received packets"] == started, output
        assert acks["sent packets"] == started, output
        assert acks["received packets"] == started, output
        assert offers["drops"] == acks["drops"] == 0
        assert acks["rejected leases"] == 0
        assert acks["non unique addresses"] == 0
        assert re.search(r"Malformed packets: 0\b", output)
        assert summary.startswith(f"answered={2 * int(started)} dropped=0"), summary
