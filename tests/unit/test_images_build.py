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
    sys.path.insert(0, str(REPO / "images"))  # build.py imports dibrun.py beside it
    spec = importlib.util.spec_from_file_location("images_build", REPO / "images" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["images_build"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("images_build", None)
    sys.path.remove(str(REPO / "images"))


@pytest.mark.parametrize("role", ["dom0", "storage", "guest"])
def test_recipes_name_existing_elements(build, role):
    recipe = build.load_recipe(REPO / "images" / f"{role}.toml")
    assert recipe.name == role
    dib = pytest.importorskip("diskimage_builder")
    known = {p.name for p in (REPO / "elements").iterdir()}
    known |= {p.name for p in (Path(dib.__file__).parent / "elements").iterdir()}
    assert recipe.elements, f"{role}: no elements"
    assert set(recipe.elements) <= known, set(recipe.elements) - known
    assert ("netboot-live" in recipe.elements) == (role != "guest")
    assert ("netboot-agent" in recipe.elements) == (role != "guest")
    assert ("netboot-guest" in recipe.elements) == (role == "guest")
    assert ("xen-dom0" in recipe.elements) == (role == "dom0")
    assert recipe.output == ("rootfs" if role == "guest" else "netboot")


def test_every_recipe_is_built_by_make(build):
    recipes = sorted(p.stem for p in (REPO / "images").glob("*.toml"))
    assert recipes, "no recipes in images/"
    makefile = (REPO / "mk" / "images.mk").read_text()
    roles = next(line for line in makefile.splitlines() if line.startswith("IMAGE_ROLES"))
    assert sorted(roles.split(":=")[1].split()) == recipes
    for role in recipes:
        assert f"image-{role}: $(IMAGES_DIR)/{role}/manifest.json" in makefile


def test_guest_recipe_makes_a_small_partitionless_ext4(build):
    recipe = build.load_recipe(REPO / "images" / "guest.toml")
    assert 0.5 <= float(recipe.variables["DIB_IMAGE_SIZE"]) <= 0.6  # GiB: ext4 4k, < 600 MiB
    assert recipe.variables["DIB_NETBOOT_SERIAL_CONSOLE"] == "hvc0"
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(
        (REPO / "elements" / "netboot-guest" / "block-device-default.yaml").read_text())
    assert [next(iter(node)) for node in config] == ["local_loop", "mkfs"]
    mkfs = config[1]["mkfs"]
    assert mkfs["base"] == config[0]["local_loop"]["name"]  # no partition table between them
    assert (mkfs["type"], mkfs["label"], mkfs["mount"]["mount_point"]) == ("ext4", "guestroot",
                                                                           "/")
    # The root mounts by label; root=/dev/xvda is the kernel's part (kernel_args).
    assert "x-systemd.growfs" in mkfs["mount"]["fstab"]["options"]


def test_recipe_rejects_an_unknown_output(build, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\nelements = ["netboot-guest"]\noutput = "qcow2"\n')
    with pytest.raises(build.BuildError, match="output"):
        build.load_recipe(path)


@pytest.mark.parametrize("output", ["netboot", "rootfs"])
def test_disk_image_create_makes_a_raw_image_only_for_a_rootfs(build, tmp_path, monkeypatch,
                                                               output):
    commands = []
    monkeypatch.setattr(build, "run_dib",
                        lambda command, name, env, logfile: commands.append(command))
    monkeypatch.setattr(build.shutil, "which", lambda tool, path=None: f"/venv/bin/{tool}")
    recipe = build.Recipe(name="guest", path=tmp_path / "r.toml",
                          elements=("debian-minimal", "netboot-guest"), output=output)
    build.run_disk_image_create(recipe, {"PATH": "/venv/bin"}, tmp_path / "guest",
                                tmp_path / "log")
    (command,) = commands
    assert ("-t" in command) == (output == "rootfs")
    if output == "rootfs":
        assert command[command.index("-t") + 1] == "raw"
    assert command[-2:] == ["debian-minimal", "netboot-guest"]


DIB_OUTPUT = """\
2026-12-06 22:20:50.668 | Copying hooks /venv/elements/install-bin/pre-install.d/01-install-bin
2026-12-06 22:20:50.670 | Copying hooks /venv/elements/debian-minimal/environment.d/10-x.bash
2026-12-06 22:20:50.682 | Copying hooks /venv/elements/netboot-agent/install.d/70-agent-install
2026-12-06 22:20:50.690 | Copying hooks /venv/elements/netboot-live/finalise.d/90-squash
2026-12-06 22:20:51.165 | Running hooks from /tmp/dib_build.bIx/hooks/root.d
2026-12-06 22:20:51.179 | dib-run-parts Sourcing environment file /tmp/in_target.d/10-x.bash
2026-12-06 22:21:07.600 | dib-run-parts Running /tmp/in_target.d/pre-install.d/01-install-bin
2026-12-06 22:21:07.700 | dib-run-parts 01-install-bin completed
2026-12-06 22:21:09.000 | dib-run-parts Running /tmp/in_target.d/install.d/70-agent-install
"""


def test_build_progress_follows_the_hooks_of_diskimage_builder(build):
    import dibrun

    progress = dibrun.DibProgress()
    changed = [progress.feed(line) for line in DIB_OUTPUT.splitlines()]
    assert changed.count(True) == 2 and changed[-1]
    assert (progress.hooks, progress.started) == (3, 2)
    assert progress.status("dom0", 125.4) == (
        "image dom0: hook 2/3, install.d 70-agent-install (2m05s)")


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
    elements = ("debian-minimal", "netboot-live", "netboot-agent") + (
        ("xen-dom0",) if with_xen else ())
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


def _fake_rootfs_outputs(prefix: Path) -> None:
    prefix.parent.mkdir(parents=True)
    prefix.with_name(prefix.name + ".vmlinuz").write_bytes(b"kernel")
    prefix.with_name(prefix.name + ".initramfs.img").write_bytes(b"initrd" * 10)
    prefix.with_name(prefix.name + ".raw").write_bytes(b"\0" * 1024 + b"\x53\xef" * 512)
    prefix.with_name(prefix.name + ".packages").write_text("systemd\t252.39-1~deb12u2\n")
    prefix.with_name(prefix.name + ".versions").write_text("kernel\t6.1.0-56-amd64\n")
    prefix.with_name(prefix.name + ".kernel-args").write_text("root=/dev/xvda ro console=hvc0\n")


@pytest.fixture
def guest_image(build, tmp_path):
    """A published guest image (fake outputs of a rootfs build)."""
    prefix = tmp_path / "work" / "guest"
    _fake_rootfs_outputs(prefix)
    recipe = build.Recipe(name="guest", path=tmp_path / "guest.toml",
                          elements=("debian-minimal", "netboot-guest"), output="rootfs")
    # The shared wheel cache holds the agent's wheel; a guest without the agent must not
    # claim its version.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "netboot_agent-0.1.0-py3-none-any.whl").write_bytes(b"")
    return build.publish(recipe, prefix, tmp_path / "images", 30.0, wheels)


def test_publish_a_rootfs_image_names_it_in_the_manifest(guest_image, tmp_path):
    from configserver.images import ImageCatalog

    assert sorted(p.name for p in guest_image.iterdir()) == [
        "initramfs.img", "manifest.json", "rootfs.img", "vmlinuz"]
    manifest = json.loads((guest_image / "manifest.json").read_text())
    assert manifest["rootfs"] == "rootfs.img"
    assert (manifest["kernel"], manifest["initramfs"]) == ("vmlinuz", "initramfs.img")
    assert manifest["hypervisor"] is None and manifest["hypervisor_efi"] is None
    assert manifest["kernel_args"] == "root=/dev/xvda ro console=hvc0"
    assert sorted(manifest["files"]) == ["initramfs.img", "rootfs.img", "vmlinuz"]
    body = (guest_image / "rootfs.img").read_bytes()
    assert manifest["files"]["rootfs.img"] == {
        "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert "nodeagent" not in manifest["versions"]  # no agent in a guest
    assert manifest["versions"]["kernel"] == "6.1.0-56-amd64"
    assert manifest["elements"] == ["debian-minimal", "netboot-guest"]
    # What the build left behind is gone: only the published directory remains.
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["guest"]

    image = ImageCatalog(tmp_path / "images").get("guest")
    assert image is not None and image.rootfs == "rootfs.img"
    assert image.path("rootfs.img") == guest_image / "rootfs.img"
    assert image.to_json()["rootfs"] == "rootfs.img"


async def test_the_config_server_serves_the_published_rootfs(guest_image, tmp_path,
                                                             aiohttp_client):
    from configserver.config import HttpConfig, ServerConfig
    from configserver.http.app import create_app
    from configserver.pki import CertificateAuthority
    from configserver.registry.sqlite import SqliteRegistry

    registry = SqliteRegistry(tmp_path / "registry.sqlite")
    try:
        config = ServerConfig(state_dir=tmp_path, images_dir=guest_image.parent,
                              http=HttpConfig(port=0))
        authority = CertificateAuthority.load_or_create(tmp_path / "pki")
        client = await aiohttp_client(create_app(config, registry, authority))
        resp = await client.get("/images/guest/rootfs.img")
        assert resp.status == 200
        assert await resp.read() == (guest_image / "rootfs.img").read_bytes()
        assert (await client.get("/images/guest/manifest.json")).status == 404
    finally:
        registry.close()


def test_publish_refuses_a_rootfs_build_without_its_file_system(build, tmp_path):
    prefix = tmp_path / "work" / "guest"
    _fake_rootfs_outputs(prefix)
    prefix.with_name(prefix.name + ".raw").unlink()
    recipe = build.Recipe(name="guest", path=tmp_path / "r.toml",
                          elements=("netboot-guest",), output="rootfs")
    with pytest.raises(build.BuildError, match=r"rootfs\.img.*netboot-guest"):
        build.publish(recipe, prefix, tmp_path / "images", 1.0, tmp_path)
    assert not (tmp_path / "images" / "guest").exists()


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


def test_the_build_log_is_followed_line_by_line_as_it_grows(build, tmp_path):
    import dibrun

    log = tmp_path / "dom0.log"
    with dibrun._Follow(log) as follow:
        assert follow.lines() == []  # not there yet
        log.write_text("one\ntw")
        assert follow.lines() == ["one"]
        with log.open("a") as more:
            more.write("o\nthree\n")
        assert follow.lines() == ["two", "three"]
        assert follow.lines() == []


def test_a_hypervisor_built_from_source_is_passed_with_the_version_tools_are_pinned_to(
        build, tmp_path, monkeypatch):
    """The dom0 recipe names build/xen/shadow (images/xenshadow.py): the element gets its
    absolute path and the version its toolstack is pinned to; a missing build is a clear
    error; "" (Debian's hypervisor) passes nothing."""
    monkeypatch.setattr(build, "host_apt_sources", lambda: [])
    built = tmp_path / "xen"
    built.mkdir()
    recipe = build.Recipe(name="dom0", path=tmp_path / "dom0.toml", elements=("xen-dom0",),
                          variables={"DIB_XEN_HYPERVISOR_DIR": str(built)})
    paths = build.BuildPaths(output=tmp_path / "out", cache=tmp_path / "cache",
                             wheelhouse=tmp_path / "wheels", agent_unit=tmp_path / "unit")
    with pytest.raises(build.BuildError, match="make xen-shadow"):
        build.build_environment(recipe, paths, {"PATH": "/usr/bin"})
    (built / "version").write_text("4.17.5+72-g01140da4e8-1\n")
    with pytest.raises(build.BuildError, match=r"lacks xen\.gz, xen\.efi"):
        build.build_environment(recipe, paths, {"PATH": "/usr/bin"})
    (built / "xen.gz").write_bytes(b"x")
    (built / "xen.efi").write_bytes(b"x")
    env = build.build_environment(recipe, paths, {"PATH": "/usr/bin"})
    assert env["DIB_XEN_HYPERVISOR_DIR"] == str(built)
    assert env["DIB_XEN_PIN_VERSION"] == "4.17.5+72-g01140da4e8-1"
    debian = build.build_environment(recipe, paths, {"PATH": "/usr/bin",
                                                     "DIB_XEN_HYPERVISOR_DIR": ""})
    assert not debian.get("DIB_XEN_HYPERVISOR_DIR") and "DIB_XEN_PIN_VERSION" not in debian
    shipped = tomllib.loads((REPO / "images" / "dom0.toml").read_text())
    assert shipped["variables"]["DIB_XEN_HYPERVISOR_DIR"] == "build/xen/shadow"


def test_the_xen_source_comes_from_the_hosts_own_mirrors(build):
    sys.path.insert(0, str(REPO / "images"))
    try:
        spec = importlib.util.spec_from_file_location("xenshadow", REPO / "images" /
                                                      "xenshadow.py")
        xenshadow = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(xenshadow)
    finally:
        sys.path.remove(str(REPO / "images"))
    lines = xenshadow.source_lines("bookworm", [
        ("http://deb.example/debian", "bookworm"), ("http://deb.example/debian", "bookworm"),
        ("http://deb.example/debian", "bookworm-updates"),
        ("http://sec.example/debian-security", "bookworm-security"),
        ("http://deb.example/debian", "trixie")])
    assert lines == ["deb-src http://deb.example/debian bookworm main",
                     "deb-src http://deb.example/debian bookworm-updates main",
                     "deb-src http://sec.example/debian-security bookworm-security main"]
    assert xenshadow.CONFIG_ADDED == ("CONFIG_SHADOW_PAGING=y",)
