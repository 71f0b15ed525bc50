"""The API's two listeners besides plain HTTP: HTTPS (client certificates of our CA) and
the local admin's unix socket (mode 0600). Sockets are bound here, before the application
is built, so that the HTTPS URL (its port) is known to the boot side."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from configserver.config import ServerConfig
from configserver.errors import ConfigError
from configserver.pki import CertificateAuthority
from configserver.pki.tls import ensure_server_certificate, server_context, server_names

log = logging.getLogger(__name__)

RENEWAL_CHECK = 12 * 3600.0  # seconds between looks at the server certificate
MAX_SOCKET_PATH = 107  # sun_path


@dataclass(frozen=True)
class HttpsListener:
    sock: socket.socket
    port: int
    api_base: str
    context: ssl.SSLContext
    names: tuple[str, ...]


def _host(config: ServerConfig, address: str | None) -> str:
    return address or (config.http.listen if config.http.listen not in ("0.0.0.0", "::", "")
                       else "127.0.0.1")


async def https_listener(config: ServerConfig, authority: CertificateAuthority,
                         address: str | None) -> HttpsListener:
    """Bind the HTTPS port, make sure the server certificate names our addresses."""
    listen, port = config.http.listen, config.http.https_port
    try:
        sock = socket.create_server((listen, port), backlog=1024,
                                    family=socket.AF_INET6 if ":" in listen else socket.AF_INET)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}:{port}: {exc.strerror}",
                          hint="choose another --https-port") from None
    sock.setblocking(False)
    names = tuple(server_names(address, listen, socket.gethostname()))
    try:
        cert, key = await asyncio.to_thread(ensure_server_certificate, authority,
                                            config.pki_dir, names)
        context = server_context(authority, cert, key)
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    return HttpsListener(sock, bound, f"https://{_host(config, address)}:{bound}", context,
                         names)


async def renew_server_certificate(config: ServerConfig, authority: CertificateAuthority,
                                   listener: HttpsListener) -> None:
    """Issue the server certificate again as it nears expiry; new handshakes get it."""
    while True:
        await asyncio.sleep(RENEWAL_CHECK)
        try:
            cert, key = await asyncio.to_thread(ensure_server_certificate, authority,
                                                config.pki_dir, listener.names)
            listener.context.load_cert_chain(cert, key)
        except Exception:
            log.exception("renewing the server certificate failed")


def unix_listener(path: Path) -> socket.socket:
    """The local admin's socket at ``path``: mode 0600 before anyone can connect."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"the socket path {path} is too long for a unix socket",
                          hint="use a shorter --state-dir")
    with contextlib.suppress(FileNotFoundError):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()  # left behind by a server that is gone
        except OSError:
            pass
        else:
            raise ConfigError(f"another config server answers on {path}",
                              hint="stop it, or use another --state-dir")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)  # before listen(): until then a connect is refused
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {path}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock
