"""Who a certificate names: one ``Identity`` per certificate, encoded in a URI SAN.

The subject (CN = name, OU = kind, O = tenant) is for people reading ``openssl x509 -text``;
``identity_of`` decodes only the URI SAN ``urn:netboot:<kind>:<name>[:<tenant or boot id>]``
(each part percent-encoded), which only our CA writes.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from configserver.errors import InvalidRequest, Unauthorized

KINDS = ("admin", "tenant", "node", "monitor")
URN_PREFIX = "urn:netboot:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")


@dataclass(frozen=True)
class Identity:
    """An admin, a tenant's user, a monitor (a Prometheus server: it reads metrics and scrape
    targets, nothing else), or one boot of one node (``name`` is then its MAC)."""

    kind: str
    name: str
    tenant: str | None = None
    boot_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequest(f"unknown identity kind {self.kind!r}",
                                 hint="one of: " + ", ".join(KINDS))
        for label, value in (("name", self.name), ("tenant", self.tenant),
                             ("boot id", self.boot_id)):
            if value is not None and not _NAME.match(value):
                raise InvalidRequest(f"invalid {label} {value!r}",
                                     hint="letters, digits and ._@:- (at most 128)")
        if (self.kind == "tenant") != (self.tenant is not None):
            raise InvalidRequest("a tenant identity names its tenant, and only it does")
        if (self.kind == "node") != (self.boot_id is not None):
            raise InvalidRequest("a node identity names its boot, and only it does")

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    def uri(self) -> str:
        extra = self.tenant or self.boot_id
        parts = [self.kind, self.name] + ([extra] if extra else [])
        return URN_PREFIX + ":".join(urllib.parse.quote(p, safe="") for p in parts)

    def subject(self) -> x509.Name:
        names = [x509.NameAttribute(NameOID.COMMON_NAME, self.name),
                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self.kind)]
        if self.tenant:
            names.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.tenant))
        return x509.Name(names)

    def to_json(self) -> dict[str, str | None]:
        return {"kind": self.kind, "name": self.name, "tenant": self.tenant,
                "boot_id": self.boot_id}


def identity_of(certificate: x509.Certificate) -> Identity:
    """The identity a certificate of our CA names; Unauthorized if it names none."""
    refused = Unauthorized("the client certificate names no netboot identity",
                           hint="use a certificate issued by 'configserver user add'")
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise refused from None
    uris = [u for u in sans.value.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(URN_PREFIX)]
    if len(uris) != 1:
        raise refused
    parts = [urllib.parse.unquote(p) for p in uris[0][len(URN_PREFIX):].split(":")]
    try:
        if parts[0] == "tenant" and len(parts) == 3:
            return Identity("tenant", parts[1], tenant=parts[2])
        if parts[0] == "node" and len(parts) == 3:
            return Identity("node", parts[1], boot_id=parts[2])
        if parts[0] in ("admin", "monitor") and len(parts) == 2:
            return Identity(parts[0], parts[1])
    except InvalidRequest:
        pass
    raise refused
