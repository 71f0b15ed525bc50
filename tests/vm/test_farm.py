"""vm tier, issues 6 and 7: the real images PXE-boot in the farm and their agents get ready.

These boot ``build/images/dom0`` and ``build/images/storage`` (``make images``) through the
config server in the farm's namespace. What a BIOS farm's nodes show once ready is checked on
the cloud farm (``test_volumes.py``'s first test), which the vm tier boots anyway. Run by
hand, they skip when an image's manifest is absent; under make (which builds the images
first) and CI a missing image fails them.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from configserver.farm import BootFailed, network
from configserver.farm.farm import Farm, FarmConfig, FarmState, plan_nodes

pytestmark = pytest.mark.vm

IMAGES = Path(__file__).resolve().parents[2] / "build" / "images"
READY_BUDGET = 900  # seconds from power-on to every agent ready, both VMs at once under TCG


def _require_images(*roles: str) -> None:
    missing = [str(IMAGES / role / "manifest.json") for role in roles
               if not (IMAGES / role / "manifest.json").exists()]
    if not missing:
        return
    if os.environ.get("NETBOOT_IMAGES_BUILT") or os.environ.get("CI") == "true":
        pytest.fail(f"{', '.join(missing)} absent although 'make images' ran before this "
                    "tier: see build/images/*.log")
    pytest.skip(f"{', '.join(missing)} absent: run 'make images' first (or 'make test-vm')")


def _farm(tmp_path: Path, dom0: int, storage: int, firmware: str = "bios") -> Farm:
    nodes = plan_nodes(dom0, storage, firmware, "198.18.0.0/24")
    config = FarmConfig(farm_dir=tmp_path / "farm", nodes=nodes, images_dir=IMAGES,
                        ready_timeout=READY_BUDGET)
    return Farm(config, report=lambda line: print(line, flush=True))


def _assert_nothing_left(farm: Farm, pids: list[int]) -> None:
    assert farm.net.namespace not in network.namespaces()
    assert not [p for p in pids if network.alive(p)], "processes survived 'down'"
    assert FarmState.load(farm.dir) is None
    assert not Path(f"/etc/netns/{farm.net.namespace}").exists()


def _with_inventory(farm: Farm, mac: str, timeout: float = 180) -> dict:
    """The node's view once its agent has pushed an inventory (it follows the first heartbeat)."""
    deadline = time.monotonic() + timeout
    while True:
        view = farm.node_view(mac)
        if view.get("inventory") or time.monotonic() > deadline:
            return view
        time.sleep(3)


def _up_and_down(farm: Farm, while_up=lambda farm: None):
    """``up`` then always ``down``; yield the rows, the node views and the pids it had.

    ``while_up(farm)`` runs once every node is ready, before ``down``."""
    try:
        start = time.monotonic()
        rows = farm.up()
        elapsed = time.monotonic() - start
        state = FarmState.load(farm.dir)
        assert state is not None
        views = {n["mac"]: _with_inventory(farm, n["mac"]) for n in state.nodes}
        taps = farm.net.taps()
        pids = [n["pid"] for n in state.nodes] + [state.server_pid]
        status = farm.status()
        while_up(farm)
    except BootFailed as exc:
        pytest.fail(f"{exc.message} ({exc.hint})")
    finally:
        removed = farm.down()
    return rows, views, taps, pids, status, removed, elapsed


def test_uefi_farm_boots_xen_dom0_and_storage_node_to_ready(tmp_path):
    # OVMF with the iPXE ROM's EFI driver: iPXE's EFI build cannot multiboot, so the dom0
    # boots xen.efi, which reads its xen.cfg, kernel and initramfs from what iPXE fetched.
    _require_images("dom0", "storage")
    if not (IMAGES / "dom0" / "xen.efi").is_file():
        pytest.fail(f"{IMAGES / 'dom0'} has no xen.efi: rebuild it ('make image-dom0')")
    farm = _farm(tmp_path, dom0=1, storage=1, firmware="uefi")
    rows, views, _taps, pids, _status, _removed, elapsed = _up_and_down(farm)

    assert [r["state"] for r in rows] == ["ready", "ready"], rows
    print(f"UEFI farm ready after {elapsed:.0f}s: {rows}")
    for view in views.values():
        inventory = view.get("inventory") or {}
        assert inventory.get("boot_mode") == "uefi", (view["role"], inventory.get("boot_mode"))

    dom0 = next(v for v in views.values() if v["role"] == "dom0")
    xen = (dom0.get("inventory") or {}).get("xen") or {}
    assert xen.get("hypervisor") == "xen" and xen.get("dom0") is True, dom0.get("inventory")
    fetched = [e["detail"].get("file") for e in dom0["events"] if e["stage"] == "http.hypervisor"]
    assert fetched == ["xen.efi"], fetched
    serial = (farm.dir / "vms" / "dom0-1" / "serial.log").read_text(errors="replace")
    assert "Using configuration file 'xen.cfg'" in serial and "(XEN) Bootloader: EFI" in serial
    _assert_nothing_left(farm, pids)


def test_down_removes_a_farm_that_is_still_booting(tmp_path):
    _require_images("storage")
    farm = _farm(tmp_path, dom0=0, storage=1)
    try:
        farm.up(wait=False)
        state = FarmState.load(farm.dir)
        assert state is not None
        pids = [n["pid"] for n in state.nodes] + [state.server_pid]
        assert all(network.alive(p) for p in pids)
        assert farm.net.taps() == ["tap0"]
    finally:
        farm.down()
    _assert_nothing_left(farm, pids)
    assert farm.down() == []


def test_a_second_up_keeps_the_registry_or_starts_fresh(tmp_path):
    # up, down, up again: the farm's nodes are applied, not added twice ("already registered").
    _require_images("storage")
    farm = _farm(tmp_path, dom0=0, storage=1)
    try:
        farm.up(wait=False)
        farm.cli("node", "add", "52:54:00:fa:99:01", "--role", "storage")
        farm.down()
        farm.up(wait=False)
        macs = {n["mac"] for n in farm.cli_json("node", "list")}
        assert macs == {"52:54:00:fa:5a:01", "52:54:00:fa:99:01"}, macs
        farm.down()
        fresh = Farm(replace(farm.config, fresh=True), report=farm.report)
        fresh.up(wait=False)
        assert {n["mac"] for n in fresh.cli_json("node", "list")} == {"52:54:00:fa:5a:01"}
    finally:
        farm.down()
    assert farm.down() == []
