"""A small JSON client of the REST API, used by the CLI (stdlib only).

On the server host it speaks over the state directory's unix socket (the local admin, no
certificate); elsewhere over HTTPS with a client certificate bundle and our CA.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configserver.config import ServerConfig
from configserver.errors import ConfigError, NetbootError, ServerUnavailable


class ApiError(NetbootError):
    """An error the server answered with; keeps its status, code and hint."""

    def __init__(self, status: int, code: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Credentials:
    """Where a remote client's certificate, key and CA are (files of a bundle)."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @classmethod
    def from_bundle(cls, directory: Path) -> Credentials:
        """``ca.pem`` and the one ``NAME.pem`` with its ``NAME.key`` in ``directory``."""
        certs = [p for p in sorted(directory.glob("*.pem"))
                 if p.name != "ca.pem" and p.with_suffix(".key").exists()]
        if len(certs) != 1:
            raise ConfigError(f"{directory} holds {len(certs)} certificates with keys",
                              hint="a bundle of 'configserver user add' holds one; "
                                   "or pass --cert, --key and --ca")
        return cls(certs[0], certs[0].with_suffix(".key"), directory / "ca.pem")

    def context(self) -> ssl.SSLContext:
        if self.ca is None:
            raise ConfigError("no CA certificate to verify the server with",
                              hint="pass --ca FILE (the bundle's ca.pem, or "
                                   "http://SERVER:8080/boot/ca.pem checked by fingerprint)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_verify_locations(cafile=str(self.ca))
            if self.cert is not None:
                context.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the client certificate: {exc}",
                              hint="check --cert, --key and --ca") from None
        return context


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    def __init__(self, base_url: str, *, unix_socket: Path | None = None,
                 tls: ssl.SSLContext | None = None, timeout: float = 30.0,
                 origin: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.unix_socket = unix_socket
        self.tls = tls
        self.timeout = timeout
        self.origin = origin

    @classmethod
    def for_state_dir(cls, state_dir: Path, *, url: str | None = None,
                      credentials: Credentials | None = None) -> ApiClient:
        """The server on this host (its unix socket), or the one at ``url`` over HTTPS."""
        paths = ServerConfig(state_dir=state_dir)
        if url is not None:
            credentials = credentials or Credentials()
            if credentials.ca is None and os.access(paths.pki_dir / "ca.pem", os.R_OK):
                credentials = Credentials(credentials.cert, credentials.key,
                                          paths.pki_dir / "ca.pem")
            if not url.startswith("https://"):
                raise ConfigError(f"--server {url}: the API is served over HTTPS only",
                                  hint="e.g. --server https://HOST:8443")
            return cls(url, tls=credentials.context(), origin=url)
        origin = f"state directory {state_dir}"
        try:
            endpoint = json.loads(paths.endpoint_path.read_text())
        except FileNotFoundError:
            raise ServerUnavailable(
                f"no config server is running for {state_dir}",
                hint=f"start one with 'configserver serve --state-dir {state_dir}' "
                     "or pass --server https://HOST:8443 with a certificate bundle") from None
        except (OSError, ValueError) as exc:
            raise ServerUnavailable(f"cannot read {paths.endpoint_path}: {exc}") from None
        socket_path = Path(endpoint.get("socket") or paths.socket_path)
        return cls("http://localhost", unix_socket=socket_path, origin=origin)

    def _connection(self) -> http.client.HTTPConnection:
        if self.unix_socket is not None:
            return _UnixConnection(str(self.unix_socket), self.timeout)
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme == "https":
            return http.client.HTTPSConnection(parts.hostname or "", parts.port or 443,
                                               timeout=self.timeout, context=self.tls)
        return http.client.HTTPConnection(parts.hostname or "", parts.port or 80,
                                          timeout=self.timeout)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        prefix = urllib.parse.urlsplit(self.base_url).path
        connection = self._connection()
        where = self.unix_socket or self.base_url
        try:
            connection.request(method, prefix + path, body=data, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except PermissionError:
            raise ServerUnavailable(f"no permission to use {where}",
                                    hint="run as root (or the service user) on the server "
                                         "host, or use --server with a certificate") from None
        except ssl.SSLError as exc:
            raise ServerUnavailable(f"TLS with {where} failed: {exc.reason or exc}",
                                    hint="is --ca the server's CA, and the certificate "
                                         "valid and not revoked?") from None
        except (OSError, http.client.HTTPException) as exc:
            origin = f" ({self.origin})" if self.origin else ""
            raise ServerUnavailable(f"cannot reach the config server at {where}{origin}: "
                                    f"{exc}", hint="is 'configserver serve' running?") from None
        finally:
            connection.close()
        if response.status >= 400:
            raise _api_error(response.status, response.reason, payload)
        return json.loads(payload or b"null")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def _api_error(status: int, reason: str, payload: bytes) -> ApiError:
    try:
        body = json.loads(payload)
        return ApiError(int(body.get("status", status)), str(body.get("code", "error")),
                        str(body.get("message", reason)), str(body.get("hint", "")))
    except (ValueError, AttributeError):
        return ApiError(status, "http_error", f"HTTP {status} {reason}")
