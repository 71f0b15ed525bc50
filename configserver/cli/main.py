"""``configserver``: the only place that reads argv, the environment and config files.

Every command but ``serve`` talks to the running server through its API: on the server host over
the state directory's unix socket (the local admin, no credential needed), from elsewhere over
HTTPS with a client certificate (``--server https://HOST:8443 --cert --key --ca`` or
``--bundle DIR``, or the same as $NETBOOT_SERVER, $NETBOOT_CERT, $NETBOOT_KEY, $NETBOOT_CA,
$NETBOOT_BUNDLE). Errors are one line with a hint and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import sys
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

from configserver import __version__, eventloop
from configserver.cli import dashboard, drain, instances, users, volumes
from configserver.config import DEFAULT_CONFIG_FILE, DEFAULT_STATE_DIR, ServerConfig, from_mapping
from configserver.errors import ConfigError, NetbootError
from configserver.eventloop import PollingSelector
from configserver.http.client import ApiClient, Credentials
from configserver.inventory import format_inventory, parse_inventory

log = logging.getLogger("configserver")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS,
                        help=f"state directory (default {DEFAULT_STATE_DIR}, "
                             "or $NETBOOT_STATE_DIR)")
    common.add_argument("--server", default=argparse.SUPPRESS,
                        help="API URL, https://HOST:8443 (default: the server running on the "
                             "state directory, through its unix socket)")
    common.add_argument("--cert", type=Path, default=argparse.SUPPRESS,
                        help="client certificate (PEM) for --server")
    common.add_argument("--key", type=Path, default=argparse.SUPPRESS,
                        help="its private key (PEM)")
    common.add_argument("--ca", type=Path, default=argparse.SUPPRESS,
                        help="the server's CA certificate (PEM)")
    common.add_argument("--bundle", type=Path, default=argparse.SUPPRESS, metavar="DIR",
                        help="a directory made by 'user add' (NAME.pem, NAME.key, ca.pem)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON")

    parser = argparse.ArgumentParser(prog="configserver", parents=[common],
                                     description="netboot-appliance config server")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run DHCP, TFTP and HTTP boot")
    serve.add_argument("--config", type=Path, help=f"TOML file (default {DEFAULT_CONFIG_FILE} "
                                                   "if present)")
    serve.add_argument("--images", type=Path, help="images directory (default build/images)")
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--https-port", type=int, help="HTTPS API port (default 8443)")
    serve.add_argument("--listen", help="HTTP listen address (default 0.0.0.0)")
    serve.add_argument("--public-url", help="URL nodes use to reach this server")
    serve.add_argument("--interface", help="serving interface for DHCP and TFTP")
    serve.add_argument("--dhcp", choices=["full", "proxy", "off"])
    serve.add_argument("--pool", help="dynamic DHCP pool START-END (full mode)")
    serve.add_argument("--instance-pool", metavar="START-END",
                       help="addresses instances take (inside the subnet, not in --pool)")
    serve.add_argument("--tftp", choices=["on", "off"])
    serve.add_argument("--tftp-port", type=int)
    serve.add_argument("--unknown-mac", choices=["ignore", "discover"])
    serve.add_argument("--ipxe-dir", type=Path, help="where the iPXE binaries are")
    serve.add_argument("--ssh-keys", type=Path, metavar="FILE",
                       help="authorized_keys file every node adds for root at boot")

    node = sub.add_parser("node", parents=[common], help="registered machines")
    nsub = node.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = nsub.add_parser("add", parents=[common], help="register a machine")
    add.add_argument("mac")
    add.add_argument("--role", required=True)
    _node_options(add)
    lst = nsub.add_parser("list", parents=[common], help="list machines")
    lst.add_argument("--pending", action="store_true", help="only discovered, unregistered")
    lst.add_argument("--state", help="only machines in this state")
    show = nsub.add_parser("show", parents=[common], help="one machine, with its timeline")
    show.add_argument("mac")
    events = nsub.add_parser("events", parents=[common], help="a machine's boot events")
    events.add_argument("mac")
    events.add_argument("--limit", type=int, default=500, help="newest N events (default 500)")
    set_ = nsub.add_parser("set", parents=[common], help="change a machine")
    set_.add_argument("mac")
    set_.add_argument("--role")
    _node_options(set_)
    rm = nsub.add_parser("rm", parents=[common], help="forget a machine")
    rm.add_argument("mac")
    drain.add_parsers(nsub, common, duration)
    purge = nsub.add_parser("purge", parents=[common],
                            help="remove discovered machines in bulk (after a spoofed flood)")
    purge.add_argument("--pending", action="store_true", required=True,
                       help="the pending (discovered, unregistered) machines")
    purge.add_argument("--older-than", type=duration, metavar="AGE",
                       help="only those not seen for AGE (e.g. 90s, 30m, 1h, 2d)")

    lease = sub.add_parser("lease", parents=[common], help="DHCP leases")
    lsub = lease.add_subparsers(dest="action", required=True, metavar="ACTION")
    llist = lsub.add_parser("list", parents=[common], help="current leases and offers")
    llist.add_argument("--unknown", action="store_true", help="only unregistered MACs'")
    lpurge = lsub.add_parser("purge", parents=[common],
                             help="end leases now (after a flood of random MACs)")
    lpurge.add_argument("--unknown", action="store_true", required=True,
                        help="every lease and offer of an unregistered MAC")

    role = sub.add_parser("role", parents=[common], help="roles (what machines boot)")
    rsub = role.add_subparsers(dest="action", required=True, metavar="ACTION")
    rsub.add_parser("list", parents=[common], help="list roles")
    for name, text in (("add", "add a custom role"), ("set", "change a role")):
        r = rsub.add_parser(name, parents=[common], help=text)
        r.add_argument("name")
        r.add_argument("--image", help="image name (default: the role name)")
        r.add_argument("--template", choices=["linux", "xen"])
        r.add_argument("--kernel-args")
        r.add_argument("--hypervisor-args")
        r.add_argument("--description")
    rrm = rsub.add_parser("rm", parents=[common], help="remove a custom role")
    rrm.add_argument("name")

    apply = sub.add_parser("apply", parents=[common], help="declarative bulk create/update")
    apply.add_argument("-f", "--file", required=True, type=Path,
                       help="inventory TOML ('-' = stdin)")
    apply.add_argument("--prune", action="store_true", help="remove nodes not in the file")
    sub.add_parser("export", parents=[common], help="print the inventory as TOML")
    settings = sub.add_parser("settings", parents=[common], help="show or change settings")
    settings.add_argument("--unknown-mac", choices=["ignore", "discover"])
    sub.add_parser("images", parents=[common], help="list the images the server can boot")
    users.add_parser(sub, common)
    volumes.add_parser(sub, common)
    instances.add_parser(sub, common)
    dashboard.add_parser(sub, common)
    farm = sub.add_parser("farm", help="QEMU test farm (up, status, down)", add_help=False)
    farm.add_argument("farm_args", nargs=argparse.REMAINDER)
    return parser


def duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``1h`` or ``2d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 1h)"
                                         ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    return value


def _node_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hostname")
    parser.add_argument("--ip", help="reserved IPv4 address of the primary NIC")
    parser.add_argument("--kernel-args", help="extra kernel arguments for this machine")
    parser.add_argument("--tag", action="append", dest="tags", help="a tag (repeatable)")
    parser.add_argument("--nic", action="append", dest="nics", metavar="MAC[=IP]",
                        help="a further NIC, with its reserved address (repeatable)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    word = _command_word(argv)
    if word is not None and argv[word] == "farm":
        from configserver.farm.cli import main as farm_main

        return farm_main(argv[word + 1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state_dir = getattr(args, "state_dir", None) or Path(
        os.environ.get("NETBOOT_STATE_DIR", DEFAULT_STATE_DIR))
    try:
        if args.command == "serve":
            return _serve(args, state_dir)
        url = getattr(args, "server", None) or os.environ.get("NETBOOT_SERVER") or None
        client = ApiClient.for_state_dir(state_dir, url=url, credentials=_credentials(args))
        return COMMANDS[args.command](args, client)
    except NetbootError as exc:
        from configserver.cli.format import printable

        print(printable(exc.one_line("configserver")), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _credentials(args: argparse.Namespace) -> Credentials | None:
    """The client certificate of the command line, else of the environment."""
    def given(option: str) -> Path | None:
        value = getattr(args, option, None) or os.environ.get(f"NETBOOT_{option.upper()}")
        return Path(value) if value else None

    bundle = given("bundle")
    found = Credentials.from_bundle(bundle) if bundle else Credentials()
    cert, key, ca = given("cert"), given("key"), given("ca")
    if cert and not key:
        raise ConfigError("--cert needs --key", hint="or pass --bundle DIR")
    result = Credentials(cert or found.cert, key or found.key, ca or found.ca)
    return result if any((result.cert, result.key, result.ca)) else None


def _command_word(argv: list[str]) -> int | None:
    """Index of the first word that is not an option or an option's value."""
    skip = False
    for index, word in enumerate(argv):
        if skip:
            skip = False
        elif word in ("--state-dir", "--server", "--cert", "--key", "--ca", "--bundle"):
            skip = True
        elif not word.startswith("-"):
            return index
    return None


