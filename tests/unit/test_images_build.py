"""images/build.py: recipes, host apt mirrors, the manifest the config server reads."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("images_build", REPO / "images" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["images_build"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("images_build", None)


@pytest.mark.parametrize("role", ["dom0", "storage"])
def test_recipes_name_existing_elements(build, role):
    recipe = build.load_recipe(REPO / "images" / f"{role}.toml")
    assert recipe.name == role
    dib = pytest.importorskip("diskimage_builder")
    known = {p.name for p in (REPO / "elements").iterdir()}
    known |= {p.name for p in (Path(dib.__file__).parent / "elements").iterdir()}
    assert recipe.elements, f"{role}: no elements"
    assert set(recipe.elements) <= known, set(recipe.elements) - known
    assert "netboot-live" in recipe.elements
    assert "netboot-agent" in recipe.elements
    assert ("xen-dom0" in recipe.elements) == (role == "dom0")


def test_recipe_rejects_bad_elements(build, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\nelements = "netboot-live"\n')
    with pytest.raises(build.BuildError, match="elements"):
        build.load_recipe(path)


def test_host_sources_deb822_and_one_line(build, tmp_path):
    sources_dir = tmp_path / "sources.list.d"
    sources_dir.mkdir()
    (sources_dir / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    one_line = tmp_path / "sources.list"
    one_line.write_text("deb [arch=amd64] http://old.example/debian bookworm main\n"
                        "# deb http://commented.example/debian bookworm main\n")
    pairs = build.host_apt_sources(one_line, sources_dir)
    assert pairs == [("http://old.example/debian", "bookworm"),
                     ("http://mirror.example/debian/", "bookworm"),
                     ("http://mirror.example/debian/", "bookworm-updates"),
                     ("http://mirror.example/debian-security", "bookworm-security")]
    assert build.mirror_variables("bookworm", pairs) == {
        "DIB_DISTRIBUTION_MIRROR": "http://old.example/debian",
        "DIB_DEBIAN_SECURITY_MIRROR": "http://mirror.example/debian-security"}
    assert build.mirror_variables("trixie", pairs) == {}


def test_environment_precedence(build, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "host_apt_sources",
                        lambda: [("http://host.example/debian", "bookworm")])
    recipe = build.Recipe(name="r", path=tmp_path / "r.toml", elements=("netboot-live",),
                          variables={"DIB_RELEASE": "bookworm", "DIB_NETBOOT_ZSTD_LEVEL": "6"})
    paths = build.BuildPaths(output=tmp_path / "out", cache=tmp_path / "cache",
                             wheelhouse=tmp_path / "wheels", agent_unit=tmp_path / "unit")
    env = build.build_environment(recipe, paths, {"PATH": "/usr/bin",
                                                  "DIB_NETBOOT_ZSTD_LEVEL": "3"})
    assert env["DIB_DISTRIBUTION_MIRROR"] == "http://host.example/debian"
    assert env["DIB_NETBOOT_ZSTD_LEVEL"] == "3"  # the caller's environment wins
    assert env["ELEMENTS_PATH"] == str(REPO / "elements")
    assert env["DIB_IMAGE_CACHE"] == str(tmp_path / "cache" / "dib")
    assert env["PATH"].endswith(":/usr/bin")
    overridden = build.build_environment(
        recipe, paths, {"PATH": "/usr/bin", "DIB_DISTRIBUTION_MIRROR": "http://mine/debian"})
    assert overridden["DIB_DISTRIBUTION_MIRROR"] == "http://mine/debian"
    # What the build made and was told (--agent-unit) wins over an inherited variable.
    inherited = build.build_environment(
        recipe, paths, {"DIB_NETBOOT_AGENT_UNIT": "/elsewhere/unit",
                        "DIB_NETBOOT_AGENT_WHEELHOUSE": "/elsewhere/wheels"})
    assert inherited["DIB_NETBOOT_AGENT_UNIT"] == str(tmp_path / "unit")
    assert inherited["DIB_NETBOOT_AGENT_WHEELHOUSE"] == str(tmp_path / "wheels")


def _fake_build_outputs(prefix: Path, with_xen: bool) -> None:
    prefix.parent.mkdir(parents=True)
    prefix.with_name(prefix.name + ".vmlinuz").write_bytes(b"kernel")
    prefix.with_name(prefix.name + ".initramfs.img").write_bytes(b"initramfs" * 100)
    prefix.with_name(prefix.name + ".packages").write_text("systemd\t252.38-1~deb12u1\n")
    prefix.with_name(prefix.name + ".versions").write_text("kernel\t6.1.0-56-amd64\n")
    if with_xen:
        prefix.with_name(prefix.name + ".xen").write_bytes(b"\x7fELF")
        prefix.with_name(prefix.name + ".xen.efi").write_bytes(b"MZ")
        prefix.with_name(prefix.name + ".xen-version").write_text("xen\t4.17.5\n")
        prefix.with_name(prefix.name + ".xen-args").write_text("dom0_mem=1024M,max:1024M\n")


@pytest.mark.parametrize("with_xen", [False, True])
def test_publish_writes_the_manifest_the_catalog_reads(build, tmp_path, with_xen):
    from configserver.images import ImageCatalog

    name = "dom0" if with_xen else "storage"
    prefix = tmp_path / "work" / name
    _fake_build_outputs(prefix, with_xen)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "netboot_agent-0.1.0-py3-none-any.whl").write_bytes(b"")
    elements = ("debian-minimal", "netboot-live") + (("xen-dom0",) if with_xen else ())
    recipe = build.Recipe(name=name, path=tmp_path / "r.toml", elements=elements)
    output = tmp_path / "images"
    (output / name).mkdir(parents=True)
    (output / name / "stale").write_text("old image")
    final = build.publish(recipe, prefix, output, 12.3, wheels)

    assert final == output / name
    assert not (final / "stale").exists()
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["name"] == name
    assert manifest["kernel"] == "vmlinuz" and manifest["initramfs"] == "initramfs.img"
    assert manifest["hypervisor"] == ("xen" if with_xen else None)
    assert manifest["hypervisor_efi"] == ("xen.efi" if with_xen else None)
    body = (final / "initramfs.img").read_bytes()
    assert manifest["files"]["initramfs.img"] == {
        "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert manifest["packages"] == {"systemd": "252.38-1~deb12u1"}
    assert manifest["versions"]["kernel"] == "6.1.0-56-amd64"
    assert manifest["versions"]["nodeagent"] == "0.1.0"
    assert manifest["elements"] == list(elements)
    assert manifest["built"].endswith("+00:00")
    if with_xen:
        assert manifest["versions"]["xen"] == "4.17.5"
        assert manifest["hypervisor_args"] == "dom0_mem=1024M,max:1024M"

    image = ImageCatalog(output).get(name)
    assert image is not None
    assert image.path("vmlinuz") == final / "vmlinuz"
    assert image.hypervisor == ("xen" if with_xen else None)
    assert image.hypervisor_efi == ("xen.efi" if with_xen else None)
    if with_xen:
        assert image.path("xen.efi") == final / "xen.efi"
        assert (final / "xen.efi").read_bytes() == b"MZ"
    assert sorted(p.name for p in output.iterdir()) == [name]


def test_publish_refuses_a_dom0_without_hypervisor(build, tmp_path):
    prefix = tmp_path / "work" / "dom0"
    _fake_build_outputs(prefix, with_xen=False)
    recipe = build.Recipe(name="dom0", path=tmp_path / "r.toml", elements=("xen-dom0",))
    with pytest.raises(build.BuildError, match="hypervisor"):
        build.publish(recipe, prefix, tmp_path / "images", 1.0, tmp_path)


def test_publish_refuses_a_dom0_without_xen_efi(build, tmp_path):
    prefix = tmp_path / "work" / "dom0"
    _fake_build_outputs(prefix, with_xen=True)
    prefix.with_name(prefix.name + ".xen.efi").unlink()
    recipe = build.Recipe(name="dom0", path=tmp_path / "r.toml", elements=("xen-dom0",))
    with pytest.raises(build.BuildError, match=r"xen\.efi"):
        build.publish(recipe, prefix, tmp_path / "images", 1.0, tmp_path)


def test_agent_wheel_source_holds_the_agent_alone(build, tmp_path):
    staged = build.stage_agent_source(tmp_path / "agent-src")
    top = sorted(p.name for p in staged.iterdir())
    assert top == ["netbootmac", "nodeagent", "pyproject.toml"]
    assert (staged / "nodeagent" / "cli.py").is_file()
    assert not list(staged.rglob("__pycache__"))
    # Staging twice replaces the old tree (no stale module survives).
    (staged / "nodeagent" / "stale.py").write_text("")
    build.stage_agent_source(staged)
    assert not (staged / "nodeagent" / "stale.py").exists()


def test_agent_wheel_depends_on_what_the_agent_extra_names(build):
    agent = tomllib.loads(build.AGENT_PROJECT.read_text())["project"]
    top = tomllib.loads((build.REPO / "pyproject.toml").read_text())["project"]
    assert agent["dependencies"] == top["optional-dependencies"]["agent"]
    assert agent["scripts"] == {"nodeagent": top["scripts"]["nodeagent"]}
