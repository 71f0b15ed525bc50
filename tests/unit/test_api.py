"""REST API and HTTP boot through aiohttp's test client (in-process server on loopback)."""

import json
import logging

import pytest
from pkitest import TENANT, tls_client

from configserver.config import HttpConfig, ServerConfig
from configserver.http import boot
from configserver.http.app import create_app
from configserver.http.appkeys import AUTHORITY
from configserver.pki import Identity
from configserver.registry.sqlite import SqliteRegistry

AUTH: dict[str, str] = {}  # the API client is an admin by its certificate
MAC = "52:54:00:aa:bb:01"


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    storage = root / "storage"
    storage.mkdir(parents=True)
    (storage / "vmlinuz").write_bytes(b"K" * 1000)
    (storage / "initramfs.img").write_bytes(bytes(range(256)) * 40)
    (storage / "secret").write_text("not listed")
    dom0 = root / "dom0"
    dom0.mkdir()
    for name in ("xen", "xen.efi", "vmlinuz", "initramfs.img"):
        (dom0 / name).write_bytes(name.encode())
    (dom0 / "manifest.json").write_text(json.dumps({
        "name": "dom0", "kernel": "vmlinuz", "initramfs": "initramfs.img", "hypervisor": "xen",
        "hypervisor_efi": "xen.efi",
        "files": {"xen": {}, "xen.efi": {}, "vmlinuz": {}, "initramfs.img": {}}}))
    (tmp_path / "outside").write_text("outside")
    return root


@pytest.fixture
def registry(tmp_path):
    reg = SqliteRegistry(tmp_path / "state" / "registry.sqlite")
    yield reg
    reg.close()


@pytest.fixture
async def client(serve_split, pki, tmp_path, images, registry):
    config = ServerConfig(state_dir=tmp_path / "state", images_dir=images,
                          ipxe_dir=tmp_path / "ipxe", http=HttpConfig(port=0))
    (tmp_path / "ipxe").mkdir()
    (tmp_path / "ipxe" / "ipxe.efi").write_bytes(b"MZ-ipxe")
    return await serve_split(create_app(config, registry, pki.authority))


async def add(client, **body):
    body.setdefault("mac", MAC)
    body.setdefault("role", "storage")
    return await client.post("/api/v1/nodes", json=body, headers=AUTH)


ADMIN_ROUTES = [("GET", "/api/v1/nodes"), ("POST", "/api/v1/nodes"),
                ("GET", f"/api/v1/nodes/{MAC}"), ("GET", f"/api/v1/nodes/{MAC}/events"),
                ("GET", f"/api/v1/nodes/{MAC}/inventory"), ("GET", "/api/v1/roles"),
                ("POST", "/api/v1/roles"), ("GET", "/api/v1/settings"),
                ("PATCH", "/api/v1/settings"), ("POST", "/api/v1/apply"),
                ("GET", "/api/v1/export"), ("GET", "/api/v1/images"),
                ("GET", "/api/v1/users"), ("POST", "/api/v1/users/x/revoke")]


async def test_every_api_route_needs_an_admin_certificate(client, aiohttp_client, pki):
    nobody = await tls_client(aiohttp_client, client.server, pki, None)
    tenant = await tls_client(aiohttp_client, client.server, pki, TENANT)
    node = await tls_client(aiohttp_client, client.server, pki,
                            Identity("node", MAC, boot_id="b1"))
    for method, path in ADMIN_ROUTES:
        # The admin bearer token is gone: a header is no credential.
        resp = await nobody.request(method, path, json={},
                                    headers={"Authorization": "Bearer x"})
        assert resp.status == 401 and (await resp.json())["code"] == "unauthorized", path
        for caller in (tenant, node):
            resp = await caller.request(method, path, json={})
            assert resp.status == 403 and (await resp.json())["code"] == "forbidden", path
    assert (await client.get("/api/v1/nodes")).status == 200
    assert (await nobody.get("/api/v1/health")).status == 200
    assert (await nobody.get("/api/v1/whoami")).status == 401
    me = await (await tenant.get("/api/v1/whoami")).json()
    assert me == {"kind": "tenant", "name": "tess", "tenant": "acme", "boot_id": None,
                  "channel": "https"}


