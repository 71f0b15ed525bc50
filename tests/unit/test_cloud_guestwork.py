"""A dom0's guests in its work: only what it holds the claim of, startable once attached."""

from __future__ import annotations

from dataclasses import replace

from configserver.cloud.guestwork import GuestBoot, guest_work
from configserver.cloud.instances import Claim, Desired, Instance, InstanceNic
from configserver.cloud.model import MIB, Attachment, Leg, Volume

A, B = "52:54:00:00:00:01", "52:54:00:00:00:02"
VOLUME = Volume(id="fedcba9876543210", name="web-disk", size=2048 * MIB,
                legs=(Leg("52:54:00:00:01:01"), Leg("52:54:00:00:01:02")))
BOOT = GuestBoot("http://198.18.0.1:8080/images/guest/vmlinuz", "aa",
                 "http://198.18.0.1:8080/images/guest/initramfs.img", "bb",
                 "root=/dev/xvda ro console=hvc0")
WEB = Instance(id="0123456789abcdef", name="web", memory=256 * MIB, vcpus=1,
               volume=VOLUME.id, image="guest", desired=Desired.RUNNING, claim=Claim(A, 3),
               epoch=3, nics=(InstanceNic("00:16:3e:00:00:01", "198.18.0.100"),))


def work(instances, mac, volume=VOLUME):
    return guest_work(instances, mac, volumes={volume.id: volume}, boots={"guest": BOOT},
                      server_url="http://198.18.0.1:8080")


def test_only_the_claim_holder_hears_of_the_instance():
    attached = VOLUME.with_attachment(Attachment(A, "attached"), A)
    assert work([WEB], B, attached) == []
    [entry] = work([WEB], A, attached)
    assert entry["epoch"] == 3 and entry["desired"] == "running" and entry["startable"]
    assert entry["domain"] == "nb-web" and entry["device"] == "/dev/md/nb-fedcba9876543210"
    assert entry["memory_mib"] == 256 and entry["kernel"]["sha256"] == "aa"
    assert entry["cmdline"] == ("root=/dev/xvda ro console=hvc0 netboot.server="
                                "http://198.18.0.1:8080 netboot.mac=00:16:3e:00:00:01 "
                                "netboot.hostname=web")
    assert entry["nics"] == [{"mac": "00:16:3e:00:00:01", "ip": "198.18.0.100",
                              "bridge": "xenbr0"}]


def test_not_startable_before_the_volume_is_attached_here_or_without_a_kernel():
    """Still wanted running: a guest already running there is not stopped for it."""
    [entry] = work([WEB], A)
    assert entry["desired"] == "running" and entry["startable"] is False
    attached = VOLUME.with_attachment(Attachment(A, "attached"), A)
    [entry] = guest_work([WEB], A, volumes={VOLUME.id: attached}, boots={},
                         server_url="http://198.18.0.1:8080")
    assert entry["desired"] == "running" and entry["startable"] is False


def test_a_stopping_instance_stays_listed_for_its_holder():
    attached = VOLUME.with_attachment(Attachment(A, "attached"), A)
    [entry] = work([replace(WEB, desired=Desired.STOPPED)], A, attached)
    assert entry["desired"] == "stopped" and entry["epoch"] == 3


def test_an_unclaimed_instance_is_nobodys_work():
    assert work([replace(WEB, claim=None, desired=Desired.STOPPED)], A) == []


def test_a_destroyed_instance_is_a_hard_stop_and_reboots_are_counted():
    attached = VOLUME.with_attachment(Attachment(A, "attached"), A)
    [entry] = work([replace(WEB, desired=Desired.DESTROYED, reboots=2)], A, attached)
    assert entry["desired"] == "stopped" and entry["hard"] is True and entry["reboots"] == 2
    [entry] = work([replace(WEB, reboots=1)], A, attached)
    assert entry["hard"] is False and entry["reboots"] == 1


def test_the_guest_network_protects_the_boot_network_but_the_instance_pool():
    from configserver.cloud.guestwork import guest_network

    got = guest_network(["198.18.0.1", "configserver.example", None, "198.18.0.1"],
                        dhcp_port=67, http_port=8080,
                        node_ips=["198.18.0.10", None, "198.18.0.100", "10.9.0.5", "bad"],
                        networks=["198.18.0.0/24"],
                        instance_pools=[("198.18.0.96", "198.18.0.127"), None])
    assert got["servers"] == ["198.18.0.1"] and got["http_port"] == 8080
    # The subnet but 96-127 (the guests, each other's), and the nodes wherever they are
    # (a node's reserved address inside the pool too); merged, no overlaps for nft.
    assert got["protected"] == ["10.9.0.5/32", "198.18.0.0/26", "198.18.0.64/27",
                                "198.18.0.100/32", "198.18.0.128/25"]
    bare = guest_network([], dhcp_port=67, http_port=80, node_ips=[], networks=[],
                         instance_pools=[None])
    assert bare["protected"] == [] and bare["servers"] == []
