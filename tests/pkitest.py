"""Certificates for tests: a CA in a temporary directory, TLS contexts for aiohttp's test
server and clients, and client bundles on disk for curl and openssl."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from configserver.pki import CertificateAuthority, Identity, IssuedCertificate
from configserver.pki.bundle import csr_for, new_key, write_bundle
from configserver.pki.tls import client_context, ensure_server_certificate, server_context

ADMIN = Identity("admin", "test-admin")
TENANT = Identity("tenant", "tess", tenant="acme")
DAY = datetime.timedelta(days=1)


class Pki:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.authority = CertificateAuthority.load_or_create(directory / "pki")

    def server_context(self) -> ssl.SSLContext:
        cert, key = ensure_server_certificate(self.authority, self.dir / "pki",
                                              ["127.0.0.1", "localhost"])
        return server_context(self.authority, cert, key)

    def bundle(self, identity: Identity, lifetime: datetime.timedelta = DAY,
               ) -> tuple[Path, Path, IssuedCertificate]:
        """``(cert, key, issued)`` of a fresh certificate for ``identity``, on disk."""
        key = new_key()
        issued = self.authority.sign_csr(csr_for(key, identity.name), identity, lifetime)
        paths = write_bundle(self.dir / f"bundle-{identity.kind}-{identity.name}",
                             identity.name, key, certificate_pem=issued.pem,
                             ca_pem=self.authority.certificate_pem, passphrase=b"test")
        return paths.certificate, paths.key, issued

    def client_context(self, identity: Identity | None = ADMIN) -> ssl.SSLContext:
        if identity is None:
            return client_context(self.authority.certificate_pem)
        cert, key, _ = self.bundle(identity)
        return client_context(self.authority.certificate_pem, cert=cert, key=key)


async def tls_client(aiohttp_client, app_or_server, pki: Pki, identity: Identity | None = ADMIN):
    """An aiohttp test client over TLS as ``identity`` (None: no client certificate); an
    application is served over TLS first, a running test server is reused."""
    connector = aiohttp.TCPConnector(ssl=pki.client_context(identity))
    server = app_or_server
    if isinstance(app_or_server, web.Application):
        server = TestServer(app_or_server)
        await server.start_server(ssl=pki.server_context())
    return await aiohttp_client(server, connector=connector)


class SplitClient:
    """One server, two ways in: firmware paths over plain HTTP (``plain``), the API over
    HTTPS as ``api`` (an admin by default), as the real listeners split them."""

    def __init__(self, plain: aiohttp.ClientSession, api, plain_url: str) -> None:
        self.port = int(plain_url.rsplit(":", 1)[1])  # of plain HTTP, as boot URLs name it
        self.plain = plain
        self.api = api
        self.plain_url = plain_url
        self.server = api.server

    def _pick(self, path):
        return self.api if str(path).startswith("/api/") else self.plain

    def request(self, method: str, path, **kwargs):
        return self._pick(path).request(method, path, **kwargs)

    def get(self, path, **kwargs):
        return self._pick(path).get(path, **kwargs)

    def post(self, path, **kwargs):
        return self._pick(path).post(path, **kwargs)

    def patch(self, path, **kwargs):
        return self._pick(path).patch(path, **kwargs)

    def delete(self, path, **kwargs):
        return self._pick(path).delete(path, **kwargs)

    def head(self, path, **kwargs):
        return self._pick(path).head(path, **kwargs)

    def make_url(self, path: str):
        return self.api.make_url(path)


async def split_client(aiohttp_client, app: web.Application, pki: Pki,
                       identity: Identity | None = ADMIN, cleanup=None) -> SplitClient:
    """Serve ``app`` over TLS (the test server) and over plain HTTP on a second site."""
    api = await tls_client(aiohttp_client, app, pki, identity)
    site = web.TCPSite(api.server.runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    plain = aiohttp.ClientSession(base_url=url)
    if cleanup is not None:
        cleanup.append(plain)
    return SplitClient(plain, api, url)
