"""Inventory assembly from recorded procfs text, udev records and rtnetlink messages."""

from __future__ import annotations

import socket

from nodeagent.inventory import RawFacts, assemble, platform, procfs

# Two sockets, two cores each, hyper-threading: 8 threads.
CPUINFO = "\n".join(
    f"processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) E5-2620\n"
    f"physical id\t: {n // 4}\nsiblings\t: 4\ncore id\t\t: {(n // 2) % 2}\ncpu cores\t: 2\n"
    f"flags\t\t: fpu vme de pse msr vmx ept lm\n"
    for n in range(8))

MEMINFO = """MemTotal:       16314332 kB
MemFree:         1234567 kB
MemAvailable:   12000000 kB
Buffers:          100000 kB
SwapTotal:             0 kB
"""

# What pyudev reported for a SATA disk, an NVMe disk (udev database present), a loop device
# and an empty card reader.
BLOCK_DEVICES = [
    ({"DEVNAME": "/dev/sda", "DEVTYPE": "disk", "ID_BUS": "ata",
      "ID_MODEL": "ST4000NM0033-9ZM170", "ID_SERIAL_SHORT": "Z1Z3ABCD",
      "ID_SERIAL": "ST4000NM0033-9ZM170_Z1Z3ABCD", "ID_WWN": "0x5000c500a1b2c3d4",
      "DEVLINKS": "/dev/disk/by-id/ata-ST4000NM0033-9ZM170_Z1Z3ABCD "
                  "/dev/disk/by-path/pci-0000:00:1f.2-ata-1 "
                  "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"},
     {"size": "7814037168", "queue/rotational": "1", "removable": "0", "ro": "0"}),
    ({"DEVNAME": "/dev/nvme0n1", "DEVTYPE": "disk", "ID_BUS": "nvme"},
     {"size": "1953525168", "queue/rotational": "0", "removable": "0", "ro": "0",
      "device/model": "Samsung SSD 970 EVO Plus 1TB          ",
      "device/serial": "S4EWNX0N123456 ", "wwid": "eui.0025385b91b12345"}),
    ({"DEVNAME": "/dev/loop0", "DEVTYPE": "disk"}, {"size": "2048"}),
    ({"DEVNAME": "/dev/sdb", "DEVTYPE": "disk", "ID_BUS": "usb"},
     {"size": "0", "removable": "1"}),
]

# rtnetlink dumps (pyroute2 message layout): lo, a physical NIC, a veth without carrier.
LINKS = [
    {"index": 1, "ifi_type": 772, "flags": 0x49,
     "attrs": [["IFLA_IFNAME", "lo"], ["IFLA_ADDRESS", "00:00:00:00:00:00"],
               ["IFLA_OPERSTATE", "UNKNOWN"], ["IFLA_MTU", 65536]]},
    {"index": 2, "ifi_type": 1, "flags": 0x11043,
     "attrs": [["IFLA_IFNAME", "eno1"], ["IFLA_ADDRESS", "3c:ec:ef:01:02:03"],
               ["IFLA_OPERSTATE", "UP"], ["IFLA_MTU", 9000], ["IFLA_CARRIER", 1]]},
    {"index": 7, "ifi_type": 1, "flags": 0x1003,
     "attrs": [["IFLA_IFNAME", "veth-a"], ["IFLA_ADDRESS", "ee:11:22:33:44:55"],
               ["IFLA_OPERSTATE", "LOWERLAYERDOWN"], ["IFLA_MTU", 1500],
               ["IFLA_CARRIER", 0],
               ["IFLA_LINKINFO", {"attrs": [["IFLA_INFO_KIND", "veth"]]}]]},
]
ADDRESSES = [
    {"index": 1, "family": socket.AF_INET, "prefixlen": 8, "scope": 254,
     "attrs": [["IFA_ADDRESS", "127.0.0.1"], ["IFA_LOCAL", "127.0.0.1"]]},
    {"index": 2, "family": socket.AF_INET, "prefixlen": 24, "scope": 0,
     "attrs": [["IFA_ADDRESS", "198.18.0.20"], ["IFA_LOCAL", "198.18.0.20"]]},
    {"index": 2, "family": socket.AF_INET6, "prefixlen": 64, "scope": 253,
     "attrs": [["IFA_ADDRESS", "fe80::3eec:efff:fe01:203"]]},
]


def recorded() -> RawFacts:
    return RawFacts(
        hostname="store1", cpuinfo=CPUINFO, meminfo=MEMINFO, block_devices=BLOCK_DEVICES,
        links=LINKS, addresses=ADDRESSES,
        nic_sysfs={"eno1": {"driver": "igb", "speed": 10000}, "veth-a": {"speed": -1}},
        dmi={"vendor": "Supermicro", "product": "X10DRi", "serial": "0123456789"},
        boot_mode="uefi", uname=("6.1.0-18-amd64", "#1 SMP Debian", "x86_64"),
        cmdline="netboot.server=http://198.18.0.1:8080\n",
        xen={"hypervisor": "xen", "dom0": True})


def test_cpu_counts_sockets_cores_threads_and_virtualisation():
    assert procfs.parse_cpuinfo(CPUINFO) == {
        "model": "Intel(R) Xeon(R) E5-2620", "sockets": 2, "cores": 4, "threads": 8,
        "virtualisation": ["vmx"], "under_hypervisor": False}


def test_cpu_of_an_arm_board_without_core_ids():
    text = "processor\t: 0\nFeatures\t: fp asimd\n\nprocessor\t: 1\nFeatures\t: fp asimd\n"
    cpu = procfs.parse_cpuinfo(text)
    assert (cpu["threads"], cpu["cores"], cpu["sockets"], cpu["model"]) == (2, 2, 1, None)


