"""The dom0's guests carried out against a fake toolstack: claims confirmed before a create,
unclaimed domains destroyed, kernels checked, stops clean or hard, and the report."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from nodeagent.errors import XenError
from nodeagent.roles.dom0_guests import Guests
from nodeagent.roles.xen import Domain

KERNEL, RAMDISK = b"kernel bytes", b"initramfs bytes"
UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
DOM0 = Domain("Domain-0", 0, 1024, 1, "running", 5.0)


class FakeXl:
    def __init__(self, running=(), shutdown_fails=False, create_fails=False):
        self.create_fails = create_fails
        self.running = {d.name: d for d in (DOM0, *running)}
        self.calls: list[tuple[str, str]] = []
        self.configs: list[str] = []
        self.shutdown_fails = shutdown_fails

    async def domains(self):
        return list(self.running.values())

    async def info(self):
        return {"hap": False, "free_memory_mib": 1400, "total_memory_mib": 2559,
                "scheduler": "credit2"}

    async def create(self, config_path):
        text = Path(config_path).read_text()
        self.configs.append(text)
        name = text.split('name = "', 1)[1].split('"', 1)[0]
        self.calls.append(("create", name))
        self.running[name] = Domain(name, 7, 256, 1, "blocked", 0.0, UUID)
        if self.create_fails:  # half built, as a timed-out xl create leaves it
            self.running[name] = Domain(name, 7, 0, 0, "paused", 0.0, UUID)
            raise XenError("xl did not answer within 180s")

    async def shutdown(self, name, timeout):
        self.calls.append(("shutdown", name))
        if self.shutdown_fails:
            raise XenError("xl did not answer within 60s")
        del self.running[name]

    async def destroy(self, name):
        self.calls.append(("destroy", name))
        self.running.pop(name, None)

    async def sched_credit(self, name, weight, cap, scheduler):
        assert scheduler == "credit2"
        self.calls.append(("sched-credit", name, weight, cap))

    async def mem_set(self, name, mib):
        self.calls.append(("mem-set", name, mib))

    async def vif_rate(self, domid, index, rate):
        self.calls.append(("vif-rate", domid, index, rate))

    async def reboot(self, name, timeout):
        self.calls.append(("reboot", name))
        old = self.running[name]
        self.running[name] = Domain(name, old.domid + 1, old.memory_mib, old.vcpus, "blocked",
                                    0.0, old.uuid)


def entry(desired="running", epoch=2, kernel=KERNEL, **more):
    return {**more, "id": "0123456789abcdef", "domain": "nb-web", "uuid": UUID, "epoch": epoch,
            "desired": desired, "memory_mib": 256, "vcpus": 1,
            "device": "/dev/md/nb-fedcba9876543210", "cmdline": "root=/dev/xvda ro",
            "kernel": {"url": "http://s/k", "sha256": hashlib.sha256(kernel).hexdigest()},
            "ramdisk": {"url": "http://s/r", "sha256": hashlib.sha256(RAMDISK).hexdigest()},
            "nics": [{"mac": "00:16:3e:00:00:01", "ip": "198.18.0.100", "bridge": "xenbr0"}]}


def guests(tmp_path, xl, held=True, rules=None):
    asked, fetched = [], []
    rules = [] if rules is None else rules

    async def load_rules(text, path):
        rules.append(text)

    async def confirm(name, epoch):
        asked.append((name, epoch))
        return held

    async def fetch(url, dest):
        fetched.append(url)
        dest.write_bytes({"http://s/k": KERNEL, "http://s/r": RAMDISK}[url])

    made = Guests(xl, confirm, fetch, config_dir=tmp_path / "cfg",
                  kernel_dir=tmp_path / "kernels", shutdown_timeout=1.0,
                  usage=lambda domid: {"net_rx_bytes": 100 * domid, "disk_write_bytes": 512},
                  load_rules=load_rules, disk=mapped)
    return made, asked, fetched


async def mapped(array):
    """blockmap's device over the array, without device-mapper."""
    return "/dev/mapper/nbdisk-" + array.removeprefix("/dev/md/nb-")


