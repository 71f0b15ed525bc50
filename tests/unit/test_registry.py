import sqlite3

import pytest

from configserver.errors import (
    Conflict,
    DuplicateAddress,
    DuplicateHostname,
    DuplicateMac,
    InvalidHostname,
    InvalidRequest,
    NotFound,
    RoleInUse,
    StoreError,
    UnknownRole,
)
from configserver.model import (
    BootTemplate,
    Nic,
    NodeSpec,
    NodeState,
    Role,
    UnknownMacPolicy,
)
from configserver.registry.sqlite import EVENTS_KEPT_PER_NODE, MIGRATIONS, SqliteRegistry

MAC1, MAC2, MAC3 = "52:54:00:aa:bb:01", "52:54:00:aa:bb:02", "52:54:00:aa:bb:03"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def registry(tmp_path, clock):
    reg = SqliteRegistry(tmp_path / "registry.sqlite", clock=clock)
    yield reg
    reg.close()


def snapshot(registry):
    return [n.to_json() for n in registry.list_nodes()]


def test_builtin_roles_exist(registry):
    roles = {r.name: r for r in registry.list_roles()}
    assert roles["dom0"].template == BootTemplate.XEN
    assert roles["storage"].template == BootTemplate.LINUX
    assert all(r.builtin for r in roles.values())


def test_add_and_lookup_by_any_nic(registry):
    node = registry.add_node(NodeSpec("52-54-00-AA-BB-01", "storage", "sn1", "198.18.0.21",
                                      extra_nics=(Nic(MAC2, "198.18.1.21"),)))
    assert node.mac == MAC1
    assert node.state == NodeState.REGISTERED
    assert registry.lookup(MAC2).mac == MAC1
    assert registry.lookup(MAC2).ip_for(MAC2) == "198.18.1.21"
    assert registry.lookup_ip("198.18.1.21").mac == MAC1
    assert registry.lookup(MAC3) is None


@pytest.mark.parametrize(("spec", "error"), [
    (NodeSpec(MAC1, "storage"), DuplicateMac),
    (NodeSpec(MAC2, "storage", ip="198.18.0.21"), DuplicateAddress),
    (NodeSpec(MAC2, "storage", hostname="sn1"), DuplicateHostname),
    (NodeSpec(MAC2, "nosuchrole"), UnknownRole),
    (NodeSpec(MAC2, "storage", hostname="bad_name"), InvalidHostname),
    (NodeSpec(MAC2, "storage", extra_nics=(Nic(MAC1),)), DuplicateMac),
    (NodeSpec(MAC2, "storage", ip="198.18.0.30", extra_nics=(Nic(MAC3, "198.18.0.30"),)),
     DuplicateAddress),
])
def test_refused_writes_leave_the_registry_unchanged(registry, spec, error):
    registry.add_node(NodeSpec(MAC1, "storage", "sn1", "198.18.0.21"))
    before = snapshot(registry)
    with pytest.raises(error) as info:
        registry.add_node(spec)
    assert info.value.code  # a stable machine-readable code
    assert snapshot(registry) == before


def test_update_changes_fields_and_checks_conflicts(registry):
    registry.add_node(NodeSpec(MAC1, "storage", "sn1", "198.18.0.21"))
    registry.add_node(NodeSpec(MAC2, "storage", "sn2", "198.18.0.22"))
    node = registry.update_node(MAC1, {"role": "dom0", "hostname": "hv1", "tags": ["r1"]})
    assert (node.role, node.hostname, node.tags, node.ip) == ("dom0", "hv1", ("r1",),
                                                              "198.18.0.21")
    before = snapshot(registry)
    with pytest.raises(DuplicateAddress):
        registry.update_node(MAC1, {"ip": "198.18.0.22"})
    with pytest.raises(UnknownRole):
        registry.update_node(MAC1, {"role": "gpu"})
    assert snapshot(registry) == before
    with pytest.raises(NotFound):
        registry.update_node(MAC3, {"hostname": "x"})


def test_update_keeps_state_and_created_time(registry, clock):
    registry.add_node(NodeSpec(MAC1, "storage"))
    registry.record_event(MAC1, "http.script", booting=True)
    clock.now += 10
    node = registry.update_node(MAC1, {"kernel_args": "quiet"})
    assert node.state == NodeState.BOOTING
    assert node.created == 1000.0
    assert node.updated == 1010.0


