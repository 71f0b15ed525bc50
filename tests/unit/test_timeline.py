from configserver.model import BootEvent
from configserver.timeline import boot_timeline, latest_boot

MAC = "52:54:00:aa:bb:01"


def ev(time, kind, **detail):
    return BootEvent(MAC, time, kind, detail)


# What a farm dom0 recorded: an OS lease renewal of the previous boot, then a reboot whose
# iPXE ROM's DHCP comes 16 s before its boot script, then the booted OS's own DHCP.
EVENTS = [
    ev(10, "state", to="ready"),
    ev(50, "dhcp.request", stage="none"), ev(50, "dhcp.ack", ip="198.18.0.10"),
    ev(100, "dhcp.discover", stage="ipxe", arch=0), ev(100, "dhcp.offer"),
    ev(100.5, "dhcp.request", stage="ipxe"), ev(100.5, "dhcp.ack"),
    ev(116, "http.script", result="xen"), ev(116, "state", to="booting"),
    ev(116.1, "http.hypervisor"), ev(116.2, "http.kernel"), ev(116.4, "http.initramfs"),
    ev(158, "dhcp.discover", stage="none"), ev(158, "dhcp.ack"),
    ev(170, "agent.lookup"), ev(171, "agent.heartbeat"), ev(171, "state", to="ready"),
]


def test_the_firmware_dhcp_before_the_script_belongs_to_the_boot():
    boot = latest_boot(EVENTS)
    assert boot[0] == EVENTS[3]
    timeline = {t["stage"]: t for t in boot_timeline(EVENTS)}
    assert list(timeline) == ["dhcp", "script", "kernel", "initramfs", "agent", "ready"]
    assert timeline["dhcp"]["offset"] == 0 and timeline["dhcp"]["time"] == 100
    assert timeline["script"]["offset"] == 16
    assert timeline["kernel"]["event"] == "http.hypervisor"
    assert timeline["ready"]["offset"] == 71


def test_a_node_that_never_booted_keeps_all_its_events():
    events = [ev(1, "registered"), ev(2, "http.script", result="wait")]
    assert latest_boot(events) == events
    assert [t["stage"] for t in boot_timeline(events)] == ["script"]


def test_firmware_dhcp_long_before_the_script_is_another_attempt():
    events = [ev(0, "dhcp.discover", stage="pxe"), ev(500, "http.script"),
              ev(500, "state", to="booting")]
    assert latest_boot(events) == events[1:]


def test_a_ready_nodes_reboot_starts_at_its_script_not_at_the_agents_takeover():
    # A ready node's state stays put through DHCP and its script; the new agent moves it.
    events = [ev(10, "state", to="ready"), ev(20, "agent.heartbeat"),
              ev(400, "dhcp.discover", stage="ipxe"), ev(410, "http.script", result="xen"),
              ev(411, "http.kernel"), ev(412, "http.initramfs"),
              ev(600, "state", to="booting", reason="agent started"),
              ev(600, "agent.lookup"), ev(601, "agent.heartbeat"), ev(601, "state", to="ready")]
    assert [t["stage"] for t in boot_timeline(events)] == [
        "dhcp", "script", "kernel", "initramfs", "agent", "ready"]
    assert boot_timeline(events)[0]["time"] == 400
