"""The dom0 agent's guests: xl's output read, guest configs written, and the plan that never
lets a domain run without this dom0's claim."""

from __future__ import annotations

import json

import pytest

from nodeagent.errors import XenError
from nodeagent.roles.guests import Do, plan
from nodeagent.roles.xen import (
    Domain,
    GuestSpec,
    guest_config,
    parse_info,
    parse_list,
    parse_list_long,
    spec_from_work,
)

XL_LIST = """\
Name                                        ID   Mem VCPUs\tState\tTime(s)
Domain-0                                     0  1024     1     r-----      52.3
nb-web                                       3   256     1     -b----       1.9
my own guest                                 4   128     2     --p---       0.0
"""
XL_LIST_LONG = json.dumps([
    {"domid": 0, "config": {"c_info": {"type": "pv", "name": "Domain-0"}}},
    {"domid": 3, "config": {"c_info": {"type": "pv", "name": "nb-web",
                                       "uuid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"}}},
])
XL_INFO = """\
host                   : dom0-1
nr_cpus                : 1
virt_caps              : pv
total_memory           : 2559
free_memory            : 1407
xen_major              : 4
xen_minor              : 17
xen_extra              : .5
xen_scheduler          : credit2
"""
UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


def spec(name="nb-web", running=True, uuid=UUID, **changes) -> GuestSpec:
    base = dict(id="0123456789abcdef", name=name, uuid=uuid, epoch=1, running=running,
                memory_mib=256, vcpus=1, device="/dev/md/nb-fedcba9876543210",
                kernel="/var/lib/nodeagent/kernels/abc", ramdisk="/var/lib/nodeagent/kernels/def",
                cmdline="root=/dev/xvda ro console=hvc0", nics=(("00:16:3e:00:00:01", "xenbr0"),))
    return GuestSpec(**{**base, **changes})


def domain(name="nb-web", uuid=UUID, state="blocked") -> Domain:
    return Domain(name, 3, 256, 1, state, 1.0, uuid)


def test_parse_list_reads_names_with_spaces_and_states():
    found = parse_list(XL_LIST)
    assert [(d.name, d.domid, d.memory_mib, d.vcpus, d.state) for d in found] == [
        ("Domain-0", 0, 1024, 1, "running"), ("nb-web", 3, 256, 1, "blocked"),
        ("my own guest", 4, 128, 2, "paused")]
    assert found[0].cpu_seconds == 52.3


def test_parse_list_refuses_garbage():
    with pytest.raises(XenError, match="cannot read"):
        parse_list("Name ID\nnb-web x 256 1 -b---- 1.0\n")


def test_parse_list_long_and_info():
    assert parse_list_long(XL_LIST_LONG) == {3: UUID}
    with pytest.raises(XenError, match="not JSON"):
        parse_list_long("{")
    facts = parse_info(XL_INFO)
    assert facts == {"total_memory_mib": 2559, "free_memory_mib": 1407, "nr_cpus": 1,
                     "hap": False, "pv": True, "version": "4.17.5", "scheduler": "credit2"}
    assert parse_info(XL_INFO.replace("virt_caps              : pv",
                                      "virt_caps              : pv hvm hap"))["hap"] is True


def test_guest_config_is_pv_without_hap_and_pvh_with_it():
    text = guest_config(spec(), hap=False)
    assert 'type = "pv"' in text and 'name = "nb-web"' in text and f'uuid = "{UUID}"' in text
    # The image's lean hotplug scripts: their cost is a migrating guest's downtime.
    assert ('disk = [ "format=raw,vdev=xvda,access=rw,script=/etc/xen/scripts/block-netboot,'
            'target=/dev/md/nb-fedcba9876543210" ]') in text
    assert ('vif = [ "mac=00:16:3e:00:00:01,bridge=xenbr0,vifname=nb000001.0,'
            'script=/etc/xen/scripts/vif-netboot" ]') in text
    assert 'extra = "root=/dev/xvda ro console=hvc0"' in text and "memory = 256" in text
    assert 'type = "pvh"' in guest_config(spec(), hap=True)


@pytest.mark.parametrize("field", ["cmdline", "kernel", "name"])
def test_guest_config_refuses_values_that_could_escape(field):
    with pytest.raises(XenError, match="refusing"):
        guest_config(spec(**{field: 'x"\nkernel = "/evil'}), hap=False)


def test_spec_from_work():
    entry = {"id": "0123456789abcdef", "domain": "nb-web", "uuid": UUID, "epoch": 4,
             "desired": "running", "memory_mib": 256, "vcpus": 1,
             "device": "/dev/md/nb-fedcba9876543210", "cmdline": "console=hvc0",
             "nics": [{"mac": "00:16:3e:00:00:01", "ip": "198.18.0.100", "bridge": "xenbr0"}]}
    made = spec_from_work(entry, "/k", "/r")
    assert made.epoch == 4 and made.running and made.nics == (("00:16:3e:00:00:01", "xenbr0"),)
    with pytest.raises(XenError, match="malformed"):
        spec_from_work({"id": "x"}, "/k", None)