async def test_creates_a_claimed_guest_after_confirming_and_reports_it(tmp_path):
    xl = FakeXl()
    made, asked, fetched = guests(tmp_path, xl)
    report = await made.reconcile([entry()], lambda device: True)
    assert asked == [("web", 2)] and xl.calls == [("create", "nb-web")]
    assert 'type = "pv"' in xl.configs[0]
    assert "target=/dev/mapper/nbdisk-fedcba9876543210" in xl.configs[0]
    [guest] = report["guests"]
    assert guest["state"] == "blocked" and guest["epoch"] == 2 and guest["error"] is None
    assert guest["net_rx_bytes"] == 700 and guest["disk_write_bytes"] == 512  # domid 7
    assert report["xen"]["free_memory_mib"] == 1400
    assert [e["stage"] for e in report["events"]] == ["created"]
    # A second pass: nothing to do, the kernel is cached, no new events.
    again = await made.reconcile([entry()], lambda device: True)
    assert xl.calls == [("create", "nb-web")] and fetched == ["http://s/k", "http://s/r"]
    assert again["events"] == []


async def test_no_create_without_the_claim_or_before_the_volume(tmp_path):
    xl = FakeXl()
    made, asked, _ = guests(tmp_path, xl, held=False)
    report = await made.reconcile([entry()], lambda device: True)
    assert xl.calls == [] and asked == [("web", 2)]
    assert report["events"][0]["stage"] == "not started"
    made, asked, _ = guests(tmp_path, xl)
    await made.reconcile([entry()], lambda device: False)
    assert xl.calls == [] and asked == []  # the volume is not here yet: not even asked


async def test_a_domain_without_a_claim_here_is_destroyed_at_once(tmp_path):
    xl = FakeXl([Domain("nb-web", 3, 256, 1, "running", 9.0, "0" * 8 + UUID[8:]),
                 Domain("nb-other", 4, 128, 1, "running", 1.0, UUID),
                 Domain("operators-own", 5, 128, 1, "running", 1.0, None)])
    made, _, _ = guests(tmp_path, xl)
    report = await made.reconcile([entry()], lambda device: True)
    assert ("destroy", "nb-other") in xl.calls and ("destroy", "nb-web") in xl.calls
    assert xl.calls[-1] == ("create", "nb-web")  # the claimed one, with its own uuid
    assert "operators-own" in xl.running
    assert {e["domain"] for e in report["events"] if e["stage"] == "destroyed"} == {
        "nb-other", "nb-web"}


async def test_stop_is_clean_then_hard(tmp_path):
    running = Domain("nb-web", 3, 256, 1, "running", 9.0, UUID)
    xl = FakeXl([running])
    made, _, _ = guests(tmp_path, xl)
    report = await made.reconcile([entry("stopped")], lambda device: True)
    assert xl.calls == [("shutdown", "nb-web")] and report["guests"][0]["state"] == "stopped"
    xl = FakeXl([running], shutdown_fails=True)
    made, _, _ = guests(tmp_path, xl)
    report = await made.reconcile([entry("stopped")], lambda device: True)
    assert xl.calls == [("shutdown", "nb-web"), ("destroy", "nb-web")]
    assert "no clean shutdown" in report["events"][0]["reason"]


async def test_a_kernel_with_the_wrong_sha256_is_refused_and_not_kept(tmp_path):
    xl = FakeXl()
    made, asked, _ = guests(tmp_path, xl)
    report = await made.reconcile([entry(kernel=b"another kernel")], lambda device: True)
    assert xl.calls == [] and asked == [] and not list((tmp_path / "kernels").glob("*"))
    [guest] = report["guests"]
    assert guest["state"] == "stopped" and "is not the announced" in guest["error"]


