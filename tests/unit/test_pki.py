"""configserver.pki: the CA's files, what it signs and refuses, identities, CRL, server cert."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from configserver.errors import InvalidCsr, InvalidRequest, StoreError, Unauthorized, WeakKey
from configserver.pki import CertificateAuthority, Identity, identity_of
from configserver.pki.bundle import csr_for, new_key
from configserver.pki.tls import ensure_server_certificate, server_names

DAY = datetime.timedelta(days=1)


def csr(key=None, name="x") -> bytes:
    return csr_for(key or new_key(), name)


def test_the_ca_is_created_once_with_a_private_key(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "pki")
    assert (tmp_path / "pki" / "ca.key").stat().st_mode & 0o777 == 0o600
    again = CertificateAuthority.load_or_create(tmp_path / "pki")
    assert again.fingerprint == ca.fingerprint and again.certificate_pem == ca.certificate_pem
    der = x509.load_pem_x509_certificate(ca.certificate_pem).public_bytes(
        serialization.Encoding.DER)
    digest = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert ca.fingerprint == "sha256:" + digest and "=" not in ca.fingerprint
    cert = x509.load_pem_x509_certificate(ca.certificate_pem)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_half_a_ca_is_refused_not_replaced(tmp_path):
    CertificateAuthority.load_or_create(tmp_path)
    key = (tmp_path / "ca.key").read_bytes()
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(StoreError, match=r"ca\.pem") as refused:
        CertificateAuthority.load_or_create(tmp_path)
    assert "ca.key and ca.pem" in refused.value.hint
    assert (tmp_path / "ca.key").read_bytes() == key


@pytest.mark.parametrize("identity", [
    Identity("admin", "alice"), Identity("tenant", "bob", tenant="acme"),
    Identity("node", "52:54:00:aa:bb:01", boot_id="3f0c1a52-0000-4000-8000-000000000001")])
def test_identities_round_trip_through_a_certificate(tmp_path, identity):
    ca = CertificateAuthority.load_or_create(tmp_path)
    issued = ca.sign_csr(csr(name="ignored"), identity, DAY,
                         sans=["198.18.0.21", "store1"] if identity.kind == "node" else ())
    cert = x509.load_pem_x509_certificate(issued.pem)
    assert identity_of(cert) == identity
    assert cert.serial_number == issued.serial
    assert cert.not_valid_after_utc.timestamp() == pytest.approx(issued.not_after)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity.name
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    if identity.kind == "node":
        assert usages == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("198.18.0.21")]
        assert sans.get_values_for_type(x509.DNSName) == ["store1"]
    else:
        assert usages == {ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.certificate_pem))


def test_a_csr_with_a_bad_signature_is_refused(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path)
    # The CSR of one key, with the public key of another: its self-signature fails.
    good = x509.load_pem_x509_csr(csr())
    other = new_key().public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    der = good.public_bytes(serialization.Encoding.DER)
    mine = good.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    forged = der.replace(mine, other)
    assert forged != der
    pem = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(forged)
           + b"-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(InvalidCsr, match="signature does not verify"):
        ca.sign_csr(pem, Identity("admin", "a"), DAY)
    with pytest.raises(InvalidCsr, match="not a PEM CSR"):
        ca.sign_csr(b"hello", Identity("admin", "a"), DAY)


def test_weak_keys_are_refused(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")]))
               .sign(weak, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(WeakKey, match="1024 bits") as refused:
        ca.sign_csr(request, Identity("admin", "a"), DAY)
    assert refused.value.status == 400 and refused.value.code == "weak_key"


def test_a_certificate_of_another_ca_names_nobody(tmp_path):
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    cert = x509.load_pem_x509_certificate(other.certificate_pem)
    with pytest.raises(Unauthorized):
        identity_of(cert)


def test_identities_are_checked():
    for bad in (lambda: Identity("root", "a"), lambda: Identity("tenant", "a"),
                lambda: Identity("admin", "a", tenant="t"), lambda: Identity("node", "a"),
                lambda: Identity("admin", "a b"), lambda: Identity("admin", "")):
        with pytest.raises(InvalidRequest):
            bad()


def test_the_crl_lists_revoked_serials(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path)
    issued = ca.sign_csr(csr(), Identity("admin", "a"), DAY)
    crl = x509.load_pem_x509_crl(ca.crl_pem([(issued.serial, 1_800_000_000.0)]))
    assert crl.is_signature_valid(x509.load_pem_x509_certificate(
        ca.certificate_pem).public_key())
    assert crl.get_revoked_certificate_by_serial_number(issued.serial) is not None
    assert len(crl) == 1


def test_the_server_certificate_follows_names_and_expiry(tmp_path):
    now = [1_800_000_000.0]
    ca = CertificateAuthority.load_or_create(tmp_path, clock=lambda: now[0])
    names = server_names("198.18.0.1", "0.0.0.0", "cfg1")
    assert names == ["198.18.0.1", "127.0.0.1", "localhost", "cfg1"]
    cert_path, key_path = ensure_server_certificate(ca, tmp_path, names)
    first = cert_path.read_bytes()
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert ensure_server_certificate(ca, tmp_path, names)[0].read_bytes() == first
    moved = server_names("198.18.0.2", "198.18.0.2", "cfg1")
    ensure_server_certificate(ca, tmp_path, moved)
    second = cert_path.read_bytes()
    assert second != first
    sans = x509.load_pem_x509_certificate(second).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("198.18.0.2") in sans.get_values_for_type(x509.IPAddress)
    now[0] += 70 * 86400  # 20 of 90 days left: issued again
    ensure_server_certificate(ca, tmp_path, moved)
    assert cert_path.read_bytes() != second


def test_users_in_the_registry_revoke_and_come_back(tmp_path):
    from configserver.errors import Conflict, NotFound
    from configserver.registry.sqlite import SqliteRegistry

    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    try:
        user = registry.add_user("alice", "admin", None, 2**150 + 1, 1_900_000_000.0)
        assert user.serial == 2**150 + 1 and user.revoked is None
        with pytest.raises(Conflict):
            registry.add_user("alice", "admin", None, 7, 1_900_000_000.0)
        with pytest.raises(NotFound):
            registry.revoke_user("nobody")
        assert registry.revoke_user("alice").revoked is not None
        assert [s for s, _ in registry.revoked_certificates()] == [2**150 + 1]
        again = registry.add_user("alice", "tenant", "acme", 8, 1_900_000_000.0)
        assert (again.kind, again.tenant, again.serial, again.revoked) == ("tenant", "acme",
                                                                           8, None)
        assert [s for s, _ in registry.revoked_certificates()] == [2**150 + 1]
    finally:
        registry.close()
