"""The volume CLI's text (pure) and the images' root file systems for volumes."""

from __future__ import annotations

import json

from configserver.cli.volumes import volume_details, volume_table
from configserver.images import ImageCatalog

VOLUME = {
    "id": "0123456789abcdef", "name": "db", "size": 2 << 30, "image": None, "tenant": None,
    "state": "ready", "redundancy": "resyncing", "initialized": True, "created": 1.0,
    "updated": 2.0, "error": None,
    "legs": [{"node": "52:54:00:00:05:01", "hostname": "sn1", "lv": "nb-0123456789abcdef",
              "target": "iqn.x", "portal": "198.18.0.51:3260", "state": "exported",
              "member": "active", "error": None},
             {"node": "52:54:00:00:05:02", "hostname": None, "lv": "nb-0123456789abcdef",
              "target": "iqn.x", "portal": None, "state": "exported", "member": "rebuilding",
              "error": None}],
    "attached": [{"node": "52:54:00:00:d0:01", "hostname": "dom0-1", "state": "resyncing",
                  "device": "/dev/md/nb-0123456789abcdef",
                  "sync": {"action": "recover", "percent": 42.5}, "error": None}],
    "timeline": [{"time": 1.0, "stage": "created", "detail": {"size": 2 << 30}}],
}


def test_volume_details_show_legs_attachments_sync_and_timeline():
    text = volume_details(VOLUME)
    assert "Size:         2 GiB" in text
    assert "sn1 (52:54:00:00:05:01) 198.18.0.51:3260 exported" in text
    assert "dom0-1 (52:54:00:00:d0:01) resyncing /dev/md/nb-0123456789abcdef, recover 42.5%" \
        in text
    assert "Timeline:" in text and "created" in text
    evil = {**VOLUME, "attached": [], "error": "x\x1b[2Jy", "state": "error"}
    shown = volume_details(evil)
    assert "\x1b" not in shown and "no dom0 may reach it" in shown


def test_volume_table():
    assert volume_table([]) == "no volumes"
    assert "dom0-1" in volume_table([VOLUME]).splitlines()[1]


def test_images_name_their_root_file_system(tmp_path):
    by_manifest = tmp_path / "guest"
    by_manifest.mkdir()
    (by_manifest / "manifest.json").write_text(json.dumps(
        {"kernel": "vmlinuz", "initramfs": "initrd", "rootfs": "root.ext4", "files": {}}))
    by_convention = tmp_path / "plain"
    by_convention.mkdir()
    for name in ("vmlinuz", "initramfs.img", "rootfs.img"):
        (by_convention / name).write_bytes(b"x")
    catalog = ImageCatalog(tmp_path)
    guest = catalog.get("guest")
    assert guest.rootfs == "root.ext4" and guest.path("root.ext4") is not None
    assert catalog.get("plain").rootfs == "rootfs.img"
    assert catalog.get("plain").to_json()["rootfs"] == "rootfs.img"
