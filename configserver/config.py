"""The config server's configuration: frozen dataclasses, built only by the CLI.

Library code receives a ``ServerConfig`` and never reads argv, the environment or files itself.
``from_mapping`` turns the parsed TOML file plus command-line overrides into one; unknown keys and
bad values raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configserver.errors import ConfigError
from configserver.model import UnknownMacPolicy

DEFAULT_STATE_DIR = Path("/var/lib/netboot")
DEFAULT_CONFIG_FILE = Path("/etc/netboot/configserver.toml")
DEFAULT_IMAGES_DIR = Path("build/images")


class DhcpMode(enum.StrEnum):
    FULL = "full"
    PROXY = "proxy"
    OFF = "off"


@dataclass(frozen=True)
class Subnet:
    """A subnet the DHCP server is authoritative for (its own, or one behind a relay)."""

    network: str
    router: str | None = None
    pool: tuple[str, str] | None = None
    dns: tuple[str, ...] = ()
    domain: str | None = None
    mtu: int | None = None
    lease_time: int | None = None


@dataclass(frozen=True)
class DhcpConfig:
    mode: DhcpMode = DhcpMode.OFF
    # The interface's own subnet; filled in from the interface's address when not given.
    subnet: Subnet | None = None
    # Further subnets reached through DHCP relays (giaddr inside them).
    relayed: tuple[Subnet, ...] = ()
    lease_time: int = 3600
    # Listen ports (tests run servers unprivileged on high ports).
    port: int = 67
    client_port: int = 68
    proxy_port: int = 4011
    # UDP address to bind; default: all addresses of the interface (SO_BINDTODEVICE).
    bind_address: str = "0.0.0.0"
    decline_quarantine: int = 600
    # Source addresses of the DHCP relays we trust: a packet with giaddr set from any other
    # source is dropped (a client posing as a relay could drain a relayed subnet's pool).
    relays: tuple[str, ...] = ()
    # Unregistered MACs (unknown or pending): a short lease time, at most this share of each
    # pool, and new ones take addresses at most at ``unknown_rate`` per second (burst
    # ``unknown_burst``) per relay and per local port, so a flood of random MACs cannot bind
    # the pool for long. Registered nodes are never limited.
    unknown_lease_time: int = 300
    unknown_pool_share: float = 0.5
    unknown_rate: float = 5.0
    unknown_burst: int = 20
    # Discovery (unknown_mac = discover): at most ``pending_per_window`` new pending nodes per
    # ``pending_window`` seconds; a pending node not seen for ``pending_expiry`` s is removed.
    pending_per_window: int = 64
    pending_window: float = 60.0
    pending_expiry: int = 3600
    # iPXE binaries handed to firmware PXE (over TFTP) and UEFI HTTP boot (under /ipxe/).
    bios_bootfile: str = "undionly.kpxe"
    uefi_bootfile: str = "ipxe.efi"
    arm64_bootfile: str = "ipxe-arm64.efi"


@dataclass(frozen=True)
class TftpConfig:
    enabled: bool = True
    port: int = 69
    bind_address: str = "0.0.0.0"
    max_transfers: int = 1000
    max_transfers_per_client: int = 8
    # Bytes in flight (sent, not yet acknowledged) to one client address, all its transfers
    # together: each transfer's window (blksize x windowsize) is lowered to fit what is left.
    max_inflight_per_client: int = 256 * 1024
    # A transfer whose client never acknowledged anything ends after this many seconds; while
    # every slot is taken, the oldest such transfer makes room for a new request.
    silent_timeout: float = 3.0
    # Retransmission: adaptive between min_timeout and timeout unless the client sets one.
    timeout: float = 1.0
    min_timeout: float = 0.02
    retries: int = 5
    # Upper bounds for the blksize and windowsize options (RFC 2348, RFC 7440).
    max_blksize: int = 65464
    max_windowsize: int = 256
    # Poll (instead of sleeping) for the next ACK of a client whose round trip is shorter
    # than this; 0 turns polling off. See configserver/eventloop.py.
    busy_poll: float = 0.0002
    # Windowsize-1 transfers run in up to this many threads of their own (the rest on the
    # event loop); 0 runs them all on the loop. See configserver/tftp/lockstep.py.
    lockstep_threads: int = 4


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "0.0.0.0"
    port: int = 8080
    # URL the nodes use to reach this server; default: the interface's address and port.
    public_url: str | None = None
    # Idle and slow connections (configserver/http/limits.py): a connection that has not sent
    # a whole request head this many seconds after it opened or after its last answer is
    # closed, and a request's body must arrive within body_timeout of its head. 20 s is longer
    # than aiohttp's client keep-alive (15 s, the agents'), so that a client drops an idle
    # connection before the server does and never sends on one being closed.
    keepalive_timeout: float = 20.0
    body_timeout: float = 30.0
    # The API (/api/v1) over TLS, with client certificates of our CA; plain HTTP serves only
    # what firmware fetches.
    https_port: int = 8443
    # The agent endpoints (/api/v1/agent/*) on plain HTTP too, with the agent token: only for
    # agents older than enrollment (they know no netboot.ca=); off by default.
    plain_agent_api: bool = False


@dataclass(frozen=True)
class CloudConfig:
    # The addresses instances take (START-END): each held by one instance's NIC and handed by
    # DHCP to that NIC's MAC alone. Inside the DHCP subnet, outside its dynamic pool; without
    # it, instances can still be created with an explicit address (--ip).
    instance_pool: tuple[str, str] | None = None
    # A dom0 that is lost (no heartbeat for ``lost_after``) is fenced at the storage and its
    # instances restarted on other dom0s; off: they wait for an operator.
    failover: bool = True
    # A dom0 that had no heartbeat accepted for this long destroys its guests itself, so
    # that none can still run when the control plane restarts it elsewhere. Seconds; 0: never.
    # Unset: two thirds of ``lost_after``. Must be below ``lost_after``.
    self_fence_after: float | None = None


@dataclass(frozen=True)
class ServerConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    images_dir: Path = DEFAULT_IMAGES_DIR
    interface: str | None = None
    # The address nodes reach us at (DHCP siaddr, option 54, URLs); from the interface if unset.
    server_address: str | None = None
    ipxe_dir: Path | None = None
    unknown_mac: UnknownMacPolicy | None = None
    discovery_image: str | None = None
    # authorized_keys file served to every node at /boot/ssh-keys (root's SSH keys; public
    # keys only, re-read on every fetch so that a change needs no restart).
    ssh_keys: Path | None = None
    # systemd's notification socket ($NOTIFY_SOCKET, passed in by the CLI).
    notify_socket: str | None = None
    heartbeat_interval: float = 15.0
    lost_after: float = 90.0
    # How long the boot ticket of a boot script stays good for replacing an agent session
    # (firmware, hypervisor and kernel must come up within it).
    boot_ticket_lifetime: float = 1800.0
    http: HttpConfig = field(default_factory=HttpConfig)
    dhcp: DhcpConfig = field(default_factory=DhcpConfig)
    tftp: TftpConfig = field(default_factory=TftpConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)

    @property
    def self_fence_after(self) -> float | None:
        """Seconds without an accepted heartbeat after which a dom0 destroys its guests
        (None: never; only with failover on)."""
        if not self.cloud.failover:
            return None
        fence = self.cloud.self_fence_after
        if fence is None:
            return round(self.lost_after * 2 / 3, 1)
        return fence or None

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.sqlite"

    @property
    def pki_dir(self) -> Path:
        """The CA (ca.key, ca.pem) and the server's TLS certificate."""
        return self.state_dir / "pki"

    @property
    def socket_path(self) -> Path:
        """The local admin's unix socket (mode 0600): requests on it are the local admin."""
        return self.state_dir / "api.sock"

    @property
    def endpoint_path(self) -> Path:
        """Where a running server writes how the CLI reaches it."""
        return self.state_dir / "server.json"


