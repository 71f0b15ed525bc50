"""Role plugins: parsers on recorded tool output, and graceful failure on missing tools."""

from __future__ import annotations

import json

from nodeagent.plugins import PluginContext, ToolUnavailable, dom0, role_facts, storage

XL_INFO = """host                   : xen1
release                : 6.1.0-18-amd64
xen_major              : 4
xen_minor              : 17
xen_extra              : .3-pre
xen_caps               : xen-3.0-x86_64 hvm-3.0-x86_64
total_memory           : 65413
free_memory            : 60120
nr_cpus                : 16
xen_commandline        : dom0_mem=1024M,max:1024M
"""

XL_LIST = json.dumps([
    {"domid": 0, "config": {"c_info": {"type": "pv", "name": "Domain-0"},
                            "b_info": {"max_memkb": 1048576, "max_vcpus": 1}}},
    {"domid": 3, "config": {"c_info": {"type": "pvh", "name": "web1", "uuid": "u-1"},
                            "b_info": {"max_memkb": 2097152, "max_vcpus": 2}}},
])

VGS = json.dumps({"report": [{"vg": [{"vg_name": "data", "vg_size": "4000787030016",
                                       "vg_free": "1000000000000", "lv_count": "2",
                                       "pv_count": "1"}]}]})
LVS = json.dumps({"report": [{"lv": [
    {"lv_name": "vol1", "vg_name": "data", "lv_size": "107374182400",
     "lv_path": "/dev/data/vol1", "lv_attr": "-wi-ao----"}]}]})


def fake_tools(monkeypatch, module, outputs):
    async def run_tool(argv, timeout):
        key = " ".join(argv[:2])
        if key not in outputs:
            raise ToolUnavailable(f"{argv[0]} is not installed")
        return outputs[key]
    monkeypatch.setattr(module, "run_tool", run_tool)


def test_xl_info_parser():
    info = dom0.parse_xl_info(XL_INFO)
    assert info["xen_version"] == "4.17.3-pre"
    assert (info["total_memory"], info["free_memory"], info["nr_cpus"]) == (65413, 60120, 16)
    assert info["xen_caps"] == ["xen-3.0-x86_64", "hvm-3.0-x86_64"]


async def test_dom0_plugin_reports_domains(monkeypatch):
    fake_tools(monkeypatch, dom0, {"xl info": XL_INFO, "xl list": XL_LIST})
    facts = await role_facts("dom0", PluginContext())
    assert facts["available"] is True and facts["plugin"] == "dom0"
    assert [(d["domid"], d["name"], d["max_memkb"]) for d in facts["domains"]] == [
        (0, "Domain-0", 1048576), (3, "web1", 2097152)]


async def test_dom0_plugin_without_xl_is_unavailable(monkeypatch):
    fake_tools(monkeypatch, dom0, {})
    assert await role_facts("dom0", PluginContext()) == {
        "role": "dom0", "plugin": "dom0", "available": False,
        "reason": "xl is not installed"}


async def test_broken_xl_json_only_spoils_the_domain_list(monkeypatch):
    fake_tools(monkeypatch, dom0, {"xl info": XL_INFO, "xl list": "{not json"})
    facts = await role_facts("dom0", PluginContext())
    assert facts["available"] is True
    assert facts["domains"]["available"] is False


async def test_a_crashing_plugin_does_not_raise(monkeypatch):
    async def boom(argv, timeout):
        raise RuntimeError("odd hardware")
    monkeypatch.setattr(dom0, "run_tool", boom)
    facts = await role_facts("dom0", PluginContext())
    assert facts["available"] is False
    assert "odd hardware" in facts["reason"]


async def test_unknown_role_has_no_plugin():
    assert await role_facts("web", PluginContext()) == {"role": "web", "plugin": None}


def test_vblade_and_nbd_parsers():
    assert storage.parse_vblade(["/usr/sbin/vblade", "-r", "1", "2", "eth0",
                                 "/dev/data/vol1"]) == {
        "shelf": 1, "slot": 2, "interface": "eth0", "path": "/dev/data/vol1"}
    assert storage.parse_vblade(["sshd", "-D"]) is None
    config = "[generic]\nuser = nbd\n[vol1]\nexportname = /dev/data/vol1 # lv\nreadonly = false\n"
    assert storage.parse_nbd_config(config) == [
        {"name": "vol1", "path": "/dev/data/vol1", "readonly": "false"}]


async def test_storage_plugin_on_a_recorded_machine(monkeypatch, tmp_path):
    fake_tools(monkeypatch, storage, {
        "lsblk --json": json.dumps({"blockdevices": [{"name": "sda", "size": 100}]}),
        "vgs --reportformat": VGS, "lvs --reportformat": LVS})
    # LIO configfs: one target, one LUN backed by an LV.
    target = tmp_path / "sys/kernel/config/target"
    backstore = target / "core/iblock_0/vol1"
    backstore.mkdir(parents=True)
    (backstore / "udev_path").write_text("/dev/data/vol1\n")
    lun = target / "iscsi/iqn.2024-01.test:vol1/tpgt_1/lun/lun_0"
    lun.mkdir(parents=True)
    (lun / "link").symlink_to(backstore)
    # Processes: one vblade, one nbd-server.
    for pid, argv in ((101, ["vblade", "0", "1", "eth0", "/dev/data/vol1"]),
                      (102, ["nbd-server", "-C", "/etc/nbd-server/config"])):
        (tmp_path / f"proc/{pid}").mkdir(parents=True)
        (tmp_path / f"proc/{pid}/cmdline").write_bytes(b"\0".join(a.encode() for a in argv))
    (tmp_path / "etc/nbd-server").mkdir(parents=True)
    (tmp_path / "etc/nbd-server/config").write_text("[vol1]\nexportname = /dev/data/vol1\n")

    facts = await role_facts("storage", PluginContext(root=tmp_path))
    assert facts["block_devices"] == [{"name": "sda", "size": 100}]
    assert facts["lvm"]["volume_groups"][0]["vg_size"] == 4000787030016
    assert facts["lvm"]["logical_volumes"][0]["lv_path"] == "/dev/data/vol1"
    assert facts["iscsi"] == {"available": True, "targets": [
        {"iqn": "iqn.2024-01.test:vol1",
         "luns": [{"tpg": "tpgt_1", "lun": "lun_0", "backing": "/dev/data/vol1"}]}]}
    assert facts["aoe"]["exports"] == [{"shelf": 0, "slot": 1, "interface": "eth0",
                                        "path": "/dev/data/vol1"}]
    assert facts["nbd"] == {"running": True,
                            "exports": [{"name": "vol1", "path": "/dev/data/vol1"}]}


async def test_storage_plugin_without_any_tool(monkeypatch, tmp_path):
    fake_tools(monkeypatch, storage, {})
    facts = await role_facts("storage", PluginContext(root=tmp_path))
    assert facts["available"] is True
    assert facts["lvm"] == {"available": False, "reason": "vgs is not installed"}
    assert facts["block_devices"]["available"] is False
    assert facts["iscsi"]["available"] is False
    assert facts["aoe"] == {"exports": []}
    assert facts["nbd"] == {"running": False, "exports": []}