def test_memory_in_bytes():
    assert procfs.parse_meminfo(MEMINFO) == {
        "total_bytes": 16314332 * 1024, "free_bytes": 1234567 * 1024,
        "available_bytes": 12000000 * 1024, "swap_total_bytes": 0}


def test_assembled_disks():
    disks = assemble(recorded())["disks"]
    assert [d["name"] for d in disks] == ["nvme0n1", "sda"]
    nvme, sata = disks
    assert sata == {
        "name": "sda", "path": "/dev/sda", "size_bytes": 7814037168 * 512,
        "model": "ST4000NM0033-9ZM170", "vendor": None, "serial": "Z1Z3ABCD",
        "wwn": "0x5000c500a1b2c3d4", "rotational": True, "removable": False,
        "read_only": False, "bus": "ata",
        "by_id": ["/dev/disk/by-id/ata-ST4000NM0033-9ZM170_Z1Z3ABCD",
                  "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"]}
    assert nvme["model"] == "Samsung SSD 970 EVO Plus 1TB"
    assert nvme["serial"] == "S4EWNX0N123456"
    assert nvme["wwn"] == "eui.0025385b91b12345"
    assert nvme["rotational"] is False
    assert nvme["size_bytes"] == 1953525168 * 512


def test_assembled_nics_skip_loopback_and_carry_addresses():
    nics = assemble(recorded())["nics"]
    assert [n["name"] for n in nics] == ["eno1", "veth-a"]
    eno1, veth = nics
    assert eno1 == {
        "name": "eno1", "mac": "3c:ec:ef:01:02:03", "driver": "igb", "kind": None,
        "speed_mbps": 10000, "link": "up", "operstate": "up", "mtu": 9000,
        "addresses": [
            {"family": "inet", "address": "198.18.0.20", "prefixlen": 24, "scope": "global"},
            {"family": "inet6", "address": "fe80::3eec:efff:fe01:203", "prefixlen": 64,
             "scope": "link"}]}
    assert (veth["driver"], veth["kind"], veth["link"], veth["speed_mbps"]) == (
        "veth", "veth", "down", None)
    assert veth["addresses"] == []


def test_assembled_document_has_every_section():
    inventory = assemble(recorded())
    assert inventory["schema"] == 1
    assert inventory["hostname"] == "store1"
    assert inventory["boot_mode"] == "uefi"
    assert inventory["dmi"]["vendor"] == "Supermicro"
    assert inventory["kernel"] == {"release": "6.1.0-18-amd64", "version": "#1 SMP Debian",
                                   "machine": "x86_64",
                                   "cmdline": "netboot.server=http://198.18.0.1:8080"}
    assert inventory["xen"] == {"hypervisor": "xen", "dom0": True}
    assert "errors" not in inventory


def test_missing_sources_give_empty_sections_not_errors():
    inventory = assemble(RawFacts(errors={"nics": "OSError: no netlink"}))
    assert inventory["cpu"] is None and inventory["memory"] is None
    assert inventory["disks"] == [] and inventory["nics"] == []
    assert inventory["errors"] == {"nics": "OSError: no netlink"}


def test_platform_readers_on_a_recorded_tree(tmp_path):
    dmi = tmp_path / "sys/class/dmi/id"
    dmi.mkdir(parents=True)
    (dmi / "sys_vendor").write_text("QEMU\n")
    (dmi / "product_name").write_text("Standard PC (Q35 + ICH9, 2009)\n")
    (dmi / "product_serial").write_text("\n")
    (tmp_path / "sys/firmware/efi").mkdir(parents=True)
    (tmp_path / "sys/hypervisor").mkdir(parents=True)
    (tmp_path / "sys/hypervisor/type").write_text("xen\n")
    (tmp_path / "proc/xen").mkdir(parents=True)
    (tmp_path / "proc/xen/capabilities").write_text("control_d\n")
    facts = platform.dmi(tmp_path)
    assert facts["vendor"] == "QEMU"
    assert facts["product"] == "Standard PC (Q35 + ICH9, 2009)"
    assert facts["serial"] is None and facts["uuid"] is None
    assert platform.boot_mode(tmp_path) == "uefi"
    assert platform.xen(tmp_path) == {"hypervisor": "xen", "dom0": True}
    assert platform.boot_mode(tmp_path / "nothing") == "bios"
    assert platform.xen(tmp_path / "nothing") == {"hypervisor": None, "dom0": False}


def test_found_macs_put_physical_nics_first(tmp_path):
    from nodeagent.session import found_macs

    net = tmp_path / "sys/class/net"
    for name, address, kind, physical in (
            ("br0", "52:54:00:00:00:0b", "1", False), ("eno1", "3c:ec:ef:01:02:03", "1", True),
            ("lo", "00:00:00:00:00:00", "772", False), ("ib0", "80:00:00:48:fe", "32", True),
            ("vif1.0", "fe:ff:ff:ff:ff:ff", "1", False),
            ("vif2.0", "fe:ff:ff:ff:ff:ff", "1", False)):
        (net / name).mkdir(parents=True)
        (net / name / "address").write_text(address + "\n")
        (net / name / "type").write_text(kind + "\n")
        if physical:
            (net / name / "device").mkdir()
    assert found_macs(tmp_path) == ("3c:ec:ef:01:02:03", "52:54:00:00:00:0b",
                                    "fe:ff:ff:ff:ff:ff")
    assert found_macs(tmp_path, limit=1) == ("3c:ec:ef:01:02:03",)
    assert found_macs(tmp_path / "none") == ()