def from_mapping(data: dict[str, Any]) -> ServerConfig:
    """Build a ServerConfig from nested dicts (TOML layout), validating every value."""
    return _build(ServerConfig, data, "")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"unknown setting {prefix}{key}",
                              hint="known: " + ", ".join(sorted(fields)))
        kwargs[name] = _convert(fields[name].type, value, f"{prefix}{key}")
    try:
        config = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None
    _check(config, prefix)
    return config


_NESTED = {"HttpConfig": HttpConfig, "DhcpConfig": DhcpConfig, "TftpConfig": TftpConfig,
           "CloudConfig": CloudConfig, "Subnet": Subnet}


def _convert(annotation: Any, value: Any, key: str) -> Any:
    text = str(annotation)
    try:
        for name, cls in _NESTED.items():
            if text.startswith(name):
                return value if isinstance(value, cls) else _build(cls, value, key + ".")
        if text.startswith("tuple[Subnet"):
            return tuple(v if isinstance(v, Subnet) else _build(Subnet, v, key + ".")
                         for v in value)
        if value is None:
            return None
        if "Path" in text:
            return Path(value)
        if "DhcpMode" in text:
            return DhcpMode(value)
        if "UnknownMacPolicy" in text:
            return UnknownMacPolicy(value)
        if text.startswith("tuple[str, str]"):
            start, end = value.split("-", 1) if isinstance(value, str) else value
            return (str(ipaddress.IPv4Address(start.strip())),
                    str(ipaddress.IPv4Address(end.strip())))
        if text.startswith("tuple[str"):
            return tuple(str(v) for v in ([value] if isinstance(value, str) else value))
        if text.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("on", "true", "yes", "1"):
                return True
            if str(value).lower() in ("off", "false", "no", "0"):
                return False
            raise ValueError(value)
        if text.startswith("int"):
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if text.startswith("float"):
            return float(value)
        return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value {value!r} for {key}: {exc}") from None