def test_remove(registry):
    registry.add_node(NodeSpec(MAC1, "storage", extra_nics=(Nic(MAC2),)))
    registry.remove_node(MAC2)  # any NIC names the node
    assert registry.lookup(MAC1) is None
    with pytest.raises(NotFound):
        registry.remove_node(MAC1)


def test_apply_is_idempotent_and_prunes(registry):
    specs = [NodeSpec(f"52:54:00:00:00:{i:02x}", "storage", f"n{i}", f"198.18.0.{i}")
             for i in range(1, 51)]
    first = registry.apply(specs)
    assert len(first.created) == 50
    again = registry.apply(specs)
    assert (len(again.created), len(again.updated), len(again.unchanged)) == (0, 0, 50)
    changed = [*specs[:49], NodeSpec(specs[49].mac, "dom0", "n50", "198.18.0.50")]
    result = registry.apply(changed[:10] + changed[49:], prune=True)
    assert result.updated == (specs[49].mac,)
    assert len(result.removed) == 39
    assert len(registry.list_nodes()) == 11


def test_apply_can_swap_addresses_between_nodes(registry):
    registry.apply([NodeSpec(MAC1, "storage", ip="198.18.0.1"),
                    NodeSpec(MAC2, "storage", ip="198.18.0.2")])
    registry.apply([NodeSpec(MAC1, "storage", ip="198.18.0.2"),
                    NodeSpec(MAC2, "storage", ip="198.18.0.1")])
    assert registry.lookup_ip("198.18.0.2").mac == MAC1


def test_apply_refuses_whole_inventory_on_one_bad_entry(registry):
    registry.add_node(NodeSpec(MAC1, "storage", ip="198.18.0.1"))
    before = snapshot(registry)
    with pytest.raises(DuplicateAddress):
        registry.apply([NodeSpec(MAC2, "storage", ip="198.18.0.5"),
                        NodeSpec(MAC3, "storage", ip="198.18.0.1")])
    assert snapshot(registry) == before
    with pytest.raises(DuplicateMac):
        registry.apply([NodeSpec(MAC2, "storage"), NodeSpec(MAC2, "dom0")])


def test_roles_custom_lifecycle(registry):
    registry.add_role(Role("gpu", image="dom0", template=BootTemplate.XEN))
    with pytest.raises(Conflict):
        registry.add_role(Role("gpu", image="dom0"))
    registry.add_node(NodeSpec(MAC1, "gpu"))
    with pytest.raises(RoleInUse):
        registry.remove_role("gpu")
    with pytest.raises(RoleInUse):
        registry.remove_role("dom0")
    assert registry.update_role("gpu", {"kernel_args": "quiet"}).kernel_args == "quiet"
    registry.remove_node(MAC1)
    registry.remove_role("gpu")
    assert registry.role("gpu") is None


def test_discover_records_pending_and_adoption_replaces_it(registry, clock):
    assert registry.unknown_mac_policy() == UnknownMacPolicy.IGNORE
    node = registry.discover(MAC1, {"arch": 7, "vendor_class": "PXEClient"})
    assert node.state == NodeState.PENDING
    assert node.facts["first_seen"] == 1000.0
    clock.now += 5
    assert registry.discover(MAC1, {"arch": 7}).facts["first_seen"] == 1000.0
    assert [n.mac for n in registry.list_nodes(state=NodeState.PENDING)] == [MAC1]
    adopted = registry.add_node(NodeSpec(MAC1, "storage", "sn1"))
    assert adopted.state == NodeState.REGISTERED
    assert registry.list_nodes(state=NodeState.PENDING) == []


def test_events_and_state_transitions(registry, clock):
    registry.add_node(NodeSpec(MAC1, "storage"))
    registry.record_event(MAC1, "dhcp.discover", {"arch": 0}, booting=True)
    assert registry.lookup(MAC1).state == NodeState.BOOTING
    registry.start_agent_session(MAC1, "boot-1", "hash")
    clock.now += 1
    registry.record_heartbeat(MAC1, {"uptime": 3})
    assert registry.lookup(MAC1).state == NodeState.READY
    stages = [e.stage for e in registry.events(MAC1)]
    assert stages == ["registered", "dhcp.discover", "state", "agent.lookup",
                      "agent.heartbeat", "state"]
    clock.now += 100
    assert registry.mark_lost(clock.now - 90) == [MAC1]
    assert registry.lookup(MAC1).state == NodeState.LOST
    assert registry.agent_session(MAC1).boot_id == "boot-1"