def test_plan_creates_what_is_claimed_here_and_missing():
    actions = plan([spec()], [Domain("Domain-0", 0, 1024, 1, "running", 5.0)])
    assert [(a.do, a.name) for a in actions] == [(Do.CREATE, "nb-web")]


def test_plan_leaves_a_running_claimed_guest_alone():
    assert plan([spec()], [domain()]) == []


def test_plan_destroys_an_instance_domain_without_a_claim_here():
    actions = plan([], [domain(), Domain("my own guest", 4, 128, 2, "paused", 0.0)])
    assert [(a.do, a.name) for a in actions] == [(Do.DESTROY, "nb-web")]
    assert "no claim" in actions[0].reason


def test_plan_destroys_a_hand_made_domain_with_the_wrong_uuid_then_creates():
    actions = plan([spec()], [domain(uuid="00000000-0000-0000-0000-000000000000")])
    assert [(a.do, a.name) for a in actions] == [(Do.DESTROY, "nb-web"), (Do.CREATE, "nb-web")]


def test_plan_shuts_down_a_guest_wanted_stopped_and_reports_it_gone_after():
    assert [(a.do, a.name) for a in plan([spec(running=False)], [domain()])] == [
        (Do.SHUTDOWN, "nb-web")]
    assert [(a.do, a.name) for a in plan([spec(running=False)], [])] == [(Do.GONE, "nb-web")]


def test_plan_waits_for_a_dying_domain():
    assert plan([spec()], [domain(state="dying")]) == []


def test_plan_destroys_at_once_when_the_stop_is_hard():
    [action] = plan([spec(running=False, hard=True)], [domain()])
    assert action.do == Do.DESTROY and "destroyed" in action.reason


def test_plan_reboots_only_past_the_count_applied_here():
    assert plan([spec(reboots=2)], [domain()], {"nb-web": 2}) == []
    assert plan([spec(reboots=2)], [domain()]) == []  # no record: taken as up to date
    assert [(a.do, a.name) for a in plan([spec(reboots=3)], [domain()], {"nb-web": 2})] == [
        (Do.REBOOT, "nb-web")]
    # Not running: a create, which applies every reboot asked so far.
    assert [a.do for a in plan([spec(reboots=3)], [], {"nb-web": 1})] == [Do.CREATE]


def test_xl_create_runs_in_a_scope_of_its_own_when_systemd_is_there():
    from nodeagent.roles.xen import GUEST_SLICE, create_argv

    argv = create_argv("/run/nodeagent/guests/nb-web.cfg", systemd_run="/usr/bin/systemd-run")
    assert argv[:3] == ["/usr/bin/systemd-run", "--quiet", "--scope"]
    assert f"--slice={GUEST_SLICE}" in argv
    assert argv[-3:] == ["xl", "create", "/run/nodeagent/guests/nb-web.cfg"]
    assert create_argv("/c.cfg", systemd_run=None) == ["xl", "create", "/c.cfg"]


def test_vif_names_follow_the_mac_and_rules_refuse_nothing_silently():
    from nodeagent.roles import guestnet

    assert guestnet.vifname("00:16:3E:0a:0b:0c", 1) == "nb0a0b0c.1"
    assert len(guestnet.vifname("00:16:3e:ff:ff:ff", 99)) <= 15
    with pytest.raises(XenError):
        guestnet.vifname("not-a-mac")
    ports = guestnet.ports([{"nics": [{"mac": "00:16:3e:00:00:01", "ip": "198.18.0.96"},
                                      {"mac": "bad"}, {"mac": "00:16:3e:00:00:02"}]},
                            {"nics": None}])
    assert [(p.name, p.ip) for p in ports] == [("nb000001.0", "198.18.0.96"),
                                              ("nb000002.2", None)]
    policy = guestnet.policy_from_work({"servers": ["198.18.0.1", "x"], "http_port": 70000,
                                        "protected": ["198.18.0.0/30", "198.18.0.9"]})
    assert policy.servers == ("198.18.0.1",) and policy.http_port == 8080
    assert policy.protected == ("198.18.0.0/30", "198.18.0.9/32")
    text = guestnet.ruleset(ports, policy)
    assert text.startswith("table bridge netboot_guests\ndelete table bridge netboot_guests\n")
    assert '"nb000002.2" . 00:16:3e:00:00:02' in text  # its MAC only: no address to send from
    assert "198.18.0.96" in text and text.count("jump from_guest") == 2
    empty = guestnet.ruleset([], guestnet.Policy())
    assert "set port_mac { type ifname . ether_addr;  }" in empty  # every nb* vif dropped
