"""TFTP through the product: `configserver serve --interface eth0` serves the iPXE binaries."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import netlab
import pytest
from netlab import namespaces, veth_pair
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.netns

SERVER_IP, CLIENT_IP = "198.18.41.1", "198.18.41.2"
IPXE_DIR = Path("/usr/lib/ipxe")
REPO = Path(__file__).resolve().parents[2]


def _serve(ns, state_dir: Path, log_path: Path, tftp: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "configserver", "serve", "--state-dir", str(state_dir),
            "--interface", "eth0", "--tftp", tftp, "--ipxe-dir", str(IPXE_DIR)]
    with log_path.open("w") as log:
        proc = ns.popen(*argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        netlab.wait_for(lambda: "config server ready" in log_path.read_text(), 30,
                        "configserver serve to start", step=0.1, process=proc, log=log_path)
    except AssertionError:
        netlab.stop(proc)
        raise
    return proc


@pytest.fixture
def pair():
    with namespaces(2, "tftps") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", f"{CLIENT_IP}/24")
        yield server_ns, client_ns


@pytest.mark.skipif(not (IPXE_DIR / "undionly.kpxe").exists(), reason="Debian ipxe missing")
@pytest.mark.parametrize("name", ["undionly.kpxe", "snponly.efi", "ipxe.efi"])
def test_serve_answers_tftp_with_the_ipxe_binaries(pair, tmp_path, name):
    server_ns, client_ns = pair
    proc = _serve(server_ns, tmp_path / "state", tmp_path / "serve.log", "on")
    try:
        target = tmp_path / name
        result = client_ns.run("atftp", "--option", "blksize 1468", "--option",
                               "windowsize 8", "-g", "-r", name, "-l", str(target),
                               SERVER_IP, "69", check=False)
        assert result.returncode == 0, result.stderr
        assert (hashlib.sha256(target.read_bytes()).hexdigest()
                == hashlib.sha256((IPXE_DIR / name).read_bytes()).hexdigest())
        refused = client_ns.run("tftp", "-m", "binary", SERVER_IP, "-c", "put",
                                str(target), name, check=False)
        assert "Error code 2" in refused.stdout + refused.stderr
        # /metrics (the local admin's socket) counts the transfer, its bytes and the refusal.
        text = subprocess.run(["curl", "-sf", "--unix-socket", str(tmp_path / "state" /
                                                                   "api.sock"),
                               "http://local/metrics"], check=True, capture_output=True,
                              text=True, timeout=30).stdout
        samples = {(s.name, tuple(s.labels.items())): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples["netboot_tftp_transfers_total", (("result", "complete"),)] == 1
        assert samples["netboot_tftp_bytes_total", ()] == (IPXE_DIR / name).stat().st_size
        assert samples["netboot_tftp_errors_total", (("code", "access_violation"),)] == 1
    finally:
        netlab.stop(proc, 15)
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()


def test_tftp_off_leaves_port_69_closed(pair, tmp_path):
    server_ns, _ = pair
    (tmp_path / "state").mkdir()
    proc = _serve(server_ns, tmp_path / "state", tmp_path / "serve.log", "off")
    try:
        listening = server_ns.run("ss", "-Hlun", "sport", "= :69").stdout
        assert listening.strip() == ""
    finally:
        netlab.stop(proc, 15)
