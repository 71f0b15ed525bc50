"""The config server's one exception hierarchy.

Every error that can reach a user carries an HTTP status and a stable, machine-readable code;
the API renders them as JSON through one middleware and the CLI prints them as one line.
"""

from __future__ import annotations


class NetbootError(Exception):
    """Base of every error the config server raises on purpose."""

    status = 500
    code = "internal_error"
    hint = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        if hint:
            self.hint = hint

    def one_line(self, program: str) -> str:
        """How a command-line tool reports this error: one line, with the hint if any."""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{program}: error: {self.message}{hint}"

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"status": self.status, "code": self.code,
                                   "message": self.message}
        if self.hint:
            body["hint"] = self.hint
        return body


class InvalidRequest(NetbootError):
    status = 400
    code = "invalid_request"


class InvalidMac(InvalidRequest):
    code = "invalid_mac"


class InvalidHostname(InvalidRequest):
    code = "invalid_hostname"


class InvalidAddress(InvalidRequest):
    code = "invalid_address"


class InvalidRole(InvalidRequest):
    code = "invalid_role"


class UnknownRole(NetbootError):
    status = 422
    code = "unknown_role"


class NotFound(NetbootError):
    status = 404
    code = "not_found"


class Conflict(NetbootError):
    status = 409
    code = "conflict"


class DuplicateMac(Conflict):
    code = "duplicate_mac"


class DuplicateAddress(Conflict):
    code = "duplicate_ip"


class DuplicateHostname(Conflict):
    code = "duplicate_hostname"


class RoleInUse(Conflict):
    code = "role_in_use"


class RequestTooLarge(NetbootError):
    """A request body larger than its route takes (refused before it is read)."""

    status = 413
    code = "too_large"


class RequestTimeout(NetbootError):
    """A request whose body did not arrive in time."""

    status = 408
    code = "request_timeout"


class ExpectationFailed(NetbootError):
    status = 417
    code = "expectation_failed"


class Unauthorized(NetbootError):
    status = 401
    code = "unauthorized"


class RateLimited(NetbootError):
    status = 429
    code = "rate_limited"


class TooManyPending(NetbootError):
    """The registry holds as many discovered, unregistered machines as it keeps."""

    status = 429
    code = "too_many_pending"


class ConfigError(NetbootError):
    """Bad configuration file or command-line value (raised before anything serves)."""

    status = 400
    code = "config_error"


class ServerUnavailable(NetbootError):
    """The CLI could not reach a running server."""

    status = 503
    code = "server_unavailable"


class StoreError(NetbootError):
    """The state directory or its database cannot be used."""

    status = 500
    code = "store_error"


class Forbidden(NetbootError):
    """Authenticated, but this identity may not do that."""

    status = 403
    code = "forbidden"


class HttpsRequired(NetbootError):
    """The API was asked over plain HTTP, which serves only what firmware fetches."""

    status = 403
    code = "https_required"


class InvalidCsr(InvalidRequest):
    code = "invalid_csr"


class WeakKey(InvalidCsr):
    code = "weak_key"


# -- the cloud: volumes ---------------------------------------------------------------------

class InvalidSize(InvalidRequest):
    code = "invalid_size"


class InvalidVolumeName(InvalidRequest):
    code = "invalid_name"


class InvalidReport(InvalidRequest):
    """An agent's report that does not have the documented shape (nothing of it is stored)."""

    code = "invalid_report"


class DuplicateVolume(Conflict):
    code = "duplicate_volume"


class MigrationRefused(Conflict):
    """A live migration cannot start: the message says which check refused it."""

    code = "migration_refused"


class VolumeInUse(Conflict):
    """The volume is attached (or still detaching) where the request needs it not to be."""

    code = "volume_attached"


class NoRoom(Conflict):
    """No two storage nodes have room for the volume."""

    code = "no_room"


class TooFewStorageNodes(Conflict):
    code = "too_few_storage_nodes"


# -- the cloud: instances and the guest map ---------------------------------------------------

class ClaimHeld(Conflict):
    """Another dom0 holds the instance's claim: it cannot start elsewhere."""

    code = "claim_held"


class UnknownImage(NetbootError):
    status = 422
    code = "unknown_image"


class NotADom0(NetbootError):
    status = 422
    code = "not_a_dom0"


# -- planned maintenance: draining a node ---------------------------------------------------

class NotDrainable(Conflict):
    """A node that cannot be drained: pending, or of a role that holds nothing to move."""

    code = "not_drainable"


class NodeDrained(Conflict):
    """The node is drained: nothing new may be placed or attached there."""

    code = "node_drained"


class WaitTimeout(NetbootError):
    """The CLI waited for longer than it was told to (``--wait``)."""

    status = 504
    code = "wait_timeout"