async def test_two_fetches_of_one_kernel_at_once_both_get_it(tmp_path):
    """Two guests (or two migrations coming in) with the same kernel fetch it side by side:
    each into its own partial file; both end with the one kept under its sha256."""
    made, _, _ = guests(tmp_path, FakeXl())
    turns = asyncio.Event()

    async def slow_fetch(url, dest):
        dest.write_bytes(KERNEL[:10])
        await turns.wait()  # both are half way before either finishes
        dest.write_bytes(KERNEL)

    made.fetch = slow_fetch
    source = {"url": "http://s/k", "sha256": hashlib.sha256(KERNEL).hexdigest()}
    both = asyncio.gather(made._file(source), made._file(source))
    await asyncio.sleep(0.05)
    turns.set()
    first, second = await both
    assert first == second and Path(first).read_bytes() == KERNEL
    assert [f.name for f in (tmp_path / "kernels").iterdir()] == [Path(first).name]


async def test_a_running_guest_outlives_an_unusable_kernel_or_a_malformed_entry(tmp_path):
    """A kernel is only fetched to create: a running guest needs none, and a work entry the
    agent cannot read leaves its domain alone (a bug, not a reason to destroy a guest)."""
    xl = FakeXl([Domain("nb-web", 3, 256, 1, "running", 9.0, UUID),
                 Domain("nb-db", 4, 256, 1, "running", 2.0, UUID)])
    made, _, fetched = guests(tmp_path, xl)
    malformed = {**entry(), "id": "fedcba9876543210", "domain": "nb-db"}
    del malformed["uuid"]
    report = await made.reconcile([entry(kernel=b"another kernel"), malformed],
                                  lambda device: True)
    assert xl.calls == [] and fetched == []
    assert set(xl.running) == {"Domain-0", "nb-web", "nb-db"}
    [web] = report["guests"]
    assert web["state"] == "running" and web["error"] is None


async def test_an_entry_not_startable_is_neither_created_nor_stopped(tmp_path):
    xl = FakeXl([Domain("nb-web", 3, 256, 1, "running", 9.0, UUID)])
    made, asked, _ = guests(tmp_path, xl)
    report = await made.reconcile([entry(startable=False)], lambda device: True)
    assert xl.calls == [] and report["guests"][0]["state"] == "running"
    xl = FakeXl()
    made, asked, _ = guests(tmp_path, xl)
    report = await made.reconcile([entry(startable=False)], lambda device: True)
    assert xl.calls == [] and asked == [] and report["guests"][0]["state"] == "stopped"


async def test_a_local_file_error_is_the_guests_error_not_the_passs(tmp_path):
    xl = FakeXl([Domain("nb-db", 4, 256, 1, "running", 2.0, UUID)])
    made, _, _ = guests(tmp_path, xl)
    (tmp_path / "kernels").write_text("a file where the cache directory should be")
    other = {**entry("stopped"), "id": "fedcba9876543210", "domain": "nb-db"}
    report = await made.reconcile([entry(), other], lambda device: True)
    by_domain = {g["domain"]: g for g in report["guests"]}
    assert by_domain["nb-web"]["error"] and by_domain["nb-db"]["state"] == "stopped"
    assert ("shutdown", "nb-db") in xl.calls


async def test_guests_stop_side_by_side(tmp_path):
    """Two clean shutdowns overlap: a pass does not wait one timeout per guest."""
    started, both = [], asyncio.Event()

    class SlowXl(FakeXl):
        async def shutdown(self, name, timeout):
            started.append(name)
            if len(started) == 2:
                both.set()
            await asyncio.wait_for(both.wait(), 5.0)  # times out if run one after the other
            await super().shutdown(name, timeout)

    xl = SlowXl([Domain("nb-web", 3, 256, 1, "running", 9.0, UUID),
                 Domain("nb-db", 4, 256, 1, "running", 2.0, UUID)])
    made, _, _ = guests(tmp_path, xl)
    other = {**entry("stopped"), "id": "fedcba9876543210", "domain": "nb-db"}
    report = await made.reconcile([entry("stopped"), other], lambda device: True)
    assert sorted(started) == ["nb-db", "nb-web"]
    assert [g["error"] for g in report["guests"]] == [None, None]


