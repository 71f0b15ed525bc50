"""Resolving requested names inside the served roots, and shared file descriptors."""

from __future__ import annotations

import os

import pytest

from configserver.tftp.codec import ErrorCode
from configserver.tftp.errors import FileRefused
from configserver.tftp.files import OpenFiles, ServedRoots


@pytest.fixture
def served(tmp_path):
    ipxe = tmp_path / "ipxe"
    images = tmp_path / "images"
    outside = tmp_path / "secret"
    for directory in (ipxe, images / "storage", outside):
        directory.mkdir(parents=True)
    (ipxe / "undionly.kpxe").write_bytes(b"pxe")
    (images / "storage" / "vmlinuz").write_bytes(b"kernel")
    (outside / "passwd").write_text("root:x:0:0")
    (ipxe / "inside-link").symlink_to("undionly.kpxe")
    (ipxe / "outside-link").symlink_to(outside / "passwd")
    (ipxe / "dir-link").symlink_to(outside)
    (ipxe / "subdir").mkdir()
    os.mkfifo(ipxe / "fifo")
    roots = ServedRoots({"": ipxe, "images/": images})
    return roots, tmp_path


def test_names_resolve_by_longest_prefix(served):
    roots, base = served
    assert roots.resolve("undionly.kpxe") == base / "ipxe" / "undionly.kpxe"
    assert roots.resolve("images/storage/vmlinuz") == base / "images" / "storage" / "vmlinuz"


def test_symlink_inside_the_root_is_followed(served):
    roots, base = served
    assert roots.resolve("inside-link") == base / "ipxe" / "undionly.kpxe"


@pytest.mark.parametrize("name", [
    "../secret/passwd", "images/../../secret/passwd", "/etc/passwd", "..\\secret\\passwd",
    "undionly.kpxe\0.txt", "a//b", "./undionly.kpxe", "images/storage/../../ipxe",
    "outside-link", "dir-link/passwd", "x" * 2000, "bad\x01name",
])
def test_escapes_are_refused_as_access_violations(served, name):
    roots, _ = served
    with pytest.raises(FileRefused) as refused:
        roots.resolve(name)
    assert refused.value.tftp_code == ErrorCode.ACCESS_VIOLATION


def test_missing_file_is_not_found(served):
    roots, _ = served
    files = OpenFiles()
    with pytest.raises(FileRefused) as refused:
        files.acquire(roots.resolve("nope.efi"))
    assert refused.value.tftp_code == ErrorCode.FILE_NOT_FOUND


@pytest.mark.parametrize("name", ["subdir", "fifo"])
def test_only_regular_files_are_served(served, name):
    roots, _ = served
    with pytest.raises(FileRefused) as refused:
        OpenFiles().acquire(roots.resolve(name))
    assert refused.value.tftp_code == ErrorCode.ACCESS_VIOLATION


def test_device_files_are_refused(tmp_path):
    (tmp_path / "null").symlink_to("/dev/null")
    roots = ServedRoots({"": tmp_path})
    with pytest.raises(FileRefused):
        OpenFiles().acquire(roots.resolve("null"))


def test_concurrent_transfers_share_one_descriptor(served):
    roots, _ = served
    files = OpenFiles()
    path = roots.resolve("undionly.kpxe")
    first, second = files.acquire(path), files.acquire(path)
    assert first is second and len(files) == 1 and first.users == 2
    assert first.read(1, 2) == b"xe"
    files.release(first)
    assert len(files) == 1
    files.release(second)
    assert len(files) == 0
    with pytest.raises(OSError):
        os.fstat(first.fd)


def test_a_name_mapped_to_a_file_is_served_from_outside_the_roots(served):
    """How Debian's ipxe.efi -> /boot/ipxe.efi gets served: named explicitly by the caller."""
    _, base = served
    roots = ServedRoots({"": base / "ipxe", "outside-link": base / "ipxe" / "outside-link"})
    assert roots.resolve("outside-link") == base / "secret" / "passwd"
    with pytest.raises(FileRefused):
        roots.resolve("dir-link/passwd")          # only the exact name is trusted
    assert roots.resolve("undionly.kpxe") == base / "ipxe" / "undionly.kpxe"


def test_a_catalog_serves_only_the_files_it_names(tmp_path):
    image = tmp_path / "images" / "storage"
    image.mkdir(parents=True)
    (image / "vmlinuz").write_bytes(b"kernel")
    (image / "build.log").write_text("not served")
    listed = {"storage/vmlinuz": image / "vmlinuz"}
    roots = ServedRoots({"images/": listed.get})
    assert roots.resolve("images/storage/vmlinuz") == image / "vmlinuz"
    for name in ("images/storage/build.log", "images/nosuch/vmlinuz"):
        with pytest.raises(FileRefused) as info:
            roots.resolve(name)
        assert info.value.tftp_code == ErrorCode.FILE_NOT_FOUND
    with pytest.raises(FileRefused) as info:
        roots.resolve("images/../storage/vmlinuz")
    assert info.value.tftp_code == ErrorCode.ACCESS_VIOLATION