def _check(config: Any, prefix: str) -> None:
    """Cross-field checks that the types alone cannot express."""
    def port(value: int, name: str) -> None:
        if not 0 <= value <= 65535:
            raise ConfigError(f"{prefix}{name} must be a port number, not {value}")

    if isinstance(config, (HttpConfig, TftpConfig)):
        port(config.port, "port")
        if isinstance(config, HttpConfig):
            for name in ("keepalive_timeout", "body_timeout"):
                if not 0 < getattr(config, name) <= 3600:
                    raise ConfigError(f"{prefix}{name} must be between 0 and 3600 seconds, "
                                      f"not {getattr(config, name)}")
            port(config.https_port, "https_port")
        if isinstance(config, TftpConfig) and not 0 <= config.busy_poll <= 0.001:
            raise ConfigError(f"{prefix}busy_poll must be between 0 and 0.001 seconds, "
                              f"not {config.busy_poll}")
        if isinstance(config, TftpConfig) and not 0 <= config.lockstep_threads <= 64:
            raise ConfigError(f"{prefix}lockstep_threads must be between 0 and 64, "
                              f"not {config.lockstep_threads}")
        if isinstance(config, TftpConfig) and config.max_inflight_per_client < 512:
            raise ConfigError(f"{prefix}max_inflight_per_client must be at least 512 bytes "
                              f"(one default block), not {config.max_inflight_per_client}")
        if isinstance(config, TftpConfig) and not 0 < config.silent_timeout <= 60:
            raise ConfigError(f"{prefix}silent_timeout must be between 0 and 60 seconds, "
                              f"not {config.silent_timeout}")
    elif isinstance(config, ServerConfig):
        _check_instance_pool(config, prefix)
        fence = config.cloud.self_fence_after
        if fence is not None and not 0 <= fence < config.lost_after:
            raise ConfigError(f"{prefix}cloud.self_fence_after must be 0 (never) or below "
                              f"lost_after ({config.lost_after:g} s), not {fence:g}",
                              hint="a dom0 must destroy its guests before the control plane "
                                   "restarts them elsewhere")
        if fence and fence < 2 * config.heartbeat_interval:
            raise ConfigError(f"{prefix}cloud.self_fence_after must be at least two heartbeat "
                              f"intervals ({2 * config.heartbeat_interval:g} s), not {fence:g}",
                              hint="else a dom0 destroys its guests between two heartbeats")
    elif isinstance(config, DhcpConfig):
        for name in ("port", "client_port", "proxy_port"):
            port(getattr(config, name), name)
        if config.lease_time < 60:
            raise ConfigError(f"{prefix}lease_time must be at least 60 seconds")
        _check_guards(config, prefix)
    elif isinstance(config, Subnet):
        try:
            net = ipaddress.IPv4Network(config.network, strict=False)
        except ValueError:
            raise ConfigError(f"{prefix}network: invalid IPv4 network {config.network!r}") from None
        for addr in ([config.router] if config.router else []) + list(config.pool or ()):
            try:
                ok = ipaddress.IPv4Address(addr) in net
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"{prefix}: {addr} is not inside {net}")
        if config.pool and (ipaddress.IPv4Address(config.pool[0])
                            > ipaddress.IPv4Address(config.pool[1])):
            raise ConfigError(f"{prefix}pool: start {config.pool[0]} is after end "
                              f"{config.pool[1]}")