async def test_plain_http_serves_no_api(client):
    for path in ("/api/v1/nodes", "/api/v1/health", "/api/v1/whoami", "/api/v1/users"):
        resp = await client.plain.get(path)
        body = await resp.json()
        assert resp.status == 403 and body["code"] == "https_required", path
        assert f"{client.server.scheme}://" in body["message"] or "https://" in body["message"]
    ca = await (await client.plain.get("/boot/ca.pem")).read()
    assert ca == client.server.app[AUTHORITY].certificate_pem


async def test_node_crud_and_errors_are_json(client):
    resp = await add(client, mac="52-54-00-AA-BB-01", hostname="sn1", ip="198.18.0.21")
    assert resp.status == 201
    assert (await resp.json())["mac"] == MAC
    cases = [
        ({"mac": MAC}, 409, "duplicate_mac"),
        ({"mac": "52:54:00:aa:bb:02", "ip": "198.18.0.21"}, 409, "duplicate_ip"),
        ({"mac": "52:54:00:aa:bb:02", "role": "gpu"}, 422, "unknown_role"),
        ({"mac": "nonsense"}, 400, "invalid_mac"),
        ({"mac": "52:54:00:aa:bb:02", "hostname": "a_b"}, 400, "invalid_hostname"),
        ({"mac": "52:54:00:aa:bb:02", "colour": "red"}, 400, "invalid_request"),
        ({"mac": "52:54:00:aa:bb:02", "tags": "x"}, 400, "invalid_request"),
    ]
    for body, status, code in cases:
        resp = await add(client, **body)
        data = await resp.json()
        assert (resp.status, data["code"]) == (status, code), body
        assert data["status"] == status and data["message"]
    resp = await client.post("/api/v1/nodes", data=b"{not json", headers=AUTH)
    assert (resp.status, (await resp.json())["code"]) == (400, "invalid_json")
    nodes = (await (await client.get("/api/v1/nodes")).json())["nodes"]
    assert [n["mac"] for n in nodes] == [MAC]

    resp = await client.patch(f"/api/v1/nodes/{MAC}", json={"hostname": "sn9"}, headers=AUTH)
    assert (await resp.json())["hostname"] == "sn9"
    shown = await (await client.get("/api/v1/nodes/525400aabb01")).json()
    assert shown["hostname"] == "sn9"
    assert [e["stage"] for e in shown["events"]] == ["registered", "updated"]
    assert (await client.delete(f"/api/v1/nodes/{MAC}", headers=AUTH)).status == 200
    resp = await client.get(f"/api/v1/nodes/{MAC}")
    assert (resp.status, (await resp.json())["code"]) == (404, "not_found")


async def test_changes_take_effect_on_the_next_request(client):
    await add(client, hostname="sn1")
    script = await (await client.get(f"/boot/{MAC}.ipxe")).text()
    assert "netboot.role=storage" in script and "/images/storage/vmlinuz" in script
    await client.patch(f"/api/v1/nodes/{MAC}", json={"role": "dom0"}, headers=AUTH)
    script = await (await client.get(f"/boot/{MAC}.ipxe")).text()
    assert "netboot.role=dom0" in script
    assert "kernel http://" in script and "/images/dom0/xen " in script
    assert script.count("module ") == 2


async def test_boot_fetches_land_in_the_timeline(client, registry):
    await add(client)
    await client.get(f"/boot/{MAC}.ipxe")
    for name in ("vmlinuz", "initramfs.img"):
        resp = await client.get(f"/images/storage/{name}?mac={MAC}")
        assert resp.status == 200
    data = await (await client.get(f"/api/v1/nodes/{MAC}/events")).json()
    assert [t["stage"] for t in data["timeline"]] == ["script", "kernel", "initramfs"]
    # Anyone can fetch these files: fetching them moves no node's state.
    assert registry.lookup(MAC).state == "registered"


