"""The config server's own certificate authority (ECDSA P-256), kept in the state directory.

``ca.key`` (mode 0600) and ``ca.pem`` are created at first start and never regenerated while
they exist. The CA signs what the server hands out: its own TLS certificate, users' client
certificates and nodes' short-lived certificates, each naming one ``Identity``; it also signs
the CRL of revoked serials. Nothing here does network I/O; files are written atomically.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from configserver.errors import InvalidCsr, StoreError, WeakKey
from configserver.pki.identity import Identity

CA_LIFETIME = datetime.timedelta(days=3650)
BACKDATE = datetime.timedelta(minutes=5)  # clocks of freshly booted nodes lag
MIN_RSA_BITS = 2048
MIN_EC_BITS = 256
MAX_LIFETIME = datetime.timedelta(days=825)

Clock = Callable[[], float]


@dataclass(frozen=True)
class IssuedCertificate:
    serial: int
    pem: bytes
    not_after: float


def fingerprint_of(certificate: x509.Certificate) -> str:
    """``sha256:`` + unpadded base64url of SHA-256 over the certificate's DER."""
    digest = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest()
    return "sha256:" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically, created with ``mode`` (never wider first)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(partial, mode)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def check_public_key(key: object) -> None:
    """Refuse keys too weak to sign for (WeakKey)."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise WeakKey(f"RSA key of {key.key_size} bits refused",
                          hint=f"use ECDSA P-256 or RSA of {MIN_RSA_BITS} bits or more")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.key_size < MIN_EC_BITS:
            raise WeakKey(f"elliptic curve {key.curve.name} refused",
                          hint="use P-256, P-384 or P-521")
    elif not isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise WeakKey(f"key type {type(key).__name__} refused",
                      hint="use ECDSA P-256 or RSA of 2048 bits or more")


def general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    """IP addresses as IP SANs, everything else as DNS names (duplicates dropped)."""
    result: list[x509.GeneralName] = []
    for name in dict.fromkeys(n for n in names if n):
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


class CertificateAuthority:
    """Our CA: load it with ``load_or_create``; signing needs no I/O."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate,
                 clock: Clock = time.time) -> None:
        self._key = key
        self.certificate = certificate
        self._clock = clock
        self.certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
        self.fingerprint = fingerprint_of(certificate)

    @classmethod
    def load_or_create(cls, directory: Path, clock: Clock = time.time) -> CertificateAuthority:
        """The CA in ``directory`` (``ca.key``, ``ca.pem``), created on first use."""
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if key_path.exists() or cert_path.exists():
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
                if not isinstance(key, ec.EllipticCurvePrivateKey) or (
                        key.public_key() != certificate.public_key()):
                    raise StoreError(f"{key_path} does not belong to {cert_path}",
                                     hint="restore both files from the same backup")
                return cls(key, certificate, clock)
            authority = cls._create(clock)
            write_private(key_path, authority._key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            write_private(cert_path, authority.certificate_pem, 0o644)
            return authority
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot load the certificate authority in {directory}: {exc}",
                             hint="ca.key and ca.pem must both be there, or neither") from None

    @classmethod
    def _create(cls, clock: Clock) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _utc(clock())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "netboot-appliance"),
                          x509.NameAttribute(NameOID.COMMON_NAME,
                                             f"netboot config server CA {now:%Y-%m-%d}")])
        public = key.public_key()
        certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
        return cls(key, certificate, clock)

    def now(self) -> float:
        return float(self._clock())

    def derive_secret(self, label: str) -> bytes:
        """A secret of this CA for ``label`` (stable across restarts, unique per CA)."""
        private = self._key.private_numbers().private_value.to_bytes(32, "big")
        return hashlib.sha256(label.encode() + b"\0" + private).digest()

    def sign_csr(self, csr_pem: bytes, identity: Identity, lifetime: datetime.timedelta,
                 sans: Sequence[str] = ()) -> IssuedCertificate:
        """A certificate for the key of ``csr_pem`` naming ``identity`` (not the CSR's subject).

        Refuses (InvalidCsr, WeakKey) a CSR that does not parse, whose self-signature does not
        verify or whose key is weak. Node certificates serve and authenticate (both EKUs).
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise InvalidCsr(f"the certificate request is not a PEM CSR: {exc}",
                             hint="e.g. openssl req -new -key KEY") from None
        try:
            valid = csr.is_signature_valid
        except (InvalidSignature, ValueError):
            valid = False
        if not valid:
            raise InvalidCsr("the certificate request's signature does not verify",
                             hint="sign the CSR with the key it carries")
        public = csr.public_key()
        check_public_key(public)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if identity.kind == "node":
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri())]
        return self._issue(public, identity.subject(), lifetime,
                           names + general_names(sans), usages)

    def issue_client_certificate(self, key: ec.EllipticCurvePrivateKey, identity: Identity,
                                 lifetime: datetime.timedelta) -> IssuedCertificate:
        """A client certificate naming ``identity`` for a key of the config server's own
        (what it calls the agents' APIs with)."""
        return self._issue(key.public_key(), identity.subject(), lifetime,
                           [x509.UniformResourceIdentifier(identity.uri())],
                           [ExtendedKeyUsageOID.CLIENT_AUTH])

    def issue_server_certificate(self, key: ec.EllipticCurvePrivateKey, names: Sequence[str],
                                 lifetime: datetime.timedelta) -> IssuedCertificate:
        """The TLS server certificate of the config server itself for ``names``."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                names[0] if names else "configserver")])
        return self._issue(key.public_key(), subject, lifetime, general_names(names),
                           [ExtendedKeyUsageOID.SERVER_AUTH])

    def _issue(self, public: object, subject: x509.Name, lifetime: datetime.timedelta,
               names: list[x509.GeneralName], usages: list[x509.ObjectIdentifier],
               ) -> IssuedCertificate:
        lifetime = min(lifetime, MAX_LIFETIME)
        now = _utc(self.now())
        not_after = min(now + lifetime, self.certificate.not_valid_after_utc)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder().subject_name(subject)
            .issuer_name(self.certificate.subject).public_key(public)  # type: ignore[arg-type]
            .serial_number(serial).not_valid_before(now - BACKDATE).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=isinstance(public, rsa.RSAPublicKey), data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(serial=serial,
                                 pem=certificate.public_bytes(serialization.Encoding.PEM),
                                 not_after=not_after.timestamp())

    def crl_pem(self, revoked: Iterable[tuple[int, float]],
                next_update: datetime.timedelta = datetime.timedelta(days=1)) -> bytes:
        """The CRL of ``revoked`` (serial, revocation time), signed now."""
        now = _utc(self.now())
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.certificate.subject)
                   .last_update(now - BACKDATE).next_update(now + next_update))
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(_utc(when)).build())
        return builder.sign(self._key, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM)
