"""Issue 13, finding 10: nothing listens on a node that its role does not need.

Checked on the element sources, for each image recipe (images/*.toml): every package the image
installs that ships a network server is either one the role runs at boot (sshd, and only where
root has keys) or has its unit masked by one of the image's element scripts. Masking, not
disabling: Debian ships some servers (nbd-server in bookworm) as SysV init scripts, which the
build chroot's ``systemctl disable`` cannot see and systemd's SysV generator starts at boot.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ELEMENTS = REPO / "elements"
RECIPES = sorted((REPO / "images").glob("*.toml"))
PHASES = ("pre-install.d", "install.d", "post-install.d", "finalise.d")

# Debian packages whose daemon listens on the network once started, and its unit.
SERVERS = {
    "nbd-server": "nbd-server.service",
    "rpcbind": "rpcbind.service",
    "nfs-kernel-server": "nfs-server.service",
    "tgt": "tgt.service",
    "vblade-persist": "vblade-persist.service",
    "exim4-daemon-light": "exim4.service",
    "postfix": "postfix.service",
    "avahi-daemon": "avahi-daemon.service",
    "dnsmasq": "dnsmasq.service",
    "isc-dhcp-server": "isc-dhcp-server.service",
    "chrony": "chrony.service",
    "ntp": "ntp.service",
    "ntpsec": "ntpsec.service",
    "snmpd": "snmpd.service",
    "openbsd-inetd": "inetd.service",
    "xinetd": "xinetd.service",
    "apache2": "apache2.service",
    "nginx": "nginx.service",
    "samba": "smbd.service",
    "cups-daemon": "cups.service",
}
# Servers a role runs at boot, and why.
RUN_AT_BOOT = {
    "openssh-server": "sshd, on TCP 22, only where root has keys (ConditionPathExists)",
}


def _elements_of(recipe: dict) -> list[Path]:
    """The recipe's own elements and their element-deps (only those in this repository)."""
    seen: list[Path] = []
    todo = list(recipe["elements"])
    while todo:
        element = ELEMENTS / todo.pop(0)
        if element.is_dir() and element not in seen:
            seen.append(element)
            todo.extend((element / "element-deps").read_text().split())
    return seen


def _packages(elements: list[Path], recipe: dict) -> set[str]:
    yaml = pytest.importorskip("yaml")
    packages = set(recipe.get("packages", []))
    for element in elements:
        data = yaml.safe_load((element / "package-installs.yaml").read_text()) or {}
        # A conditional package counts as installed: a variable can turn it on.
        packages |= {name for name, options in data.items()
                     if not (options or {}).get("uninstall")}
    return packages


def _script_lines(elements: list[Path]) -> list[str]:
    lines = []
    for element in elements:
        for phase in PHASES:
            for script in sorted((element / phase).glob("*")) if (element / phase).is_dir() \
                    else []:
                lines += [line.split("#", 1)[0].strip() for line in
                          script.read_text().splitlines()]
    return [line for line in lines if line]


def _masks(lines: list[str], unit: str) -> bool:
    name = re.escape(unit)
    return any(re.fullmatch(rf"ln -sfn? /dev/null /etc/systemd/system/{name}", line)
               or re.fullmatch(rf"systemctl mask (\S+ )*{name}( \S+)*", line)
               for line in lines)


def _enables(lines: list[str], unit: str) -> bool:
    service = re.escape(unit.removesuffix(".service"))
    return any(re.search(rf"systemctl (enable|unmask)\b.*\b{service}\b", line)
               or re.search(rf"update-rc\.d {service} (defaults|enable)", line)
               for line in lines)


@pytest.fixture(params=[p.stem for p in RECIPES])
def image(request):
    recipe = tomllib.loads((REPO / "images" / f"{request.param}.toml").read_text())
    elements = _elements_of(recipe)
    assert elements, f"{request.param}: no element of this repository"
    return request.param, elements, _packages(elements, recipe), _script_lines(elements)


def test_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"dom0", "storage"}, RECIPES


def test_every_installed_network_server_is_masked_unless_the_role_runs_it(image):
    name, _, packages, lines = image
    assert packages and lines, name
    unmasked = sorted(f"{package} ({SERVERS[package]})" for package in packages & set(SERVERS)
                      if not _masks(lines, SERVERS[package]) or _enables(lines, SERVERS[package]))
    assert not unmasked, f"image {name} would start {', '.join(unmasked)} at boot"


def test_storage_image_installs_nbd_server_masked():
    # The storage image keeps nbd-server for exports made on request: masked, not running.
    recipe = tomllib.loads((REPO / "images" / "storage.toml").read_text())
    elements = _elements_of(recipe)
    assert "nbd-server" in _packages(elements, recipe)
    lines = _script_lines(elements)
    assert _masks(lines, "nbd-server.service") and not _enables(lines, "nbd-server.service")


def test_sshd_runs_only_where_root_has_keys():
    assert set(RUN_AT_BOOT) == {"openssh-server"}
    dropin = ELEMENTS / "netboot-base/static/etc/systemd/system/ssh.service.d/10-netboot-base.conf"
    assert "ConditionPathExists=/root/.ssh/authorized_keys" in dropin.read_text().splitlines()


def test_mask_patterns():
    assert _masks(["ln -sfn /dev/null /etc/systemd/system/nbd-server.service"],
                  "nbd-server.service")
    assert _masks(["systemctl mask rpcbind.service nbd-server.service"], "nbd-server.service")
    assert not _masks(["systemctl disable nbd-server.service"], "nbd-server.service")
    assert _enables(["update-rc.d nbd-server defaults"], "nbd-server.service")
    assert _enables(["systemctl enable nbd-server"], "nbd-server.service")
