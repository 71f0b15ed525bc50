"""The node's x.509 identity: the config server's CA, pinned, and this boot's key and certificate.

* The boot script names the CA by fingerprint (``netboot.ca=<base64url SHA-256>``) on the
  kernel command line, which arrives the same way as the kernel itself. The agent fetches the
  CA certificate and the API's URL from the boot server (``/boot/agent.json``, plain HTTP like
  every boot file) and trusts the CA only if its SHA-256 matches: from then on every API call
  is HTTPS against that CA, so a forged answer can name another URL but not another CA.
* The key is made at start (ECDSA P-256) and lives in the state directory, a tmpfs: RAM on a
  diskless node, gone with the boot. The agent sends a CSR with this boot's token and gets a
  short-lived certificate naming the node and this boot; heartbeats and inventory pushes then
  authenticate with it (mutual TLS), and it is renewed before it expires.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodeagent.errors import ServerError

TRUST_PATH = "boot/agent.json"
# How the config server's CA names who a certificate is for (a URI SAN).
MAX_TRUST_BYTES = 64 * 1024


def ca_fingerprint(pem: bytes) -> str:
    """``sha256:`` and the unpadded base64url SHA-256 of the certificate's DER."""
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    digest = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=")
    return "sha256:" + digest.decode()


@dataclass(frozen=True)
class BootTrust:
    """What the boot server says about its API: the URL, and the CA its certificate chains to."""

    api_url: str
    ca_pem: bytes


async def fetch_boot_trust(http: aiohttp.ClientSession, server: str, fingerprint: str,
                           timeout: float) -> BootTrust:
    """The API's URL and CA from the boot server, if the CA is the one the command line pins."""
    url = f"{server.rstrip('/')}/{TRUST_PATH}"
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                raise ServerError(f"cannot fetch {url}: HTTP {response.status}",
                                  http_status=response.status)
            body = await response.content.read(MAX_TRUST_BYTES + 1)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise ServerError(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from None
    try:
        answer = json.loads(body) if len(body) <= MAX_TRUST_BYTES else None
        api_url, pem = str(answer["api_url"]), str(answer["ca_pem"]).encode()
        found = ca_fingerprint(pem)
    except (ValueError, TypeError, KeyError):
        raise ServerError(f"{url} is not what a config server answers") from None
    if found != fingerprint:
        raise ServerError(f"the CA at {url} is not the one this boot names "
                          f"({found} != {fingerprint})")
    if not api_url.startswith("https://"):
        raise ServerError(f"{url} names no HTTPS API ({api_url[:80]!r})")
    return BootTrust(api_url.rstrip("/"), pem)


def server_context(ca_pem: bytes) -> ssl.SSLContext:
    """TLS 1.2+ trusting only our CA, checking the server's name against its certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass(frozen=True)
class Certificate:
    pem: bytes
    not_after: float
    renew_after: float


class NodeKey:
    """This boot's private key and the certificate issued for it, in the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.key_path = state_dir / "node.key"
        self.cert_path = state_dir / "node.pem"
        self._meta_path = state_dir / "node.json"
        self._key: ec.EllipticCurvePrivateKey | None = None

    def _private_key(self) -> ec.EllipticCurvePrivateKey:
        if self._key is None:
            try:
                loaded = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
                if isinstance(loaded, ec.EllipticCurvePrivateKey):
                    self._key = loaded
            except (OSError, ValueError):
                pass
        if self._key is None:
            self._key = ec.generate_private_key(ec.SECP256R1())
            _write_private(self.key_path, self._key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
        return self._key

    def csr(self, mac: str) -> bytes:
        """A CSR naming the node; the server decides what its certificate says."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, mac)])
        request = x509.CertificateSigningRequestBuilder().subject_name(name).sign(
            self._private_key(), hashes.SHA256())
        return request.public_bytes(serialization.Encoding.PEM)

    def store(self, certificate: Certificate, boot_id: str) -> None:
        _write_private(self.cert_path, certificate.pem)
        _write_private(self._meta_path, json.dumps(
            {"boot_id": boot_id, "not_after": certificate.not_after,
             "renew_after": certificate.renew_after}).encode())

    def saved(self, boot_id: str, now: float | None = None) -> Certificate | None:
        """The certificate kept from an earlier start in this boot, if still good."""
        try:
            meta = json.loads(self._meta_path.read_bytes())
            if meta.get("boot_id") != boot_id:
                return None
            pem = self.cert_path.read_bytes()
            certificate = Certificate(pem, float(meta["not_after"]),
                                      float(meta["renew_after"]))
            self._private_key()
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return certificate if certificate.not_after > (now or time.time()) + 60 else None

    def client_context(self, ca_pem: bytes) -> ssl.SSLContext:
        """The server context, also presenting this node's certificate (mutual TLS)."""
        context = server_context(ca_pem)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def api_server_context(ca_pem: bytes, key: NodeKey) -> ssl.SSLContext:
    """The agent's own API: this node's certificate, clients' certificates checked against our
    CA when they present one (the local token still works without)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=ca_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_cert_chain(key.cert_path, key.key_path)
    return context


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f".{path.name}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(partial, path)