def server_config(args: argparse.Namespace, state_dir: Path) -> ServerConfig:
    """The TOML file (if any) with the command line's overrides on top."""
    data: dict[str, Any] = {}
    path = args.config
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if getattr(args, "state_dir", None) or "state_dir" not in data:
        data["state_dir"] = str(state_dir)
    http, dhcp, tftp, cloud = (data.setdefault(k, {}) for k in ("http", "dhcp", "tftp", "cloud"))
    overrides = [
        (data, "images_dir", args.images), (http, "port", args.http_port),
        (http, "https_port", args.https_port),
        (http, "listen", args.listen), (http, "public_url", args.public_url),
        (data, "interface", args.interface), (dhcp, "mode", args.dhcp),
        (tftp, "enabled", args.tftp), (tftp, "port", args.tftp_port),
        (data, "unknown_mac", args.unknown_mac), (data, "ipxe_dir", args.ipxe_dir),
        (data, "ssh_keys", args.ssh_keys), (cloud, "instance_pool", args.instance_pool),
    ]
    for table, key, value in overrides:
        if value is not None:
            table[key] = str(value) if isinstance(value, Path) else value
    if args.pool:
        subnet = dhcp.setdefault("subnet", {})
        subnet["pool"] = args.pool
        if "network" not in subnet:
            from configserver.netif import interface_ipv4

            if not args.interface and not data.get("interface"):
                raise ConfigError("--pool needs --interface (or [dhcp.subnet] in the config)")
            subnet["network"] = str(interface_ipv4(args.interface or data["interface"]).network)
    return from_mapping(data)