@pytest.mark.parametrize("broken", [{"kernel": None}, {"kernel": {"url": "http://s/k"}}])
async def test_an_entry_without_a_checkable_kernel_starts_nothing(tmp_path, broken):
    xl = FakeXl()
    made, _, _ = guests(tmp_path, xl)
    await made.reconcile([{**entry(), **broken}], lambda device: True)
    assert xl.calls == []


async def test_a_hard_stop_destroys_without_asking_the_guest(tmp_path):
    xl = FakeXl([Domain("nb-web", 3, 256, 1, "running", 9.0, UUID)])
    made, _, _ = guests(tmp_path, xl)
    report = await made.reconcile([entry("stopped", hard=True)], lambda device: True)
    assert xl.calls == [("destroy", "nb-web")] and report["guests"][0]["state"] == "stopped"


async def test_a_reboot_request_is_applied_once(tmp_path):
    xl = FakeXl()
    made, _, _ = guests(tmp_path, xl)
    await made.reconcile([entry(reboots=4)], lambda device: True)  # created: 4 applied
    await made.reconcile([entry(reboots=4)], lambda device: True)
    assert xl.calls == [("create", "nb-web")]
    report = await made.reconcile([entry(reboots=5)], lambda device: True)
    assert xl.calls[-1] == ("reboot", "nb-web")
    assert [e["stage"] for e in report["events"]] == ["rebooted"]
    await made.reconcile([entry(reboots=5)], lambda device: True)
    assert [c for c in xl.calls if c[0] == "reboot"] == [("reboot", "nb-web")]
    # A new agent (the records survive in /run) does not reboot it again.
    again, _, _ = guests(tmp_path, xl)
    await again.reconcile([entry(reboots=5)], lambda device: True)
    assert len(xl.calls) == 2


async def test_a_failed_create_leaves_no_half_built_domain(tmp_path):
    xl = FakeXl(create_fails=True)
    made, _, _ = guests(tmp_path, xl)
    report = await made.reconcile([entry()], lambda device: True)
    assert xl.calls == [("create", "nb-web"), ("destroy", "nb-web")]
    assert "nb-web" not in xl.running and "180s" in report["guests"][0]["error"]
    xl.create_fails = False
    await made.reconcile([entry()], lambda device: True)  # the next pass starts it afresh
    assert xl.calls[-1] == ("create", "nb-web") and xl.running["nb-web"].state == "blocked"


async def test_network_rules_come_first_are_loaded_once_and_fail_closed(tmp_path):
    """The rules name each guest's vif with its MAC and address; unchanged, they are not
    loaded again; while they cannot be loaded no guest is created, and a running one runs
    on."""
    xl = FakeXl()
    rules = []
    made, _, _ = guests(tmp_path, xl, rules=rules)
    network = {"servers": ["198.18.0.1"], "http_port": 8080, "protected": ["198.18.0.2"]}
    report = await made.reconcile([entry()], lambda device: True, network)
    [text] = rules
    assert '"nb000001.0" . 00:16:3e:00:00:01 . 198.18.0.100' in text
    assert "198.18.0.2/32" in text and "tcp dport 8080 accept" in text
    assert report["network"] == {"rules": True, "ports": 1, "error": None}
    assert xl.calls == [("create", "nb-web")]
    await made.reconcile([entry()], lambda device: True, network)
    assert len(rules) == 1

    async def broken(text, path):
        raise XenError("nft -f failed (1): Error: Could not process rule")

    xl = FakeXl([Domain("nb-db", 4, 256, 1, "running", 2.0, UUID)])
    failing, _, _ = guests(tmp_path, xl)
    failing.load_rules = broken
    other = {**entry(), "id": "fedcba9876543210", "domain": "nb-db"}
    report = await failing.reconcile([entry(), other], lambda device: True, network)
    assert xl.calls == [] and "nb-db" in xl.running
    web = next(g for g in report["guests"] if g["domain"] == "nb-web")
    assert "without its network rules" in web["error"]
    assert report["network"]["rules"] is False and "Could not process" in (
        report["network"]["error"])