def test_data_survives_reopen_and_schema_is_versioned(tmp_path):
    path = tmp_path / "r.sqlite"
    reg = SqliteRegistry(path)
    reg.add_node(NodeSpec(MAC1, "storage", "sn1"))
    reg.set_inventory(MAC1, {"cpu": {"count": 2}})
    reg.close()
    reg = SqliteRegistry(path)
    assert reg.lookup(MAC1).hostname == "sn1"
    assert reg.inventory(MAC1) == {"cpu": {"count": 2}}
    reg.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteRegistry(path)


def test_updates_keep_inventory_agent_session_and_facts(registry):
    registry.discover(MAC1, {"arch": 7})
    registry.apply([NodeSpec(MAC1, "storage", "sn1")])  # adopts the pending machine
    registry.set_inventory(MAC1, {"disks": []})
    registry.start_agent_session(MAC1, "boot-1", "h")
    registry.update_node(MAC1, {"hostname": "sn2"})
    registry.apply([NodeSpec(MAC1, "dom0", "sn2")])
    node = registry.lookup(MAC1)
    assert (node.role, node.hostname, node.facts["arch"]) == ("dom0", "sn2", 7)
    assert registry.inventory(MAC1) == {"disks": []}
    assert registry.agent_session(MAC1).token_hash == "h"


def test_discovery_is_bounded(registry, monkeypatch):
    from configserver.errors import TooManyPending
    from configserver.registry import sqlite

    monkeypatch.setattr(sqlite, "MAX_PENDING", 3)
    for i in range(3):
        registry.discover(f"52:54:00:00:09:{i:02x}", {})
    registry.discover("52:54:00:00:09:00", {})  # already known: fine
    with pytest.raises(TooManyPending):
        registry.discover("52:54:00:00:09:99", {})
    assert len(registry.list_nodes(state=NodeState.PENDING)) == 3


# -- what the first tests left unchecked (found by tools/mutate_checks.py) ---------------------


def test_a_nic_mac_names_its_node_everywhere(registry):
    registry.add_node(NodeSpec(MAC1, "storage", "sn1", extra_nics=(Nic(MAC2),)))
    assert registry.update_node(MAC2, {"hostname": "sn2"}).hostname == "sn2"
    assert [e.stage for e in registry.events(MAC2)] == ["registered", "updated"]
    assert registry.events(MAC3) == []
    with pytest.raises(DuplicateMac, match=f"a NIC of {MAC1}"):
        registry.add_node(NodeSpec(MAC2, "storage"))
    with pytest.raises(DuplicateMac) as info:
        registry.add_node(NodeSpec(MAC1, "storage"))
    assert "NIC of" not in info.value.message


def test_a_mac_given_twice_for_one_node_is_refused(registry):
    with pytest.raises(DuplicateMac, match="given twice"):
        registry.add_node(NodeSpec(MAC1, "storage", extra_nics=(Nic(MAC2), Nic(MAC2))))
    with pytest.raises(DuplicateMac, match="given twice"):
        registry.add_node(NodeSpec(MAC1, "storage", extra_nics=(Nic(MAC1),)))
    assert registry.list_nodes() == []


def test_unknown_fields_and_names_are_refused(registry):
    registry.add_node(NodeSpec(MAC1, "storage"))
    registry.add_role(Role("gpu", image="dom0", template=BootTemplate.XEN))
    before = (snapshot(registry), registry.list_roles())
    with pytest.raises(InvalidRequest, match="colour"):
        registry.update_node(MAC1, {"colour": "red", "hostname": "sn1"})
    with pytest.raises(InvalidRequest, match="builtin"):
        registry.update_role("gpu", {"builtin": True, "kernel_args": "quiet"})
    with pytest.raises(NotFound):
        registry.update_role("nosuch", {"kernel_args": "quiet"})
    with pytest.raises(NotFound):
        registry.remove_role("nosuch")
    assert (snapshot(registry), registry.list_roles()) == before


def test_set_state_records_the_transition_and_its_reason(registry):
    registry.add_node(NodeSpec(MAC1, "storage", extra_nics=(Nic(MAC2),)))
    registry.set_state(MAC2, NodeState.LOST, "operator")
    registry.set_state(MAC1, NodeState.LOST)  # no change: no event
    registry.set_state(MAC1, NodeState.REGISTERED)
    assert registry.lookup(MAC1).state == NodeState.REGISTERED
    assert [e.detail for e in registry.events(MAC1) if e.stage == "state"] == [
        {"from": "registered", "to": "lost", "reason": "operator"},
        {"from": "lost", "to": "registered"}]
    with pytest.raises(NotFound):
        registry.set_state(MAC3, NodeState.LOST)