def _serve(args: argparse.Namespace, state_dir: Path) -> int:
    config = dataclasses.replace(server_config(args, state_dir),
                                 notify_socket=os.environ.get("NOTIFY_SOCKET"))
    log.info("configserver %s starting", __version__)
    raise_open_files_limit()
    try:
        eventloop.run(lambda selector: _serve_async(config, selector))
    except OSError as exc:
        raise ConfigError(f"cannot serve: {exc}") from None
    return 0


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit: every HTTP connection and
    every TFTP transfer holds a descriptor, and the usual soft limit of 1024 is soon reached
    (systemd's LimitNOFILE= sets the hard one). Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # Linux caps RLIMIT_NOFILE (fs.nr_open): neither is ever infinite
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
    log.info("open files limit: %d", soft)
    return soft


async def _serve_async(config: ServerConfig, selector: PollingSelector) -> None:
    from configserver.server import serve

    try:
        await serve(config, expect_event=selector.expect)
    finally:
        log.info("%s", selector.summary())


def _print(args: argparse.Namespace, data: Any, text: str) -> int:
    """Print ``data`` as JSON (``--json``: ASCII, every control character escaped) or ``text``
    for people, in which no character from the network reaches the terminal raw."""
    from configserver.cli.format import printable

    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=True))
    elif text:
        print(printable(text, newlines=True))
    return 0


def _node_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for key in ("role", "hostname", "ip", "kernel_args"):
        value = getattr(args, key, None)
        if value is not None:
            body[key] = value
    if args.tags is not None:
        body["tags"] = args.tags
    if args.nics is not None:
        body["nics"] = [dict(zip(("mac", "ip"), n.split("=", 1), strict=False))
                        for n in args.nics]
    return body