async def test_resource_controls_at_create_and_changed_in_place(tmp_path):
    xl = FakeXl()
    made, _, _ = guests(tmp_path, xl)
    controls = {"cpu_weight": 512, "cpu_cap": 50, "net_rate": 1_000_000, "max_memory_mib": 512}
    report = await made.reconcile([entry(**controls)], lambda device: True)
    config = xl.configs[0]
    assert "maxmem = 512" in config and "cpu_weight = 512" in config and "cap = 50" in config
    assert "rate=1000000B/s" in config
    assert xl.calls == [("create", "nb-web")] and report["guests"][0]["error"] is None
    # Changed while it runs: applied once, in place, then nothing more.
    changed = {**controls, "cpu_weight": 128, "net_rate": 2_000_000}
    report = await made.reconcile([{**entry(**changed), "memory_mib": 384}],
                                  lambda device: True)
    assert xl.calls[1:] == [("sched-credit", "nb-web", 128, 50), ("mem-set", "nb-web", 384),
                            ("vif-rate", 7, 0, 2_000_000)]
    assert [e["stage"] for e in report["events"]] == ["resources applied"]
    await made.reconcile([{**entry(**changed), "memory_mib": 384}], lambda device: True)
    assert len(xl.calls) == 4
    # xl made the domain again (a reboot inside the guest): from its create-time config, so
    # everything again, once.
    old = xl.running["nb-web"]
    xl.running["nb-web"] = Domain("nb-web", 8, old.memory_mib, 1, "blocked", 0.0, UUID)
    await made.reconcile([{**entry(**changed), "memory_mib": 384}], lambda device: True)
    await made.reconcile([{**entry(**changed), "memory_mib": 384}], lambda device: True)
    assert xl.calls[4:] == [("sched-credit", "nb-web", 128, 50), ("mem-set", "nb-web", 384),
                            ("vif-rate", 8, 0, 2_000_000)]


async def test_a_guest_found_running_is_taken_to_have_xens_defaults(tmp_path):
    """No record (an agent before this one made it): nothing to do for the defaults, and
    only what differs from them otherwise; its memory is left as it is."""
    xl = FakeXl([Domain("nb-web", 3, 256, 1, "running", 9.0, UUID)])
    made, _, _ = guests(tmp_path, xl)
    await made.reconcile([entry()], lambda device: True)
    assert xl.calls == []
    xl = FakeXl([Domain("nb-web", 3, 256, 1, "running", 9.0, UUID)])
    made, _, _ = guests(tmp_path / "other", xl)
    await made.reconcile([entry(cpu_cap=20)], lambda device: True)
    assert xl.calls == [("sched-credit", "nb-web", 256, 20)]


async def test_a_domain_in_flight_under_xls_names_is_left_alone(tmp_path):
    """``xl migrate-receive`` builds ``NAME--incoming`` and the source's domain becomes
    ``NAME--migratedaway``: neither holds a claim, neither may be destroyed meanwhile (the
    receive would fail populating its memory, the send would lose the guest)."""
    from nodeagent.roles.migration import Migrations
    xl = FakeXl([Domain("nb-web--incoming", 3, 0, 1, "paused", 0.0, UUID),
                 Domain("nb-db--migratedaway", 4, 256, 1, "paused", 9.0, UUID),
                 Domain("nb-stray--incoming", 5, 0, 1, "paused", 0.0, UUID)])
    made, _, _ = guests(tmp_path, xl)
    made.migrations = moves = Migrations(None, exists=None, unpause=None)
    moves.states["m1"] = {"id": "m1", "side": "target", "state": "listening",
                          "domain": "nb-web", "md": "nb-1", "port": 1, "error": None}
    moves.states["m2"] = {"id": "m2", "side": "source", "state": "sending",
                          "domain": "nb-db", "md": "nb-2", "port": None, "error": None}
    moves.step = lambda *args: None
    await made.reconcile([], lambda device: True)
    assert xl.calls == [("destroy", "nb-stray--incoming")]
