"""The registry: the one policy seam every server consults about a machine.

DHCP, TFTP, HTTP boot and the agent API ask the registry and nothing else. The interface is
deliberately small so that another backend (a distributed one is planned) can stand in for the
embedded SQLite default without touching the protocol servers.

What a backend promises about time:

* the hot-path reads and the writes the protocol servers make on every packet
  (``record_event``, ``discover``) never wait for storage, so they may be called on the event
  loop; ``record_event`` may drop an event under overload, never a state change;
* every other write returns once it is stored (or raises what refused it), so it may wait:
  call it off the event loop (``asyncio.to_thread``);
* a read after a write from the same process sees that write, whichever kind it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from configserver.model import (
    ApplyResult,
    BootEvent,
    Node,
    NodeSpec,
    NodeState,
    Role,
    UnknownMacPolicy,
)


@dataclass(frozen=True)
class AgentSession:
    """The agent token issued for one boot of one node (only its hash is kept)."""

    mac: str
    boot_id: str
    token_hash: str | None
    issued: float


@dataclass(frozen=True)
class User:
    """A person with a client certificate: an admin, or a user of one tenant."""

    name: str
    kind: str
    tenant: str | None
    created: float
    revoked: float | None
    serial: int | None  # of the newest certificate
    not_after: float | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "tenant": self.tenant,
                "created": self.created, "revoked": self.revoked,
                "serial": None if self.serial is None else f"{self.serial:x}",
                "not_after": self.not_after}


class Registry(Protocol):
    # Hot path: what the protocol servers ask.
    def lookup(self, mac: str) -> Node | None: ...
    def lookup_ip(self, ip: str) -> Node | None: ...
    def role(self, name: str) -> Role | None: ...
    def unknown_mac_policy(self) -> UnknownMacPolicy: ...

    # Operator writes, validated here.
    def add_node(self, spec: NodeSpec) -> Node: ...
    def update_node(self, mac: str, changes: dict[str, Any]) -> Node: ...
    def remove_node(self, mac: str) -> None: ...
    def apply(self, specs: Sequence[NodeSpec], *, prune: bool = False,
              roles: Sequence[Role] = ()) -> ApplyResult: ...
    def list_nodes(self, *, state: NodeState | None = None, limit: int | None = None,
                   after: str | None = None) -> list[Node]: ...
    def list_roles(self) -> list[Role]: ...
    def add_role(self, role: Role) -> Role: ...
    def update_role(self, name: str, changes: dict[str, Any]) -> Role: ...
    def remove_role(self, name: str) -> None: ...
    def set_unknown_mac_policy(self, policy: UnknownMacPolicy) -> None: ...

    # What the servers record about machines.
    def discover(self, mac: str, facts: dict[str, Any]) -> Node: ...
    def purge_pending(self, older_than: float | None = None) -> list[str]: ...
    def record_event(self, mac: str, stage: str, detail: dict[str, Any] | None = None,
                     *, booting: bool = False) -> None: ...
    def events(self, mac: str, limit: int = 500) -> list[BootEvent]: ...
    def set_state(self, mac: str, state: NodeState, reason: str = "") -> None: ...

    # Agent sessions, heartbeats and inventories.
    def agent_session(self, mac: str) -> AgentSession | None: ...
    def agent_session_by_token(self, token_hash: str) -> AgentSession | None: ...
    def start_agent_session(self, mac: str, boot_id: str, token_hash: str | None) -> None: ...
    def record_heartbeat(self, mac: str, status: dict[str, Any]) -> Node: ...
    def set_inventory(self, mac: str, inventory: dict[str, Any]) -> None: ...
    def inventory(self, mac: str) -> dict[str, Any] | None: ...
    def mark_lost(self, silent_since: float) -> list[str]: ...

    # Users and their certificates.
    def add_user(self, name: str, kind: str, tenant: str | None, serial: int,
                 not_after: float) -> User: ...
    def users(self) -> list[User]: ...
    def user(self, name: str) -> User | None: ...
    def revoke_user(self, name: str) -> User: ...
    def revoked_certificates(self) -> list[tuple[int, float]]: ...

    def flush(self) -> None: ...
    def close(self) -> None: ...


__all__ = ["AgentSession", "Registry", "User"]
