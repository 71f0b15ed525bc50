"""The guests' device-mapper disks against a fake dmsetup and losetup: the placeholder's
table (error, and a tail on the scratch loop device for the write-back cache blkback reads),
its switch to linear over the array, and a linear table left alone."""

from __future__ import annotations

import pytest

from nodeagent.errors import MdError
from nodeagent.roles import blockmap


class FakeTools:
    def __init__(self, monkeypatch, tmp_path):
        self.tables: dict[str, str] = {}
        self.loops: dict[str, str] = {}
        self.calls: list[list[str]] = []
        self.mapper = tmp_path / "mapper"
        self.mapper.mkdir()
        monkeypatch.setattr(blockmap, "run_tool", self.run)
        monkeypatch.setattr(blockmap, "path", lambda md_name: str(
            self.mapper / blockmap.name_for(md_name)))

    async def run(self, argv, timeout):
        self.calls.append(argv)
        if argv[:2] == ["losetup", "--associated"]:
            return f"{self.loops[argv[2]]}: []: ({argv[2]})\n" if argv[2] in self.loops else ""
        if argv[:3] == ["losetup", "--find", "--show"]:
            self.loops[argv[3]] = f"/dev/loop{len(self.loops)}"
            return self.loops[argv[3]] + "\n"
        if argv[:2] == ["blockdev", "--getsz"]:
            return "2097152\n"
        command, name = argv[1], argv[2] if len(argv) > 2 else ""
        if command == "create":
            self.tables[name] = argv[4]
            (self.mapper / name).touch()
        elif command == "load":
            self.tables[name + ".inactive"] = argv[4]
        elif command == "resume":
            name = argv[-1]
            self.tables[name] = self.tables.pop(name + ".inactive")
        elif command == "table":
            return self.tables[name] + "\n"
        return ""


async def test_a_placeholder_has_a_cached_tail_and_is_switched_to_linear(monkeypatch,
                                                                          tmp_path):
    fake = FakeTools(monkeypatch, tmp_path)
    scratch = tmp_path / "scratch" / "placeholder.img"
    await blockmap.placeholder("nb-0123", 1 << 30, scratch)
    assert fake.tables["nbdisk-0123"] == ("0 2097144 error\n"
                                          "2097144 8 linear /dev/loop0 0")
    assert scratch.stat().st_size == 4096
    await blockmap.placeholder("nb-4567", 1 << 30, scratch)  # the loop device is shared
    assert [c for c in fake.calls if c[:2] == ["losetup", "--find"]] == [
        ["losetup", "--find", "--show", str(scratch)]]
    await blockmap.linear("nb-0123")
    assert fake.tables["nbdisk-0123"] == "0 2097152 linear /dev/md/nb-0123 0"
    assert ["dmsetup", "resume", "--noudevsync", "nbdisk-0123"] in fake.calls
    fake.calls.clear()
    await blockmap.linear("nb-0123")  # linear already: nothing loaded again
    assert not [c for c in fake.calls if c[1] in ("load", "resume")]


async def test_a_placeholder_of_another_size_is_not_switched(monkeypatch, tmp_path):
    fake = FakeTools(monkeypatch, tmp_path)
    await blockmap.placeholder("nb-0123", 2 << 30, tmp_path / "p.img")
    with pytest.raises(MdError, match="4194304 sectors, the array 2097152"):
        await blockmap.linear("nb-0123")
    assert fake.tables["nbdisk-0123"].startswith("0 4194296 error")