async def test_each_fetched_file_is_recorded_as_its_stage(client, registry):
    await add(client, role="dom0")
    for name in ("xen", "vmlinuz", "initramfs.img"):
        assert (await client.get(f"/images/dom0/{name}?mac={MAC}")).status == 200
    resp = await client.get(f"/images/dom0/vmlinuz?mac={MAC}", headers={"Range": "bytes=0-1"})
    assert resp.status == 206
    assert (await client.get(f"/ipxe/ipxe.efi?mac={MAC}")).status == 200
    events = [(e.stage, e.detail) for e in registry.events(MAC)][1:]
    assert [stage for stage, _ in events] == ["http.hypervisor", "http.kernel", "http.initramfs",
                                              "http.kernel", "http.ipxe"]
    assert [detail.get("range") for _, detail in events[:4]] == [None, None, None, "bytes=0-1"]
    assert events[0][1]["file"] == "xen" and events[4][1] == {"file": "ipxe.efi"}


async def test_fetches_without_a_mac_are_recorded_for_the_address_holder(client, registry):
    await add(client, ip="127.0.0.1")  # the test client's address
    assert (await client.get("/images/storage/vmlinuz")).status == 200
    assert [e.stage for e in registry.events(MAC)] == ["registered", "http.kernel"]


async def test_a_node_that_cannot_boot_is_told_why_and_logged(client, registry, images,
                                                             caplog):
    await add(client, role="dom0")
    (images / "dom0" / "manifest.json").unlink()
    (images / "dom0" / "vmlinuz").unlink()
    with caplog.at_level(logging.WARNING, logger="configserver.http.boot"):
        script = await (await client.get(f"/boot/{MAC}.ipxe")).text()
    assert "dom0" in script and "/images/" not in script
    assert [r.getMessage() for r in caplog.records if MAC in r.getMessage()], caplog.text
    event = registry.events(MAC)[-1]
    assert (event.stage, event.detail["result"]) == ("http.script", "wait")
    assert event.detail["message"] and event.detail["message"] in script
    assert registry.lookup(MAC).state == "registered"  # waiting is not booting


async def test_a_booting_node_gets_no_message_in_its_event(client, registry):
    await add(client)
    await client.get(f"/boot/{MAC}.ipxe")
    [event] = [e for e in registry.events(MAC) if e.stage == "http.script"]
    assert event.detail["result"] == "linux" and "message" not in event.detail


async def test_missing_files_are_json_404s(client, images, tmp_path):
    (images / "storage" / "vmlinuz").unlink()  # the convention image loses its kernel
    (images / "dom0" / "xen").unlink()  # listed in the manifest, gone from disk
    for path in ("/images/dom0/xen", "/ipxe/undionly.kpxe", "/ipxe/snponly.efi"):
        resp = await client.get(path)
        assert (resp.status, (await resp.json())["code"]) == (404, "not_found"), path


@pytest.mark.parametrize(("present", "chosen"), [
    ({}, 0),
    ({1: "undionly.kpxe"}, 1),
    ({1: "ipxe.efi"}, 1),
    ({0: "ipxe.efi", 1: "undionly.kpxe"}, 0),
])
def test_ipxe_dir_is_the_first_default_holding_a_binary(tmp_path, monkeypatch, present,
                                                        chosen):
    candidates = (tmp_path / "lib", tmp_path / "share")
    for index, name in present.items():
        candidates[index].mkdir(exist_ok=True)
        (candidates[index] / name).write_bytes(b"MZ")
    monkeypatch.setattr(boot, "DEFAULT_IPXE_DIRS", candidates)
    assert boot.find_ipxe_dir(None) == candidates[chosen]
    assert boot.find_ipxe_dir(tmp_path / "configured") == tmp_path / "configured"


