"""x.509 identities: the config server's own CA, the certificates it issues, who they name.

Pure library code: the CA's files are read and written by ``load_or_create`` and
``ensure_server_certificate`` when the server starts; signing and decoding do no I/O.
"""

from configserver.pki.authority import CertificateAuthority, IssuedCertificate, fingerprint_of
from configserver.pki.identity import Identity, identity_of
from configserver.pki.revocations import Revocations

__all__ = ["CertificateAuthority", "Identity", "IssuedCertificate", "Revocations",
           "fingerprint_of",
           "identity_of"]
