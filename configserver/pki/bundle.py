"""A user's client bundle, made where the key is born (the CLI): key, CSR, PKCS#12.

The server only ever sees the CSR; the key stays in the bundle directory (mode 0600).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from configserver.pki.authority import write_private


@dataclass(frozen=True)
class BundlePaths:
    key: Path
    certificate: Path
    ca: Path
    p12: Path


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_for(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def write_bundle(directory: Path, name: str, key: ec.EllipticCurvePrivateKey, *,
                 certificate_pem: bytes, ca_pem: bytes, passphrase: bytes) -> BundlePaths:
    """``NAME.key`` (0600), ``NAME.pem``, ``ca.pem`` and ``NAME.p12`` (0600) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = BundlePaths(directory / f"{name}.key", directory / f"{name}.pem",
                        directory / "ca.pem", directory / f"{name}.p12")
    write_private(paths.key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    write_private(paths.certificate, certificate_pem, 0o644)
    write_private(paths.ca, ca_pem, 0o644)
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    # PBESv2 with AES-256 (the library's best available), which browsers and openssl 3 read.
    p12 = pkcs12.serialize_key_and_certificates(
        name.encode(), key, certificate, [ca],
        serialization.BestAvailableEncryption(passphrase))
    write_private(paths.p12, p12)
    return paths
