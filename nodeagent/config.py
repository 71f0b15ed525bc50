"""The agent's configuration: one frozen dataclass and one kernel command-line parser.

Sources, later ones winning: the kernel command line (``netboot.server=URL`` and what the boot
script passes), ``/etc/netboot/nodeagent.toml``, then command-line flags. Only ``nodeagent.cli``
reads those sources; everything here is pure and works on text and mappings.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import netbootmac
from nodeagent.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("/etc/netboot/nodeagent.toml")
DEFAULT_STATE_DIR = Path("/run/nodeagent")
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
DEFAULT_API_PORT = 9898

_CA_FINGERPRINT = re.compile(r"[A-Za-z0-9_-]{43}")
_BOOT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

# Kernel parameter -> AgentConfig field.
KERNEL_PARAMETERS = {
    "netboot.server": "server",
    "netboot.mac": "boot_mac",
    "netboot.hostname": "hostname",
    "netboot.role": "role",
    "netboot.ticket": "boot_ticket",
    "netboot.api": "api",
    "netboot.ca": "ca_fingerprint",
    "BOOTIF": "boot_mac",
}


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs to run; built once by the CLI."""

    server: str
    boot_id: str
    # The fingerprint of the CA that signs the API's certificate (netboot.ca=) and the API's
    # HTTPS URL (learnt from the boot server unless set). Without a CA the API is reached at
    # ``server`` without TLS (a development setup).
    api: str | None = None
    ca_fingerprint: str | None = None
    # The MAC the node booted from (BOOTIF / netboot.mac); sent first in lookups.
    boot_mac: str | None = None
    # When set, replaces the MACs found on the machine (simulating another node).
    macs: tuple[str, ...] = ()
    hostname: str | None = None
    role: str | None = None
    # This boot's ticket (netboot.ticket=, from the boot script): what lets the server hand
    # this boot a new agent session when the node held one under an earlier boot.
    boot_ticket: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    # None: every address once the API speaks HTTPS with this boot's certificate (the config
    # server reaches it there, for guests' consoles), only loopback while it is plain HTTP.
    api_listen: str | None = None
    # 0 disables the local API.
    api_port: int = DEFAULT_API_PORT
    heartbeat_jitter: float = 0.1
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    request_timeout: float = 10.0
    inventory_debounce: float = 2.0
    # A recorded inventory (JSON) to push instead of collecting one (simulation, tests).
    inventory_file: Path | None = None
    watch: bool = True
    notify_socket: str | None = None

    @property
    def api_address(self) -> str:
        """Where the local API listens (``api_listen``, or the default for its transport)."""
        if self.api_listen:
            return self.api_listen
        return "0.0.0.0" if self.ca_fingerprint else "127.0.0.1"

    @property
    def api_url(self) -> str:
        """Where the agent API is: the HTTPS API if named, else the boot server."""
        return self.api or self.server

    def lookup_macs(self, found: tuple[str, ...]) -> tuple[str, ...]:
        """The MACs to look up with: overrides or those found, the boot MAC first."""
        macs = list(self.macs or found)
        if self.boot_mac:
            macs = [self.boot_mac, *[m for m in macs if m != self.boot_mac]]
        return tuple(macs)


def normalize_mac(text: str) -> str:
    """``aa:bb:cc:dd:ee:ff``, by the rule the config server applies too (``netbootmac``)."""
    try:
        return netbootmac.normalize_mac(text)
    except netbootmac.MacError as exc:
        raise ConfigError(str(exc), hint=exc.hint) from None


def parse_kernel_cmdline(text: str) -> dict[str, Any]:
    """Settings named by the kernel command line; unknown parameters are ignored.

    A parameter given twice keeps its last value, as the kernel does.
    """
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    settings: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.partition("=")
        name = KERNEL_PARAMETERS.get(key)
        if name is None or not sep:
            continue
        settings[name] = value
    return settings


def build_config(*layers: dict[str, Any]) -> AgentConfig:
    """Merge setting layers (later wins; ``None`` values do not override) and validate."""
    known = {f.name: f for f in fields(AgentConfig)}
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown setting {key}",
                                  hint="known: " + ", ".join(sorted(known)))
            if value is not None:
                merged[name] = value
    if not merged.get("server"):
        raise ConfigError("no config server URL",
                          hint="boot with netboot.server=URL, set server in "
                               f"{DEFAULT_CONFIG_FILE} or pass --server")
    if not merged.get("boot_id"):
        raise ConfigError("no boot identifier", hint=f"is {BOOT_ID_FILE} readable?")
    return _validated(merged)


def _validated(values: dict[str, Any]) -> AgentConfig:
    out = dict(values)
    server = str(out["server"]).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", server):
        raise ConfigError(f"invalid server URL {out['server']!r}",
                          hint="e.g. netboot.server=http://198.18.0.1:8080")
    out["server"] = server
    if out.get("api") is not None:
        api = str(out["api"]).rstrip("/")
        if not re.match(r"^https://[^/\s]+", api):
            raise ConfigError(f"invalid API URL {out['api']!r}",
                              hint="e.g. api = \"https://198.18.0.1:8443\"")
        out["api"] = api
        if not out.get("ca_fingerprint"):
            raise ConfigError("an HTTPS API needs the CA's fingerprint",
                              hint="netboot.ca= (the boot script passes it)")
    if out.get("ca_fingerprint") is not None:
        pinned = str(out["ca_fingerprint"]).removeprefix("sha256:")
        if not _CA_FINGERPRINT.fullmatch(pinned):
            raise ConfigError(f"invalid CA fingerprint {out['ca_fingerprint']!r}",
                              hint="43 base64url characters of SHA-256 (sha256: optional)")
        out["ca_fingerprint"] = "sha256:" + pinned
    boot_id = str(out["boot_id"]).strip()
    if not _BOOT_ID.match(boot_id):
        raise ConfigError(f"invalid boot identifier {boot_id!r}")
    out["boot_id"] = boot_id
    if out.get("boot_mac"):
        out["boot_mac"] = normalize_mac(out["boot_mac"])
    if "macs" in out:
        macs = [out["macs"]] if isinstance(out["macs"], str) else list(out["macs"])
        out["macs"] = tuple(dict.fromkeys(normalize_mac(m) for m in macs))
    for name in ("state_dir", "inventory_file"):
        if out.get(name) is not None:
            out[name] = Path(out[name])
    for name in ("heartbeat_jitter", "backoff_initial", "backoff_max", "request_timeout",
                 "inventory_debounce"):
        if name in out:
            out[name] = _number(out[name], name, float, minimum=0.0)
    if "api_port" in out:
        out["api_port"] = _number(out["api_port"], "api_port", int, minimum=0)
        if out["api_port"] > 65535:
            raise ConfigError(f"api_port must be a port number, not {out['api_port']}")
    if "watch" in out and not isinstance(out["watch"], bool):
        raise ConfigError(f"watch must be true or false, not {out['watch']!r}")
    if out.get("heartbeat_jitter", 0.1) >= 1.0:
        raise ConfigError("heartbeat_jitter is a fraction of the interval, below 1")
    for name in ("hostname", "role", "boot_ticket", "api_listen", "notify_socket"):
        if out.get(name) is not None:
            out[name] = str(out[name])
    return AgentConfig(**out)


def _number(value: Any, name: str, kind: type, *, minimum: float) -> Any:
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid value {value!r} for {name}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {number}")
    return number