def cmd_node(args: argparse.Namespace, client: ApiClient) -> int:
    from configserver.cli import format as cliformat

    if args.action in ("drain", "undrain"):
        return drain.cmd_drain(args, client)
    if args.action == "add":
        node = client.post("/api/v1/nodes", {"mac": args.mac, **_node_body(args)})
        return _print(args, node, f"added {node['mac']} ({node['role']})")
    if args.action == "list":
        state = "pending" if args.pending else args.state
        nodes = list_all_nodes(client, state=state)
        return _print(args, nodes, cliformat.node_table(nodes))
    if args.action == "show":
        node = client.get(f"/api/v1/nodes/{args.mac}")
        return _print(args, node, cliformat.node_details(node))
    if args.action == "events":
        answer = client.get(f"/api/v1/nodes/{args.mac}/events?limit={args.limit}")
        return _print(args, answer, cliformat.node_events(answer))
    if args.action == "set":
        body = _node_body(args)
        if not body:
            raise ConfigError("nothing to change", hint="see 'configserver node set --help'")
        node = client.patch(f"/api/v1/nodes/{args.mac}", body)
        return _print(args, node, f"updated {node['mac']}")
    if args.action == "purge":
        body: dict[str, Any] = {"state": "pending"}
        if args.older_than is not None:
            body["older_than"] = args.older_than
        removed = client.post("/api/v1/nodes/purge", body)["removed"]
        return _print(args, {"removed": removed}, f"removed {len(removed)} pending nodes")
    client.delete(f"/api/v1/nodes/{args.mac}")
    return _print(args, {"removed": args.mac}, f"removed {args.mac}")


def cmd_lease(args: argparse.Namespace, client: ApiClient) -> int:
    from configserver.cli import format as cliformat

    if args.action == "list":
        leases = client.get("/api/v1/leases" + ("?unknown=1" if args.unknown else ""))["leases"]
        return _print(args, leases, cliformat.lease_table(leases))
    purged = client.post("/api/v1/leases/purge", {"unknown": True})["purged"]
    return _print(args, purged, f"ended {len(purged)} leases and offers of unregistered MACs")


def list_all_nodes(client: ApiClient, *, state: str | None = None,
                   page: int = 500) -> list[dict[str, Any]]:
    """Every node, page after page (``GET /api/v1/nodes?limit=&after=``)."""
    nodes: list[dict[str, Any]] = []
    query: dict[str, str] = {"limit": str(page), **({"state": state} if state else {})}
    while True:
        answer = client.get("/api/v1/nodes?" + urllib.parse.urlencode(query))
        nodes.extend(answer["nodes"])
        if not answer.get("next"):
            return nodes
        query["after"] = answer["next"]


def cmd_role(args: argparse.Namespace, client: ApiClient) -> int:
    from configserver.cli import format as cliformat

    if args.action == "list":
        roles = client.get("/api/v1/roles")["roles"]
        return _print(args, roles, cliformat.role_table(roles))
    if args.action == "rm":
        client.delete(f"/api/v1/roles/{args.name}")
        return _print(args, {"removed": args.name}, f"removed role {args.name}")
    body = {k: getattr(args, k) for k in ("image", "template", "kernel_args",
                                          "hypervisor_args", "description")
            if getattr(args, k) is not None}
    if args.action == "add":
        role = client.post("/api/v1/roles", {"name": args.name, **body})
        return _print(args, role, f"added role {role['name']} (image {role['image']}, "
                                  f"{role['template']})")
    role = client.patch(f"/api/v1/roles/{args.name}", body)
    return _print(args, role, f"updated role {role['name']}")


def cmd_apply(args: argparse.Namespace, client: ApiClient) -> int:
    name = str(args.file)
    try:
        text = sys.stdin.read() if name == "-" else args.file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {name}: {exc.strerror}") from None
    body = parse_inventory(text, source=name)
    body["prune"] = args.prune
    result = client.post("/api/v1/apply", body)
    summary = ", ".join(f"{len(result[k])} {k}" for k in ("created", "updated", "unchanged",
                                                          "removed"))
    return _print(args, result, f"applied {name}: {summary}")


def cmd_export(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.get("/api/v1/export")
    return _print(args, data, format_inventory(data).rstrip("\n"))


def cmd_settings(args: argparse.Namespace, client: ApiClient) -> int:
    if args.unknown_mac:
        data = client.patch("/api/v1/settings", {"unknown_mac": args.unknown_mac})
    else:
        data = client.get("/api/v1/settings")
    return _print(args, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


def cmd_images(args: argparse.Namespace, client: ApiClient) -> int:
    from configserver.cli import format as cliformat

    images = client.get("/api/v1/images")["images"]
    return _print(args, images, cliformat.image_table(images))


COMMANDS = {"node": cmd_node, "lease": cmd_lease, "role": cmd_role, "apply": cmd_apply,
            "export": cmd_export, "settings": cmd_settings, "images": cmd_images,
            "user": users.cmd_user, "volume": volumes.cmd_volume,
            "instance": instances.cmd_instance, "dashboard": dashboard.cmd_dashboard}