def test_events_are_pruned_to_the_newest_per_node_every_5000_events(tmp_path):
    registry = SqliteRegistry(tmp_path / "r.sqlite", synchronous="OFF")
    registry.add_node(NodeSpec(MAC1, "storage"))  # its "registered" event comes with the node
    for i in range(1, 1500):
        registry.record_event(MAC1, "dhcp.discover", {"n": i})
    registry.flush()
    assert registry.writer.run_maintenance() == 0  # nothing to prune yet
    assert len(registry.events(MAC1, limit=10_000)) == 1500
    for i in range(1500, 5000):
        registry.record_event(MAC1, "dhcp.discover", {"n": i})
    registry.flush()
    assert registry.writer.run_maintenance() == 0  # 4999 events written since the start
    assert len(registry.events(MAC1, limit=10_000)) == 5000
    registry.record_event(MAC1, "dhcp.discover", {"n": 5000})  # the 5000th: a pass is due
    registry.flush()
    assert registry.writer.run_maintenance() >= 1
    kept = registry.events(MAC1, limit=10_000)
    assert len(kept) == EVENTS_KEPT_PER_NODE
    assert kept[-1].detail == {"n": 5000} and kept[0].detail == {"n": 5001 - 1000}
    registry.close()


class FailingConnection:
    """The registry's connection, failing the first statement that starts with ``prefix``."""

    def __init__(self, db: sqlite3.Connection, prefix: str) -> None:
        self._db = db
        self.prefix = prefix

    def execute(self, sql, *args):
        if self.prefix and sql.startswith(self.prefix):
            self.prefix = ""
            raise sqlite3.OperationalError("disk I/O error")
        return self._db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


@pytest.mark.parametrize(("statement", "message"), [
    ("BEGIN IMMEDIATE", "registry write failed: disk I/O error"),
    ("INSERT INTO nodes", "registry write failed: disk I/O error"),
    ("COMMIT", "registry write failed: disk I/O error"),
])
def test_a_failed_write_is_a_store_error_and_leaves_the_registry_usable(registry, statement,
                                                                         message):
    registry.add_node(NodeSpec(MAC1, "storage"))
    before = snapshot(registry)
    registry._writer._db = FailingConnection(registry._writer._db, statement)
    with pytest.raises(StoreError, match=message):
        registry.add_node(NodeSpec(MAC2, "storage", "sn2"))
    assert snapshot(registry) == before  # rolled back
    assert registry.add_node(NodeSpec(MAC2, "storage", "sn2")).hostname == "sn2"


def test_a_registry_that_cannot_be_opened_is_a_store_error(tmp_path):
    (tmp_path / "registry.sqlite").mkdir()
    with pytest.raises(StoreError, match="cannot open registry"):
        SqliteRegistry(tmp_path / "registry.sqlite")


def test_agent_sessions_and_inventories_through_any_nic(registry, clock):
    registry.add_node(NodeSpec(MAC1, "storage", extra_nics=(Nic(MAC2),)))
    clock.now = 1234.0
    registry.start_agent_session(MAC2, "boot-1", None)
    registry.start_agent_session(MAC1, "boot-2", "hash")
    session = registry.agent_session(MAC2)
    assert (session.mac, session.boot_id, session.token_hash, session.issued) == (
        MAC1, "boot-2", "hash", 1234.0)
    assert [e.detail["token_issued"] for e in registry.events(MAC1)
            if e.stage == "agent.lookup"] == [False, True]
    registry.set_inventory(MAC2, {"cpu": {"count": 4}})
    assert registry.inventory(MAC2) == registry.inventory(MAC1) == {"cpu": {"count": 4}}
    assert registry.inventory(MAC3) is None and registry.agent_session(MAC3) is None
    # By its token's hash alone (an agent request's headers): the session, whichever NIC.
    assert registry.agent_session_by_token("hash") == session
    registry.start_agent_session(MAC1, "boot-3", "hash-3")
    assert registry.agent_session_by_token("hash") is None
    assert registry.agent_session_by_token("hash-3").boot_id == "boot-3"
    for write in (lambda: registry.start_agent_session(MAC3, "boot-1", "h"),
                  lambda: registry.record_heartbeat(MAC3, {}),
                  lambda: registry.set_inventory(MAC3, {})):
        with pytest.raises(NotFound):
            write()
    assert registry.lookup(MAC3) is None and registry.events(MAC3) == []
