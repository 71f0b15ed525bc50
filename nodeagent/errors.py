"""The node agent's one exception hierarchy.

Errors the local API can return carry an HTTP status and a stable code; the CLI prints any
``AgentError`` as one line with its hint and exits non-zero.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    status = 500
    code = "agent_error"
    hint = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        if hint:
            self.hint = hint

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"status": self.status, "code": self.code,
                                   "message": self.message}
        if self.hint:
            body["hint"] = self.hint
        return body


class ConfigError(AgentError):
    """A bad kernel parameter, configuration file value or command-line flag."""

    status = 400
    code = "config_error"


class Unauthorized(AgentError):
    """A local API caller did not present the agent token."""

    status = 401
    code = "unauthorized"


class NotFound(AgentError):
    """A local API request names something this agent does not have."""

    status = 404
    code = "not_found"


class ServerError(AgentError):
    """The config server could not be reached or gave an unusable answer."""

    status = 502
    code = "server_error"

    def __init__(self, message: str, *, hint: str = "", retry_after: float | None = None,
                 http_status: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after
        self.http_status = http_status


class TokenRejected(ServerError):
    """The server refused the agent token (401): the agent must look itself up again."""

    code = "token_rejected"


class NoToken(ServerError):
    """The lookup succeeded but no token was issued and none is saved for this boot."""

    code = "no_token"


class InventoryError(AgentError):
    """Collecting the inventory failed as a whole (single facts never raise)."""

    code = "inventory_error"


class RoleError(AgentError):
    """A cloud role could not bring its node to the desired state (a tool failed)."""

    code = "role_error"


class LvmError(RoleError):
    """An LVM or disk command failed; the message says which and why."""


class LioError(RoleError):
    """rtslib-fb or the kernel's target modules are missing or refused."""


class IscsiError(RoleError):
    """An iscsiadm call failed."""


class MdError(RoleError):
    """An mdadm call failed."""


class XenError(RoleError):
    """``xl`` failed, timed out, or printed what we cannot read."""
