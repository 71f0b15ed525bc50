"""A small JSON client of the REST API, used by the CLI (stdlib only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from configserver.config import ServerConfig
from configserver.errors import NetbootError, ServerUnavailable


class ApiError(NetbootError):
    """An error the server answered with; keeps its status, code and hint."""

    def __init__(self, status: int, code: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code


class ApiClient:
    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0,
                 origin: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.origin = origin

    @classmethod
    def for_state_dir(cls, state_dir: Path, *, url: str | None = None,
                      token: str | None = None) -> ApiClient:
        """The client of the server running on ``state_dir`` (its endpoint and token files)."""
        origin = f"state directory {state_dir}"
        paths = ServerConfig(state_dir=state_dir)
        if url is None:
            try:
                url = json.loads(paths.endpoint_path.read_text())["url"]
            except FileNotFoundError:
                raise ServerUnavailable(
                    f"no config server is running for {state_dir}",
                    hint=f"start one with 'configserver serve --state-dir {state_dir}' "
                         "or pass --server URL") from None
            except (OSError, ValueError, KeyError) as exc:
                raise ServerUnavailable(f"cannot read {paths.endpoint_path}: {exc}") from None
        if token is None:
            try:
                token = paths.token_path.read_text().strip()
            except OSError:  # not readable by this user: read-only commands still work
                token = None
        return cls(url, token, origin=origin)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise _api_error(exc) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            where = f" ({self.origin})" if self.origin else ""
            raise ServerUnavailable(f"cannot reach the config server at {self.base_url}"
                                    f"{where}: {reason}",
                                    hint="is 'configserver serve' running?") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def _api_error(exc: urllib.error.HTTPError) -> ApiError:
    try:
        body = json.loads(exc.read())
        return ApiError(int(body.get("status", exc.code)), str(body.get("code", "error")),
                        str(body.get("message", exc.reason)), str(body.get("hint", "")))
    except (ValueError, AttributeError, OSError):
        return ApiError(exc.code, "http_error", f"HTTP {exc.code} {exc.reason}")
