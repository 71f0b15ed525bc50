"""A guest's byte counters from a dom0's sysfs: its netback devices' network devices (seen
from the guest, whatever they are named) and its blkback devices (sectors), its own only."""

from __future__ import annotations

from nodeagent.roles.guestusage import counters


def write(root, path, value):
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"{value}\n")


def test_counters_add_the_domains_vifs_and_disks_and_no_other_domains(tmp_path):
    for vif, rx, tx in (("vif-3-0/net/nb000001.0", 1000, 50), ("vif-3-1/net/vif3.1", 24, 6),
                        ("vif-33-0/net/nb000002.0", 9999, 9999)):
        write(tmp_path, f"bus/xen-backend/devices/{vif}/statistics/rx_bytes", rx)
        write(tmp_path, f"bus/xen-backend/devices/{vif}/statistics/tx_bytes", tx)
    for vbd, rd, wr in (("vbd-3-51712", 8, 2), ("vbd-3-51728", 1, 1), ("vbd-31-51712", 7, 7)):
        write(tmp_path, f"bus/xen-backend/devices/{vbd}/statistics/rd_sect", rd)
        write(tmp_path, f"bus/xen-backend/devices/{vbd}/statistics/wr_sect", wr)
    assert counters(3, tmp_path) == {
        "net_rx_bytes": 56, "net_tx_bytes": 1024,  # the guest sent what its vifs received
        "disk_read_bytes": 9 * 512, "disk_write_bytes": 3 * 512}


def test_what_cannot_be_read_is_left_out(tmp_path):
    assert counters(5, tmp_path) == {}
    write(tmp_path, "bus/xen-backend/devices/vif-5-0/net/nb000003.0/statistics/rx_bytes",
          "garbage")
    write(tmp_path, "bus/xen-backend/devices/vif-5-0/net/nb000003.0/statistics/tx_bytes", 12)
    assert counters(5, tmp_path) == {"net_rx_bytes": 12}
