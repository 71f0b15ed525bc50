"""The config server's TLS side: its server certificate (kept fresh) and its SSL context,
and the client certificate it calls the agents' APIs with.

``server.pem``/``server.key`` live beside the CA. The certificate is issued again when the
names it must carry change or when less than a third of its lifetime is left.
``agent-client.pem``/``agent-client.key`` name the admin ``configserver`` (an agent lets only
admins open a guest's console) and are kept fresh the same way.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from configserver.errors import StoreError
from configserver.pki.authority import CertificateAuthority, general_names, write_private
from configserver.pki.identity import Identity

SERVER_LIFETIME = datetime.timedelta(days=90)
CLIENT_LIFETIME = datetime.timedelta(days=7)
AGENT_CLIENT = Identity("admin", "configserver")


def server_names(address: str | None, listen: str, hostname: str) -> list[str]:
    """What the server certificate names: our address, a specific listen address,
    127.0.0.1, localhost and the host name."""
    names = [address or "", "" if listen in ("", "0.0.0.0", "::") else listen,
             "127.0.0.1", "localhost", hostname]
    return list(dict.fromkeys(n for n in names if n))


def _current_names(certificate: x509.Certificate) -> set[str]:
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    return {str(n.value) for n in sans.value}


def _current(authority: CertificateAuthority, cert_path: Path, key_path: Path,
             lifetime: datetime.timedelta) -> x509.Certificate | None:
    """The certificate at ``cert_path`` if it is ours, has its key, and a third of
    ``lifetime`` or more left; else None (to be issued again)."""
    try:
        current = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return None
    fresh = (current.not_valid_after_utc.timestamp() - authority.now()
             > lifetime.total_seconds() / 3)
    ours = current.issuer == authority.certificate.subject and key_path.exists()
    return current if fresh and ours else None


def _store(key: ec.EllipticCurvePrivateKey, key_path: Path, cert_path: Path, pem: bytes, *,
           mode: int, what: str) -> None:
    try:
        cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        write_private(cert_path, pem, mode)
    except OSError as exc:
        raise StoreError(f"cannot write {what} in {cert_path.parent}: {exc}") from None


def ensure_server_certificate(authority: CertificateAuthority, directory: Path,
                              names: Sequence[str],
                              lifetime: datetime.timedelta = SERVER_LIFETIME,
                              ) -> tuple[Path, Path]:
    """``(server.pem, server.key)`` in ``directory``, issued again if stale; returns paths."""
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    wanted = {str(n.value) for n in general_names(names)}
    current = _current(authority, cert_path, key_path, lifetime)
    if current is not None and _current_names(current) == wanted:
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    issued = authority.issue_server_certificate(key, list(names), lifetime)
    _store(key, key_path, cert_path, issued.pem + authority.certificate_pem, mode=0o644,
           what="the server certificate")
    return cert_path, key_path


def server_context(authority: CertificateAuthority, cert_path: Path,
                   key_path: Path) -> ssl.SSLContext:
    """TLS 1.2 or newer; a client certificate is optional but, if sent, must be ours."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    context.load_verify_locations(cadata=authority.certificate_pem.decode())
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(ca_pem: bytes | None = None, ca_file: Path | None = None,
                   cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client's context trusting our CA only, with its client certificate if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_pem is not None:
        context.load_verify_locations(cadata=ca_pem.decode())
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def ensure_agent_client_certificate(authority: CertificateAuthority, directory: Path,
                                    lifetime: datetime.timedelta = CLIENT_LIFETIME,
                                    ) -> tuple[Path, Path]:
    """``(agent-client.pem, agent-client.key)`` in ``directory``, issued again if stale."""
    cert_path, key_path = directory / "agent-client.pem", directory / "agent-client.key"
    if _current(authority, cert_path, key_path, lifetime) is not None:
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    issued = authority.issue_client_certificate(key, AGENT_CLIENT, lifetime)
    _store(key, key_path, cert_path, issued.pem, mode=0o600,
           what="the agents' client certificate")
    return cert_path, key_path


def agent_client_context(authority: CertificateAuthority, cert_path: Path,
                         key_path: Path) -> ssl.SSLContext:
    """Calling an agent: its certificate must be our CA's; which node it names is checked by
    the caller (node certificates name a MAC, not an address)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=authority.certificate_pem.decode())
    context.load_cert_chain(cert_path, key_path)
    return context
