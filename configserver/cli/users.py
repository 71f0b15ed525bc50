"""``configserver user add|list|show|revoke``: client certificate bundles for people.

The key is made here, on the machine that will hold it; the server signs a CSR and never sees
the key. The bundle: NAME.key (0600), NAME.pem, ca.pem and NAME.p12 (for a browser).
"""

from __future__ import annotations

import argparse
import datetime
import json
import secrets
from pathlib import Path
from typing import Any

from configserver.errors import ConfigError
from configserver.http.client import ApiClient
from configserver.pki.bundle import csr_for, new_key, write_bundle


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    user = sub.add_parser("user", parents=[common], help="people's client certificates")
    usub = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = usub.add_parser("add", parents=[common], help="issue a client certificate bundle")
    add.add_argument("name")
    who = add.add_mutually_exclusive_group(required=True)
    who.add_argument("--admin", action="store_true", help="may do everything")
    who.add_argument("--tenant", help="sees and acts only on this tenant's objects")
    who.add_argument("--monitor", action="store_true",
                     help="reads metrics and scrape targets only (a Prometheus server)")
    add.add_argument("--out", type=Path, default=Path("."),
                     help="directory for the bundle (default: the current one)")
    add.add_argument("--days", type=int, default=90, help="lifetime (default 90)")
    add.add_argument("--p12-passphrase-file", type=Path, metavar="FILE",
                     help="passphrase of NAME.p12 (default: a new one, printed once)")
    usub.add_parser("list", parents=[common], help="list users")
    show = usub.add_parser("show", parents=[common], help="one user")
    show.add_argument("name")
    revoke = usub.add_parser("revoke", parents=[common],
                             help="revoke a user's certificates (at once)")
    revoke.add_argument("name")


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def _line(user: dict[str, Any]) -> str:
    who = _who(user)
    state = f"revoked {_when(user['revoked'])}" if user["revoked"] else (
        f"valid until {_when(user['not_after'])}")
    return f"{user['name']:<20} {who:<24} {state:<28} serial {user['serial'] or '-'}"


def _who(user: dict[str, Any]) -> str:
    return f"tenant {user['tenant']}" if user["kind"] == "tenant" else str(user["kind"])


def _print(args: argparse.Namespace, data: Any, text: str) -> int:
    print(json.dumps(data, indent=2, sort_keys=True) if getattr(args, "json", False) else text)
    return 0


def cmd_user(args: argparse.Namespace, client: ApiClient) -> int:
    if args.action == "list":
        users = client.get("/api/v1/users")["users"]
        return _print(args, users, "\n".join(_line(u) for u in users) or "no users")
    if args.action == "show":
        user = client.get(f"/api/v1/users/{args.name}")
        return _print(args, user, _line(user))
    if args.action == "revoke":
        user = client.post(f"/api/v1/users/{args.name}/revoke", {})
        return _print(args, user, f"revoked {user['name']} (serial {user['serial']})")
    return _add(args, client)


def _add(args: argparse.Namespace, client: ApiClient) -> int:
    generated = args.p12_passphrase_file is None
    if generated:
        passphrase = secrets.token_urlsafe(12)
    else:
        try:
            passphrase = args.p12_passphrase_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.p12_passphrase_file}: {exc.strerror}") from None
        if not passphrase:
            raise ConfigError(f"{args.p12_passphrase_file} is empty")
    key = new_key()
    kind = "admin" if args.admin else "monitor" if args.monitor else "tenant"
    body: dict[str, Any] = {"name": args.name, "kind": kind,
                            "csr": csr_for(key, args.name).decode(), "days": args.days}
    if args.tenant:
        body["tenant"] = args.tenant
    answer = client.post("/api/v1/users", body)
    try:
        paths = write_bundle(args.out, args.name, key,
                             certificate_pem=answer["certificate"].encode(),
                             ca_pem=answer["ca"].encode(), passphrase=passphrase.encode())
    except OSError as exc:
        raise ConfigError(f"cannot write the bundle in {args.out}: {exc.strerror}",
                          hint=f"the certificate is issued: revoke {args.name} and add "
                               "again") from None
    files = {"key": str(paths.key), "certificate": str(paths.certificate),
             "ca": str(paths.ca), "p12": str(paths.p12)}
    data = {"user": answer["user"], "files": files,
            **({"p12_passphrase": passphrase} if generated else {})}
    user = answer["user"]
    who = _who(user)
    lines = [f"issued {who} certificate for {user['name']} (serial {user['serial']}, "
             f"valid until {_when(user['not_after'])})",
             f"  {paths.key}  {paths.certificate}  {paths.ca}  {paths.p12}"]
    if generated:
        lines.append(f"  passphrase of {paths.p12.name} (shown once): {passphrase}")
    lines.append(f"  e.g. curl --cert {paths.certificate} --key {paths.key} "
                 f"--cacert {paths.ca} https://SERVER:8443/api/v1/whoami")
    return _print(args, data, "\n".join(lines))