async def test_image_files_support_ranges_and_nothing_else_is_served(client):
    resp = await client.get("/images/storage/initramfs.img",
                            headers={"Range": "bytes=256-259"})
    assert resp.status == 206
    assert await resp.read() == bytes([0, 1, 2, 3])
    for path in ("/images/storage/secret", "/images/storage/..%2F..%2Foutside",
                 "/images/../outside", "/images/nosuch/vmlinuz", "/images/dom0/manifest.json",
                 "/images/storage/%2e%2e", "/ipxe/..%2Foutside", "/ipxe/undionly.kpxe"):
        resp = await client.get(path)
        assert resp.status == 404, path
    assert await (await client.get("/ipxe/ipxe.efi")).read() == b"MZ-ipxe"


async def test_unknown_mac_policies(client, registry):
    script = await (await client.get("/boot/52:54:00:00:00:99.ipxe")).text()
    assert "\nexit" in script
    assert registry.lookup("52:54:00:00:00:99") is None
    resp = await client.patch("/api/v1/settings", json={"unknown_mac": "discover"},
                              headers=AUTH)
    assert (await resp.json()) == {"unknown_mac": "discover"}
    script = await (await client.get("/boot/52:54:00:00:00:99.ipxe?arch=x86_64")).text()
    assert "waiting to be registered" in script and "chain --replace" in script
    pending = await (await client.get("/api/v1/nodes?state=pending")).json()
    assert [(n["mac"], n["facts"]["arch"]) for n in pending["nodes"]] == \
        [("52:54:00:00:00:99", "x86_64")]
    # Registering the pending MAC makes its next script a real boot.
    assert (await add(client, mac="52:54:00:00:00:99")).status == 201
    script = await (await client.get("/boot/52:54:00:00:00:99.ipxe")).text()
    assert "/images/storage/vmlinuz" in script


async def test_roles_api_and_custom_role_boot(client):
    resp = await client.post("/api/v1/roles", json={"name": "gpu", "image": "dom0",
                                                    "template": "xen"}, headers=AUTH)
    assert resp.status == 201
    resp = await client.post("/api/v1/roles", json={"name": "x", "template": "bsd"},
                             headers=AUTH)
    assert (await resp.json())["code"] == "invalid_role"
    await add(client, role="gpu")
    assert "/images/dom0/xen" in await (await client.get(f"/boot/{MAC}.ipxe")).text()
    resp = await client.delete("/api/v1/roles/gpu", headers=AUTH)
    assert (await resp.json())["code"] == "role_in_use"
    role = await (await client.get("/api/v1/roles/gpu")).json()
    assert role["image_built"] is True


async def test_apply_export_round_trip(client):
    body = {"nodes": [{"mac": f"52:54:00:00:01:{i:02x}", "role": "storage",
                       "hostname": f"n{i}", "ip": f"198.18.1.{i}", "tags": ["r1"]}
                      for i in range(1, 21)],
            "roles": [{"name": "gpu", "image": "dom0", "template": "xen"}]}
    first = await (await client.post("/api/v1/apply", json=body, headers=AUTH)).json()
    assert len(first["created"]) == 20 and first["roles"] == ["gpu"]
    exported = await (await client.get("/api/v1/export", headers=AUTH)).json()
    again = await (await client.post("/api/v1/apply", json=exported, headers=AUTH)).json()
    assert (len(again["unchanged"]), again["created"], again["roles"]) == (20, [], [])
    bad = {"nodes": [*body["nodes"], {"mac": "52:54:00:00:02:01", "role": "storage",
                                      "ip": "198.18.1.1"}]}
    bad["roles"] = [{"name": "gpu2", "image": "dom0", "template": "xen"}]
    resp = await client.post("/api/v1/apply", json=bad, headers=AUTH)
    assert (await resp.json())["code"] == "duplicate_ip"
    assert len((await (await client.get("/api/v1/nodes")).json())["nodes"]) == 20
    assert (await client.get("/api/v1/roles/gpu2")).status == 404  # all or nothing


async def test_a_broken_manifest_hides_only_its_image(client, images):
    (images / "dom0" / "manifest.json").write_text('["not", "an", "object"]')
    resp = await client.get("/images/dom0/xen")
    assert (resp.status, (await resp.json())["code"]) == (404, "not_found")
    assert (await client.get("/images/storage/vmlinuz")).status == 200


