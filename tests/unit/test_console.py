"""The console's pure parts: where the server finds it, what the agent refuses, the client's
Ctrl-] and control frames, the server's client certificate, where the agent's API listens."""

from __future__ import annotations

import datetime
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from configserver.cli.console import console_path, control_message, split_escape
from configserver.cloud.instances import Claim, Instance
from configserver.errors import Conflict, NotFound, ServerUnavailable
from configserver.http.consoleapi import agent_console_url
from configserver.model import Nic, Node
from configserver.pki.identity import identity_of
from configserver.pki.tls import ensure_agent_client_certificate
from nodeagent.config import build_config
from nodeagent.roles.console import ConsoleRefused, Consoles

DOM0 = "52:54:00:00:d0:01"


def web(**changes) -> Instance:
    fields = {"id": "0123456789abcdef", "name": "web", "memory": 256 << 20, "vcpus": 1,
              "volume": None, "claim": Claim(DOM0, 3), "actual": "running"}
    return Instance(**{**fields, **changes})


def dom0(status: dict | None = None) -> Node:
    return Node(mac=DOM0, role="dom0", hostname="dom0-1", nics=(Nic(DOM0, None),),
                facts={"status": status} if status is not None else {})


REACHABLE = {"agent": {"api_port": 9898}, "address": "198.18.0.10"}


def test_the_console_is_at_the_claim_holder_s_agent():
    assert agent_console_url(web(), dom0(REACHABLE), force=False) == (
        "https://198.18.0.10:9898/v1/console/nb-web")
    url = agent_console_url(web(), dom0({**REACHABLE, "address": "fd00::10"}), force=True,
                            who="urn:netboot:tenant:ann:acme")
    assert url == ("https://[fd00::10]:9898/v1/console/nb-web?force=1&"
                   "for=urn%3Anetboot%3Atenant%3Aann%3Aacme")


@pytest.mark.parametrize(("instance", "node", "error", "says"), [
    (web(claim=None, actual="stopped"), dom0(REACHABLE), Conflict, "not placed on any dom0"),
    (web(actual="starting"), dom0(REACHABLE), Conflict, "is starting, not running"),
    (web(), None, NotFound, "is not registered"),
    (web(), dom0(), ServerUnavailable, "serves no API"),  # never heartbeated
    (web(), dom0({"agent": {"api_port": None}, "address": "198.18.0.10"}),
     ServerUnavailable, "loopback only"),  # an agent on plain HTTP or loopback
])
def test_no_console_url_without_a_running_guest_and_a_reachable_agent(instance, node, error,
                                                                       says):
    with pytest.raises(error) as refused:
        agent_console_url(instance, node, force=False)
    assert says in refused.value.message + refused.value.hint


def test_the_agent_refuses_other_domains_and_a_second_attach():
    consoles = Consoles()
    for domain, code in (("Domain-0", "invalid_domain"), ("nb-../x", "invalid_domain"),
                         ("nb-db", "not_running")):
        with pytest.raises(ConsoleRefused) as refused:
            consoles._check(domain, False, ["Domain-0", "nb-web"])
        assert refused.value.code == code
    consoles._check("nb-web", False, ["nb-web"])  # free: allowed


def test_ctrl_bracket_detaches_and_nothing_after_it_is_sent():
    assert split_escape(b"ls -l\r") == (b"ls -l\r", False)
    assert split_escape(b"ls\x1dmore") == (b"ls", True)
    assert split_escape(b"\x1d") == (b"", True)
    assert console_path("web", False) == "/api/v1/instances/web/console"
    assert console_path("web", True).endswith("/console?force=1")


def test_control_frames_are_json_objects_or_nothing():
    assert control_message(json.dumps({"attached": {"domain": "nb-web"}})) == {
        "attached": {"domain": "nb-web"}}
    assert control_message("not json") == {} and control_message("[1]") == {}


def test_the_server_calls_agents_as_an_admin_of_its_own_kept_fresh(pki, tmp_path):
    directory = tmp_path / "state" / "pki"
    cert, key = ensure_agent_client_certificate(pki.authority, directory)
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    identity = identity_of(issued)
    assert (identity.kind, identity.name) == ("admin", "configserver")
    usages = issued.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # it serves nothing
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert ensure_agent_client_certificate(pki.authority, directory) == (cert, key)
    assert cert.read_bytes() == issued.public_bytes(Encoding.PEM)  # kept while fresh
    # Near its end (less than a third of its week left) it is issued again.
    ensure_agent_client_certificate(pki.authority, directory,
                                    lifetime=datetime.timedelta(days=30))
    again = x509.load_pem_x509_certificate(cert.read_bytes())
    assert again.serial_number != issued.serial_number


def test_the_agent_api_listens_on_every_address_only_with_https():
    https = build_config({"server": "http://s", "boot_id": "b", "ca_fingerprint": "A" * 43})
    plain = build_config({"server": "http://s", "boot_id": "b"})
    pinned = build_config({"server": "http://s", "boot_id": "b", "ca_fingerprint": "A" * 43,
                           "api_listen": "198.18.0.10"})
    assert https.api_address == "0.0.0.0" and plain.api_address == "127.0.0.1"
    assert pinned.api_address == "198.18.0.10"