def _check_instance_pool(config: ServerConfig, prefix: str) -> None:
    """``[cloud] instance_pool``: in order, inside the DHCP subnet, clear of its pool."""
    pool = config.cloud.instance_pool
    if pool is None:
        return
    first, last = (ipaddress.IPv4Address(a) for a in pool)
    key = f"{prefix}cloud.instance_pool"
    if first > last:
        raise ConfigError(f"{key}: start {first} is after end {last}")
    subnet = config.dhcp.subnet
    if subnet is None:
        return
    net = ipaddress.IPv4Network(subnet.network, strict=False)
    if first not in net or last not in net:
        raise ConfigError(f"{key}: {first}-{last} is not inside the DHCP subnet {net}")
    if subnet.pool:
        low, high = (ipaddress.IPv4Address(a) for a in subnet.pool)
        if first <= high and low <= last:
            raise ConfigError(f"{key}: {first}-{last} overlaps the DHCP pool {low}-{high}",
                              hint="instances hold their addresses: give them a range the "
                                   "dynamic pool does not hand out")


def _check_guards(config: DhcpConfig, prefix: str) -> None:
    """The anti-starvation, relay and discovery settings of ``[dhcp]``."""
    for relay in config.relays:
        try:
            ipaddress.IPv4Address(relay)
        except ValueError:
            raise ConfigError(f"{prefix}relays: {relay!r} is not an IPv4 address") from None
    if config.relayed and not config.relays:
        raise ConfigError(f"{prefix}relayed subnets need {prefix}relays",
                          hint="list the source addresses of your DHCP relays, e.g. "
                               "relays = [\"198.19.0.1\"]")
    if not 60 <= config.unknown_lease_time <= max(config.lease_time, 60):
        raise ConfigError(f"{prefix}unknown_lease_time must be between 60 seconds and "
                          f"lease_time ({config.lease_time}), not {config.unknown_lease_time}")
    if not 0 < config.unknown_pool_share <= 1:
        raise ConfigError(f"{prefix}unknown_pool_share must be in (0, 1], "
                          f"not {config.unknown_pool_share}")
    for name in ("unknown_rate", "unknown_burst", "pending_per_window", "pending_window",
                 "pending_expiry"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{prefix}{name} must be positive, not {getattr(config, name)}")