async def test_fetches_by_unknown_machines_leave_no_trace(client, registry):
    assert (await client.get("/images/storage/vmlinuz?mac=52:54:00:00:00:77")).status == 200
    assert (await client.get("/ipxe/ipxe.efi?mac=52:54:00:00:00:77")).status == 200
    assert registry.events("52:54:00:00:00:77") == []


async def test_inventories_are_for_admins_only(client, registry, aiohttp_client, pki):
    await add(client)
    registry.set_inventory(MAC, {"dmi": {"serial": "S3CR3T"}})
    nobody = await tls_client(aiohttp_client, client.server, pki, None)
    for path in (f"/api/v1/nodes/{MAC}/inventory", f"/api/v1/nodes/{MAC}"):
        assert (await nobody.get(path)).status == 401
    shown = await (await client.get(f"/api/v1/nodes/{MAC}")).json()
    assert shown["inventory"]["dmi"]["serial"] == "S3CR3T"
    resp = await client.get(f"/api/v1/nodes/{MAC}/inventory")
    assert (await resp.json())["dmi"]["serial"] == "S3CR3T"


async def test_uefi_xen_boot_fetches_xen_efi_and_its_xen_cfg(client, registry):
    await add(client, role="dom0", hostname="hv1")
    script = await (await client.get(f"/boot/{MAC}.ipxe")).text()
    assert "iseq ${platform} efi && goto efi" in script
    base = f"http://127.0.0.1:{client.port}"
    assert f"kernel --name xen.efi {base}/images/dom0/xen.efi " in script
    assert f"initrd --name xen.cfg {base}/boot/{MAC}/xen.cfg " in script
    resp = await client.get(f"/boot/{MAC}/xen.cfg")
    assert resp.status == 200
    config = await resp.text()
    assert "[global]\ndefault=netboot\n" in config
    assert f"kernel=vmlinuz netboot.server={base} netboot.mac={MAC} " in config
    assert "ramdisk=initramfs.img\n" in config
    assert await (await client.get(f"/images/dom0/xen.efi?mac={MAC}")).read() == b"xen.efi"
    events = registry.events(MAC)
    assert [e.detail.get("format") for e in events if e.stage == "http.script"] == \
        ["ipxe", "xen-efi"]
    assert [e.detail["file"] for e in events if e.stage == "http.hypervisor"] == ["xen.efi"]
    data = await (await client.get(f"/api/v1/nodes/{MAC}/events")).json()
    assert [t["stage"] for t in data["timeline"]] == ["script", "kernel"]


async def test_xen_cfg_is_only_for_a_xen_boot(client):
    await add(client, role="storage")
    resp = await client.get(f"/boot/{MAC}/xen.cfg")
    assert (resp.status, (await resp.json())["code"]) == (404, "not_found")
    assert (await client.get("/boot/52:54:00:00:00:99/xen.cfg")).status == 404


async def test_urls_keep_the_servers_port_when_the_host_header_has_none(client):
    # GRUB's HTTP client sends "Host: 198.18.0.1" whatever the port.
    await add(client, role="dom0")
    config = await (await client.get(f"/boot/{MAC}/grub.cfg",
                                     headers={"Host": "198.18.0.1"})).text()
    assert f"multiboot2 (http,198.18.0.1:{client.port})/images/dom0/xen " in config
    assert f"netboot.server=http://198.18.0.1:{client.port} " in config
    config = await (await client.get(f"/boot/{MAC}/grub.cfg",
                                     headers={"Host": "boot.example:8080"})).text()
    assert "(http,boot.example:8080)/images/dom0/xen" in config


async def test_uefi_http_boot_size_query_is_not_a_second_download(client, registry):
    await add(client)
    assert (await client.head(f"/ipxe/ipxe.efi?mac={MAC}")).status == 200
    assert (await client.get(f"/ipxe/ipxe.efi?mac={MAC}")).status == 200
    assert [e.stage for e in registry.events(MAC)].count("http.ipxe") == 1
