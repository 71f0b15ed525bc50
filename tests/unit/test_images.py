"""The image catalog: manifests, the naming convention, what is listed and what is served."""

from __future__ import annotations

import json
import os

import pytest

from configserver.images import ImageCatalog


def manifest(directory, **fields) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps(fields))


@pytest.fixture
def root(tmp_path):
    return tmp_path / "images"


def test_manifest_names_what_is_served(root):
    manifest(root / "dom0", kernel="vmlinuz", initramfs="initramfs.img", hypervisor="xen",
             files={"vmlinuz": {}, "initramfs.img": {}, "extra.cfg": {}, "../up": {}})
    image = ImageCatalog(root).get("dom0")
    # The boot files count as shipped even when "files" leaves them out; bad names never do.
    assert image.files == {"vmlinuz", "initramfs.img", "xen", "extra.cfg"}
    assert image.path("extra.cfg") == root / "dom0" / "extra.cfg"
    assert image.path("manifest.json") is None and image.path("../up") is None


def test_a_manifest_may_list_its_files(root):
    manifest(root / "storage", kernel="vmlinuz", initramfs="initramfs.img",
             files=["vmlinuz", "initramfs.img", "notes.txt"])
    image = ImageCatalog(root).get("storage")
    assert image.hypervisor is None
    assert image.files == {"vmlinuz", "initramfs.img", "notes.txt"}
    assert image.to_json()["files"] == ["initramfs.img", "notes.txt", "vmlinuz"]


@pytest.mark.parametrize("fields", [
    {"kernel": 5, "initramfs": "initramfs.img"},
    {"kernel": "vmlinuz", "initramfs": ["initramfs.img"]},
    {"kernel": "vmlinuz", "initramfs": "initramfs.img", "hypervisor": {"xen": 1}},
    {"kernel": "vmlinuz"},
])
def test_a_manifest_with_bad_boot_files_hides_its_image(root, fields):
    manifest(root / "bad", **fields)
    assert ImageCatalog(root).get("bad") is None


def test_without_a_manifest_the_convention_needs_kernel_and_initramfs(root):
    (root / "kernel-only").mkdir(parents=True)
    (root / "kernel-only" / "vmlinuz").write_bytes(b"K")
    (root / "initrd-only").mkdir()
    (root / "initrd-only" / "initrd.img").write_bytes(b"I")
    (root / "xen").mkdir()
    for name in ("vmlinuz", "initrd.img", "xen.gz", "other"):
        (root / "xen" / name).write_bytes(name.encode())
    catalog = ImageCatalog(root)
    assert catalog.get("kernel-only") is None and catalog.get("initrd-only") is None
    image = catalog.get("xen")
    assert (image.kernel, image.initramfs, image.hypervisor) == ("vmlinuz", "initrd.img",
                                                                 "xen.gz")
    assert image.files == {"vmlinuz", "initrd.img", "xen.gz"}


def test_list_holds_the_readable_image_directories_only(root):
    manifest(root / "dom0", kernel="vmlinuz", initramfs="initramfs.img", hypervisor="xen")
    manifest(root / "storage", kernel="vmlinuz", initramfs="initramfs.img")
    manifest(root / "broken", kernel="vmlinuz")
    (root / "README").write_text("not an image")
    catalog = ImageCatalog(root)
    assert [image.name for image in catalog.list()] == ["dom0", "storage"]
    assert [image.to_json()["hypervisor"] for image in catalog.list()] == ["xen", None]
    assert ImageCatalog(root / "missing").list() == []


def test_manifests_are_reread_only_when_they_change(root):
    manifest(root / "dom0", kernel="vmlinuz", initramfs="initramfs.img")
    catalog = ImageCatalog(root)
    first = catalog.get("dom0")
    assert catalog.get("dom0") is first  # cached, not parsed again
    path = root / "dom0" / "manifest.json"
    stamp = path.stat().st_mtime_ns
    manifest(root / "dom0", kernel="vmlinuz-new", initramfs="initramfs.img")
    os.utime(path, ns=(stamp, stamp))
    assert catalog.get("dom0") is first  # same modification time: still the cached one
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    assert catalog.get("dom0").kernel == "vmlinuz-new"


def test_names_that_are_not_image_names_are_not_looked_up(root):
    manifest(root / "dom0", kernel="vmlinuz", initramfs="initramfs.img")
    catalog = ImageCatalog(root)
    for name in ("", ".", "..", "../images/dom0", "dom0/", ".hidden", "x" * 129):
        assert catalog.get(name) is None, name
