"""vm tier, "the cloud, part 1": replicated volumes in the farm's cloud preset.

One farm (2 dom0s, 2 storage nodes: ``farm up --cloud``) is booted for the whole module and
shared by its tests, which run in order and build on each other's volumes. Everything goes
through the real CLI of the config server and the real agents: LVM and LIO (rtslib-fb) on
the storage nodes, open-iscsi and md RAID1 on the dom0s. Data is checked with sha256 and a
writer/verifier (``volume_writer.py``) run by each dom0's own python3.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_farm import IMAGES, READY_BUDGET, _require_images

from configserver.farm import BootFailed, network
from configserver.farm.farm import Farm, FarmConfig, FarmState, plan_nodes

pytestmark = pytest.mark.vm

WRITER = (Path(__file__).with_name("volume_writer.py")).read_text()
SETTLE = 300  # seconds for a volume to reach a state under TCG, four VMs on two cores
TARGETS = "/sys/kernel/config/target/iscsi"


class Cloud:
    """The shared farm, with the calls the tests make."""

    def __init__(self, farm: Farm) -> None:
        self.farm = farm
        state = FarmState.load(farm.dir)
        assert state is not None
        self.nodes = {n["name"]: n for n in state.nodes}

    def cli(self, *argv: str) -> Any:
        return self.farm.cli_json(*argv)

    def show(self, name: str) -> dict[str, Any]:
        return self.cli("volume", "show", name)

    def wait(self, name: str, what: str, ready: Callable[[dict[str, Any]], bool],
             timeout: float = SETTLE) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            view = self.show(name)
            if ready(view):
                return view
            if time.monotonic() > deadline:
                pytest.fail(f"volume {name} not {what} within {timeout:.0f}s:\n"
                            + json.dumps(view, indent=1))
            time.sleep(2)

    def attached_on(self, name: str, node: str) -> dict[str, Any]:
        mac = self.nodes[node]["mac"]
        return self.wait(name, f"attached on {node}", lambda v: any(
            a["node"] == mac and a["state"] == "attached" for a in v["attached"]))

    def ssh(self, node: str, command: str, *, timeout: float = 180,
            input_text: str | None = None, check: bool = True) -> str:
        done = network.run(self.farm.ssh_command(node, [command]), timeout=timeout,
                           check=False, input_text=input_text)
        if check and done.returncode != 0:
            pytest.fail(f"{node}: {command!r} failed ({done.returncode}): "
                        f"{done.stdout}{done.stderr}")
        return done.stdout

    def verify(self, node: str, device: str, result: dict[str, Any], seed: int,
               blocks: int) -> dict[str, Any]:
        out = self.ssh(node, f"python3 - verify {device} --blocks {blocks} --seed {seed} "
                             f"--passes {result['passes']} --last {result['last']}",
                       input_text=WRITER)
        return json.loads(out.splitlines()[-1])

    def writer(self, node: str, device: str, seconds: float, seed: int, blocks: int = 64,
               *extra: str) -> Writer:
        argv = self.farm.ssh_command(node, [f"python3 - write {device} {seconds:g} "
                                            f"--blocks {blocks} --seed {seed} {' '.join(extra)}"])
        return Writer(argv, WRITER)

    def legs_on(self, node: str) -> set[str]:
        """The logical volumes of ours on a storage node."""
        out = self.ssh(node, "lvs --noheadings -o lv_name netboot 2>/dev/null || true")
        return {line.strip() for line in out.splitlines() if line.strip().startswith("nb-")}

    def acls(self, node: str) -> dict[str, set[str]]:
        """Which initiators each of our targets on a storage node lets in (from configfs)."""
        out = self.ssh(node, f"for t in $(ls {TARGETS} 2>/dev/null | grep '^iqn\\.'); do "
                             f"echo T $t; for a in $(ls {TARGETS}/$t/tpgt_1/acls 2>/dev/null); "
                             "do echo A $t $a; done; done")
        found: dict[str, set[str]] = {}
        for line in out.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "T":
                found.setdefault(rest, set())
            elif kind == "A":
                target, _, acl = rest.partition(" ")
                found.setdefault(target, set()).add(acl)
        return found


class Writer:
    """``volume_writer.py write`` on a dom0 over ssh; its event lines timed on this host."""

    def __init__(self, argv: list[str], script: str) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdin is not None
        self.proc.stdin.write(script)
        self.proc.stdin.close()
        self.events: dict[str, float] = {}
        self.lines: list[str] = []
        self.result: dict[str, Any] | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if "event" in data:
                self.events.setdefault(data["event"], time.monotonic())
            else:
                self.result = data

    def wait_event(self, event: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while event not in self.events:
            if time.monotonic() > deadline or (self.proc.poll() is not None
                                               and not self._reader.is_alive()):
                pytest.fail(f"writer: no {event!r} within {timeout:.0f}s: {self.lines}")
            time.sleep(0.05)
        return self.events[event]

    def finish(self, timeout: float) -> dict[str, Any]:
        self.proc.wait(timeout)
        self._reader.join(10)
        if self.result is None:
            pytest.fail(f"writer printed no result: {''.join(self.lines)}")
        return self.result


@pytest.fixture(scope="module")
def cloud(tmp_path_factory) -> Iterator[Cloud]:
    """The module's farm: booted here, or (for working on these tests) the cloud farm already
    up in ``$NETBOOT_VM_CLOUD_FARM`` (``farm up --cloud --fresh``), which is left up."""
    _require_images("dom0", "storage")
    reuse = os.environ.get("NETBOOT_VM_CLOUD_FARM")
    farm_dir = Path(reuse) if reuse else tmp_path_factory.mktemp("cloud") / "farm"
    farm = Farm(FarmConfig(farm_dir=farm_dir, nodes=plan_nodes(2, 2, "bios", "198.18.0.0/24"),
                           images_dir=IMAGES, ready_timeout=READY_BUDGET),
                report=lambda line: print(line, flush=True))
    if reuse:
        yield Cloud(farm)
        return
    try:
        started = time.monotonic()
        farm.up()
        print(f"cloud farm ready after {time.monotonic() - started:.0f}s", flush=True)
        yield Cloud(farm)
    except BootFailed as exc:
        pytest.fail(f"{exc.message} ({exc.hint})")
    finally:
        farm.down()
        assert farm.net.namespace not in network.namespaces()


def _create(cloud: Cloud, name: str, size: str) -> dict[str, Any]:
    created = cloud.cli("volume", "create", name, "--size", size)
    assert {leg["hostname"] for leg in created["legs"]} == {"storage-1", "storage-2"}, created
    return cloud.wait(name, "ready", lambda v: v["state"] == "ready")


def test_a_volume_keeps_its_data_from_one_dom0_to_the_next(cloud):
    volume = _create(cloud, "v1", "256M")
    cloud.cli("volume", "attach", "v1", "dom0-1")
    view = cloud.attached_on("v1", "dom0-1")
    device = view["attached"][0]["device"]
    assert device == f"/dev/md/nb-{volume['id']}", view
    assert view["redundancy"] == "redundant", view

    written = json.loads(cloud.ssh("dom0-1", f"python3 - random {device} --blocks 64",
                                   input_text=WRITER).splitlines()[-1])["sha256"]
    read = cloud.ssh("dom0-1", f"dd if={device} bs=1M count=64 iflag=direct status=none "
                               "| sha256sum").split()[0]
    assert written == read

    cloud.cli("volume", "detach", "v1", "dom0-1")
    cloud.wait("v1", "detached", lambda v: not v["attached"])
    assert not cloud.ssh("dom0-1", "ls /dev/md/ 2>/dev/null; iscsiadm -m session 2>/dev/null",
                         check=False).strip()
    cloud.cli("volume", "attach", "v1", "dom0-2")
    view = cloud.attached_on("v1", "dom0-2")
    assert view["attached"][0]["device"] == device, view
    out = cloud.ssh("dom0-2", f"dd if={device} bs=1M count=64 iflag=direct status=none "
                              "| sha256sum")
    assert out.split()[0] == written, out
    stages = [e["stage"] for e in view["timeline"]]
    print("v1 timeline:", stages)
    for stage in ("attach.requested", "detach.requested"):
        assert stage in stages, stages


def test_revoking_a_dom0_fails_its_io_while_the_other_goes_on(cloud):
    _create(cloud, "v2", "256M")
    cloud.cli("volume", "attach", "v2", "dom0-1")
    revoked_device = cloud.attached_on("v2", "dom0-1")["attached"][0]["device"]
    kept_device = cloud.show("v1")["attached"][0]["device"]
    revoked = cloud.writer("dom0-1", revoked_device, 90, 3, 64, "--stop-on-error")
    kept = cloud.writer("dom0-2", kept_device, 60, 4)
    revoked.wait_event("started", 60)
    kept.wait_event("started", 60)
    time.sleep(5)
    began = time.monotonic()
    cloud.cli("volume", "detach", "v2", "dom0-1", "--force")
    failed = revoked.wait_event("error", 60) - began
    print(f"dom0-1's writes to v2 failed {failed:.1f}s after its access was revoked "
          "(goal: 5 s)")
    result = revoked.finish(120)
    assert result["errors"], result
    iqn = "iqn.2026-12.net.netboot:node-" + cloud.nodes["dom0-1"]["mac"].replace(":", "")
    target = "iqn.2026-12.net.netboot:vol-" + cloud.show("v2")["id"]
    for storage in ("storage-1", "storage-2"):
        assert iqn not in cloud.acls(storage).get(target, set()), storage

    other = kept.finish(120)
    assert other["errors"] == [], other
    check = cloud.verify("dom0-2", kept_device, other, 4, 64)
    assert check["wrong_count"] == 0, check
    print(f"dom0-2 kept writing v1: {other['writes']} MiB, longest write "
          f"{other['longest_write']}s")


def test_a_storage_node_killed_under_writes_loses_no_byte_and_resyncs(cloud):
    v1 = cloud.show("v1")
    device = v1["attached"][0]["device"]
    writer = cloud.writer("dom0-2", device, 100, 5)
    writer.wait_event("started", 60)
    time.sleep(15)
    cloud.farm.power_off("storage-1")
    killed = time.monotonic()
    cloud.wait("v1", "degraded", lambda v: v["redundancy"] == "degraded", timeout=120)
    print(f"v1 degraded {time.monotonic() - killed:.1f}s after storage-1 was killed")
    # A change while storage-1 is down: it can only learn it from the control plane.
    cloud.cli("volume", "attach", "v2", "dom0-2")
    cloud.wait("v2", "attached degraded on dom0-2", lambda v: any(
        a["state"] in ("degraded", "attached") for a in v["attached"]))
    result = writer.finish(240)
    assert result["errors"] == [], result
    print(f"writes through the loss of a leg: {result['writes']} MiB, longest write "
          f"{result['longest_write']}s at +{result['longest_at']}s")
    check = cloud.verify("dom0-2", device, result, 5, 64)
    assert check["wrong_count"] == 0, check

    cloud.farm.power_on("storage-1")
    back = time.monotonic()
    for name in ("v1", "v2"):
        cloud.wait(name, "redundant again", lambda v: v["redundancy"] == "redundant"
                   and all(a["state"] == "attached" for a in v["attached"]))
    print(f"v1 and v2 redundant {time.monotonic() - back:.0f}s after storage-1 was ready")
    slaves = cloud.ssh("dom0-2", f"ls /sys/block/$(basename $(readlink -f {device}))/slaves")
    legs = slaves.split()
    assert len(legs) == 2, slaves
    for leg in legs:  # metadata 1.0: each leg holds the volume's data from sector 0
        check = cloud.verify("dom0-2", f"/dev/{leg}", result, 5, 64)
        assert check["wrong_count"] == 0, (leg, check)

    dom0_2 = "iqn.2026-12.net.netboot:node-" + cloud.nodes["dom0-2"]["mac"].replace(":", "")
    wanted = {"iqn.2026-12.net.netboot:vol-" + cloud.show(n)["id"]: {dom0_2}
              for n in ("v1", "v2")}
    assert cloud.acls("storage-1") == wanted
    assert cloud.ssh("storage-1", "ls /etc/rtslib-fb-target/saveconfig.json "
                                  "/etc/target/saveconfig.json 2>/dev/null",
                     check=False).strip() == ""


def test_a_drained_storage_node_lets_go_of_its_legs_before_it_goes(cloud):
    device = cloud.show("v1")["attached"][0]["device"]
    writer = cloud.writer("dom0-2", device, 80, 6)
    writer.wait_event("started", 60)
    time.sleep(10)
    began = time.monotonic()
    drained = cloud.cli("node", "drain", "storage-1", "--wait", "240")
    assert drained["drain"]["legs_held"] == 0, drained
    print(f"storage-1 drained in {time.monotonic() - began:.1f}s")
    assert cloud.acls("storage-1") == {}  # its exports are gone, its legs are not
    assert len(cloud.legs_on("storage-1")) == 2
    cloud.farm.power_off("storage-1")
    result = writer.finish(240)
    assert result["errors"] == [], result
    print(f"writes through a planned drain: {result['writes']} MiB, longest write "
          f"{result['longest_write']}s at +{result['longest_at']}s (goal: no stall over 2 s)")
    assert result["longest_write"] < 2.0, result
    check = cloud.verify("dom0-2", device, result, 6, 64)
    assert check["wrong_count"] == 0, check
    assert cloud.show("v1")["redundancy"] == "degraded"

    cloud.farm.power_on("storage-1")
    cloud.cli("node", "undrain", "storage-1")
    for name in ("v1", "v2"):
        cloud.wait(name, "redundant after the undrain", lambda v: v["redundancy"] == "redundant"
                   and all(a["state"] == "attached" for a in v["attached"]))


def test_a_config_server_restart_mid_creation_finishes_it_once(cloud):
    created = cloud.cli("volume", "create", "v3", "--size", "1G")
    cloud.farm.restart_server(hard=True)
    view = cloud.wait("v3", "ready", lambda v: v["state"] == "ready")
    assert view["id"] == created["id"]
    names = [v["name"] for v in cloud.cli("volume", "list")]
    assert sorted(names) == ["v1", "v2", "v3"], names
    volumes = cloud.cli("volume", "list")
    for storage in ("storage-1", "storage-2"):
        mac = cloud.nodes[storage]["mac"]
        expected = {f"nb-{v['id']}" for v in volumes
                    if any(leg["node"] == mac for leg in v["legs"])}
        assert cloud.legs_on(storage) == expected, storage
    print("v3 timeline:", [e["stage"] for e in view["timeline"]])


def test_a_volume_from_the_guest_image_holds_its_file_system(cloud):
    manifest = json.loads((IMAGES / "guest" / "manifest.json").read_text())
    rootfs = manifest["files"][manifest["rootfs"]]
    began = time.monotonic()
    cloud.cli("volume", "create", "g1", "--size", "1G", "--image", "guest")
    view = cloud.wait("g1", "ready", lambda v: v["state"] == "ready")
    print(f"g1 (1 GiB from the guest image, {rootfs['size'] >> 20} MiB) ready after "
          f"{time.monotonic() - began:.0f}s")
    cloud.cli("volume", "attach", "g1", "dom0-1")
    device = cloud.attached_on("g1", "dom0-1")["attached"][0]["device"]
    blocks = rootfs["size"] // (1 << 20)
    out = cloud.ssh("dom0-1", f"head -c {rootfs['size']} {device} | sha256sum; "
                              f"blkid -o value -s LABEL {device}; "
                              f"dd if={device} bs=1M skip={blocks + 1} count=8 iflag=direct "
                              "status=none | tr -d '\\000' | wc -c")
    digest, label, stray = out.split()[0], out.split()[2], out.split()[3]
    assert digest == rootfs["sha256"], out
    assert label == "guestroot", out
    assert stray == "0", out  # past the image, the volume is zeroed
    cloud.cli("volume", "detach", "g1", "dom0-1")
    cloud.wait("g1", "detached", lambda v: not v["attached"])
    assert view["image"] == "guest"


def test_deleting_volumes_removes_their_legs(cloud):
    cloud.cli("volume", "detach", "v1", "dom0-2")
    cloud.cli("volume", "detach", "v2", "dom0-2")
    for name in ("v1", "v2"):
        cloud.wait(name, "detached", lambda v: not v["attached"])
    for name in ("v1", "v2", "v3", "g1"):
        cloud.cli("volume", "delete", name)
    deadline = time.monotonic() + SETTLE
    while cloud.cli("volume", "list") and time.monotonic() < deadline:
        time.sleep(3)
    assert cloud.cli("volume", "list") == []
    for storage in ("storage-1", "storage-2"):
        assert cloud.legs_on(storage) == set(), storage
        assert cloud.acls(storage) == {}, storage
