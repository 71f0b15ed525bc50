"""vm tier, "the cloud", part 3: failover. In the cloud farm that ``test_volumes.py`` left
running ``web`` (the ``cloud`` fixture of ``conftest.py``), web's dom0 is cut off from the
config server alone (an nftables rule on it; the storage nodes and the guest's network stay
reachable). It destroys its guests itself once no heartbeat was accepted for
``self_fence_after`` (60 s), the config server declares it lost (90 s), fences it at both
storage nodes and, once they confirmed, restarts web on the other dom0. The guest writes
``<boot id> <counter>`` lines to its disk throughout: the disk shows one writer after the
other, never two interleaved, and no dom0 ever runs two copies. The rule goes; the dom0
comes back and runs nothing.

The time from the cut to web's first answer from the other dom0 is printed. For the config
server a dom0 killed hard (its QEMU process) is the same silence, and it goes the same way
from there: that was measured by hand (docs/failover.md), not here, as it costs another
five minutes of guest boot and dom0 reboot under TCG on top of a tier already near CI's
limit.
"""

from __future__ import annotations

import time

import pytest
from cloudfarm import GUEST_BOOT, Cloud, Instances, until

pytestmark = pytest.mark.vm

LOST_AFTER, SELF_FENCE = 90, 60  # the config server's defaults, which the farm keeps
RESTART = LOST_AFTER + 180  # seconds from a cut or a kill to the restart elsewhere, at most
WRITER = ("nohup sh -c 'boot=$(cut -c1-8 /proc/sys/kernel/random/boot_id); i=0; while :; do "
          "i=$((i+1)); echo \"$boot $i\" >> /root/writes; sync; sleep 0.2; done' "
          ">/dev/null 2>&1 & echo $! > /root/writer")


def _stages(guests: Instances, since: float) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for event in guests.show("web")["timeline"]:
        if event["time"] >= since:
            found.setdefault(event["stage"], []).append(event)
    return found


def _restarted(guests: Instances, since: float, on: str, cloud: Cloud) -> dict:
    """Wait for web's failover after ``since``; its events by stage. No dom0 runs two copies
    meanwhile (each look at both dom0s' ``xl list`` finds web on one at most)."""
    mac = cloud.nodes[on]["mac"]

    def done(view: dict) -> bool:
        copies = [d for d in ("dom0-1", "dom0-2") if "nb-web" in cloud.ssh(
            d, "xl list", timeout=30, check=False)]  # a dom0 that is gone answers nothing
        assert len(copies) <= 1, f"web runs on {copies}"
        return view["node"] == mac and view["failover"] is None

    view = until("instance web", f"restarted on {on}", lambda: guests.show("web"), done,
                 RESTART)
    assert view["desired"] == "running", view
    return _stages(guests, since)


def _figures(what: str, began: float, stages: dict[str, list[dict]], answered: float) -> str:
    def at(stage: str) -> str:
        return ", ".join(f"+{e['time'] - began:.1f}s" for e in stages.get(stage, [])) or "-"

    return (f"{what}: fenced (declared lost) {at('failover.fencing')}, storage confirmed "
            f"{at('failover.confirmed')}, restarted {at('failover.restarted')}, first ping "
            f"answer +{answered - began:.1f}s")


def _writes(guests: Instances, ip: str) -> list[tuple[str, int]]:
    lines = guests.ssh(ip, "sync; cat /root/writes").split("\n")
    return [(boot, int(n)) for boot, n in (line.split() for line in lines if line.strip())]


def test_a_dom0_cut_off_from_the_config_server_fences_itself_and_web_restarts_elsewhere(
        cloud):
    guests = Instances(cloud)
    view = guests.show("web")
    holder, ip, epoch = view["hostname"], view["nics"][0]["ip"], view["epoch"]
    other = "dom0-1" if holder == "dom0-2" else "dom0-2"
    server = cloud.farm.net.plan.server_ip
    guests.ssh(ip, "kill $(cat /root/writer 2>/dev/null) 2>/dev/null; rm -f /root/writes; "
                   + WRITER)
    time.sleep(3)
    cut = time.time()
    # Everything the agent sends the config server is dropped; ssh into the dom0 (its
    # answers come from port 22), the storage nodes and the guest's bridged traffic are not.
    cloud.ssh(holder, "nft add table inet nbcut && nft add chain inet nbcut out "
                      "'{ type filter hook output priority 0; }' && nft add rule inet nbcut "
                      f"out ip daddr {server} tcp sport != 22 drop")
    try:
        stages = _restarted(guests, cut, other, cloud)
        assert "nb-web" not in guests.domains()[holder]
        guests.ping(ip, GUEST_BOOT)
        answered = time.time()
        print(_figures(f"{holder} cut off", cut, stages, answered))
        fenced = stages["failover.fencing"][0]["time"] - cut
        assert fenced > SELF_FENCE, stages  # declared lost only after lost_after, and
        assert {e["detail"]["node"] for e in stages["failover.confirmed"]} == {
            cloud.nodes[n]["mac"] for n in ("storage-1", "storage-2")}, stages
        assert min(e["time"] for e in stages["failover.restarted"]) >= max(
            e["time"] for e in stages["failover.confirmed"]), stages  # after every confirm
        moved = guests.show("web")
        assert moved["epoch"] > epoch and moved["hostname"] == other, moved
        guests.ssh_up(ip, GUEST_BOOT)
        guests.ssh(ip, WRITER)  # the second writer, on the guest's new boot
        time.sleep(5)
    finally:
        cloud.ssh(holder, "nft delete table inet nbcut", check=False)
    mac = cloud.nodes[holder]["mac"]
    until(f"node {holder}", "ready again", lambda: cloud.cli("node", "show", mac),
          lambda v: v["state"] == "ready", 120)
    # Its next report tells what it did while cut off: web destroyed by the self-fence, and
    # before the config server even declared it lost.
    def self_fenced(view: dict) -> list[dict]:
        return [e for e in view["timeline"] if e["stage"] == "agent.destroyed"
                and e["time"] >= cut and e["detail"].get("node") == mac
                and "self-fenced" in str(e["detail"].get("reason"))]

    view = until("instance web", f"told of {holder}'s self-fence", lambda: guests.show("web"),
                 self_fenced, 120)
    [destroyed] = self_fenced(view)
    fenced_itself = float(destroyed["detail"]["at"])  # when the dom0 did it, not its report
    print(f"{holder} self-fenced web at +{fenced_itself - cut:.1f}s: "
          f"{destroyed['detail']['reason']}")
    assert fenced_itself < stages["failover.fencing"][0]["time"], destroyed
    assert guests.domains()[holder] == {}
    guests.ssh(ip, "kill $(cat /root/writer)")
    writes = _writes(guests, ip)
    boots = [boot for n, (boot, _) in enumerate(writes) if n == 0 or writes[n - 1][0] != boot]
    assert len(boots) == 2, f"the writers interleaved: boots in order {boots}"
    for boot in boots:
        counted = [n for b, n in writes if b == boot]
        assert counted == list(range(1, len(counted) + 1)), (boot, counted[-10:])
    print(f"writes: {[sum(b == boot for b, _ in writes) for boot in boots]} by the two boots, "
          "one after the other")
