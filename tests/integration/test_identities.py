"""x.509 identities against a real ``configserver serve``, with real clients: curl, openssl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import netlab
import pytest

pytestmark = pytest.mark.integration


def run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, input=stdin,
                          check=False)


@pytest.fixture
def server(tmp_path):
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "configserver", "serve", "--state-dir", str(state),
         "--images", str(tmp_path), "--http-port", "0", "--https-port", "0",
         "--listen", "127.0.0.1", "--tftp", "off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = state / "server.json"
    try:
        netlab.wait_for(endpoint.exists, 20, "the server to start", step=0.05, process=proc)
        yield state, json.loads(endpoint.read_text())
    finally:
        netlab.stop(proc)


def cli(state: Path, *args: str) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "configserver", "--state-dir", str(state), *args)


def curl(url: str, *options: str) -> tuple[int, str]:
    done = run("curl", "-s", "-o", "/dev/stderr", "-w", "%{http_code}", *options, url)
    return int(done.stdout or 0), done.stderr


def user(state: Path, out: Path, name: str, *role: str) -> list[str]:
    done = cli(state, "user", "add", name, *role, "--out", str(out / name))
    assert done.returncode == 0, done.stderr
    bundle = out / name
    return ["--cert", str(bundle / f"{name}.pem"), "--key", str(bundle / f"{name}.key"),
            "--cacert", str(bundle / "ca.pem")]


def test_curl_admin_tenant_nobody_and_revocation(server, tmp_path):
    state, endpoint = server
    api, plain = endpoint["url"], endpoint["http_url"]
    admin = user(state, tmp_path, "alice", "--admin")
    tenant = user(state, tmp_path, "bob", "--tenant", "acme")
    ca = ["--cacert", str(tmp_path / "alice" / "ca.pem")]
    assert curl(f"{api}/api/v1/nodes", *admin)[0] == 200
    assert curl(f"{api}/api/v1/nodes", *tenant)[0] == 403
    status, body = curl(f"{api}/api/v1/whoami", *tenant)
    assert status == 200 and json.loads(body)["tenant"] == "acme"
    assert curl(f"{api}/api/v1/nodes", *ca)[0] == 401
    assert curl(f"{api}/api/v1/health", *ca)[0] == 200
    # Plain HTTP serves firmware files and the CA, not the API.
    status, body = curl(f"{plain}/api/v1/nodes")
    assert status == 403 and json.loads(body)["code"] == "https_required"
    assert api in json.loads(body)["message"]
    status, body = curl(f"{plain}/boot/ca.pem")
    assert status == 200 and body == (tmp_path / "alice" / "ca.pem").read_text()

    assert cli(state, "user", "revoke", "bob").returncode == 0
    status, body = curl(f"{api}/api/v1/whoami", *tenant)
    assert status == 401 and "revoked" in body
    assert curl(f"{api}/api/v1/nodes", *admin)[0] == 200
    listed = json.loads(cli(state, "user", "list", "--json").stdout)
    assert [(u["name"], u["revoked"] is not None) for u in listed] == [("alice", False),
                                                                       ("bob", True)]
    crl = tmp_path / "crl.pem"
    crl.write_text(curl(f"{plain}/boot/crl.pem")[1])
    done = run("openssl", "verify", "-crl_check", "-CAfile", str(tmp_path / "bob" / "ca.pem"),
               "-CRLfile", str(crl), str(tmp_path / "bob" / "bob.pem"))
    assert done.returncode != 0 and "revoked" in done.stdout + done.stderr


def test_openssl_verifies_the_bundle_and_reads_the_p12(server, tmp_path):
    state, _ = server
    passphrase = tmp_path / "pass"
    passphrase.write_text("s3cret\n")
    done = cli(state, "user", "add", "carol", "--admin", "--out", str(tmp_path / "b"),
               "--days", "7", "--p12-passphrase-file", str(passphrase))
    assert done.returncode == 0, done.stderr
    assert "s3cret" not in done.stdout
    bundle = tmp_path / "b"
    assert (bundle / "carol.key").stat().st_mode & 0o777 == 0o600
    done = run("openssl", "verify", "-CAfile", str(bundle / "ca.pem"), str(bundle / "carol.pem"))
    assert done.returncode == 0 and ": OK" in done.stdout, done.stderr
    done = run("openssl", "pkcs12", "-in", str(bundle / "carol.p12"), "-passin", "pass:s3cret",
               "-nokeys", "-clcerts")
    assert done.returncode == 0 and "CN=carol" in done.stdout.replace(" ", ""), done.stderr
    again = cli(state, "user", "add", "carol", "--admin", "--out", str(tmp_path / "c"))
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "exists" in again.stderr


def test_tls_is_1_2_or_newer_only(server):
    _, endpoint = server
    target = endpoint["url"].removeprefix("https://")
    old = run("openssl", "s_client", "-connect", target, "-tls1_1")
    assert "Cipher is (NONE)" in old.stdout or old.returncode != 0
    for version in ("-tls1_2", "-tls1_3"):
        done = run("openssl", "s_client", "-connect", target, version)
        assert done.returncode == 0 and "Cipher is (NONE)" not in done.stdout, version


def test_the_cli_remote_with_a_bundle(server, tmp_path):
    state, endpoint = server
    user(state, tmp_path, "dave", "--admin")
    user(state, tmp_path, "erin", "--tenant", "acme")
    elsewhere = tmp_path / "elsewhere"  # no server state here: the bundle is the credential
    done = cli(elsewhere, "--server", endpoint["url"], "--bundle", str(tmp_path / "dave"),
               "node", "list", "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == [], done.stderr
    done = cli(elsewhere, "--server", endpoint["url"], "--bundle", str(tmp_path / "erin"),
               "node", "list")
    assert done.returncode == 1 and "may not" in done.stderr and "Traceback" not in done.stderr
    done = cli(elsewhere, "--server", endpoint["http_url"], "node", "list")
    assert done.returncode == 1 and "HTTPS only" in done.stderr
