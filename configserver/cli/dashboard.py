"""``configserver dashboard login``: a single-use link that opens the web dashboard.

The link names the admin who asked (this command's certificate, or the local admin through
the server's unix socket), opens one browser session once, and expires unused after two
minutes. ``--json`` prints ``{url, for, expires, expires_at}``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from configserver.http.client import ApiClient


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    dashboard = sub.add_parser("dashboard", parents=[common], help="the web dashboard")
    dsub = dashboard.add_subparsers(dest="action", required=True, metavar="ACTION")
    dsub.add_parser("login", parents=[common],
                    help="print a single-use link that opens a dashboard session")


def cmd_dashboard(args: argparse.Namespace, client: ApiClient) -> int:
    link = client.post("/api/v1/dashboard/login", {})
    if getattr(args, "json", False):
        print(json.dumps(link, indent=2, sort_keys=True))
    else:
        print(f"{link['url']}\n  opens one dashboard session for {link['for']}, once; "
              f"unused, it expires at {link['expires_at']}")
    return 0
