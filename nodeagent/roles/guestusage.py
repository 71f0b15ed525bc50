"""A guest's network and disk byte counters, read from the dom0's sysfs.

Xen's backends count per domain: each of its vifs is the netback device ``vif-<domid>-<n>``
whose network device (``net/<name>``: ours are named after the MAC, see ``guestnet``) counts
bytes (what the guest sends is what the vif receives), and each of its disks is the blkback
device ``vbd-<domid>-<devid>``, whose ``statistics`` count 512-byte sectors read and
written. A new domain (a reboot, a move) starts them at zero; the config server adds what
grew (``configserver.cloud.guestreports``). Reading them is a few small files: no subprocess.
"""

from __future__ import annotations

from pathlib import Path

SYSFS = Path("/sys")
SECTOR = 512


def _read(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def counters(domid: int, sysfs: Path = SYSFS) -> dict[str, int]:
    """``net_rx_bytes``/``net_tx_bytes`` (as the guest sees them) and ``disk_read_bytes``/
    ``disk_write_bytes`` of domain ``domid``; a counter that cannot be read is left out."""
    found: dict[str, int] = {}
    backends = sysfs / "bus" / "xen-backend" / "devices"
    for vif in sorted(backends.glob(f"vif-{domid}-*/net/*")):
        stats = vif / "statistics"
        for name, file in (("net_rx_bytes", "tx_bytes"), ("net_tx_bytes", "rx_bytes")):
            value = _read(stats / file)
            if value is not None:
                found[name] = found.get(name, 0) + value
    for vbd in sorted(backends.glob(f"vbd-{domid}-*")):
        for name, file in (("disk_read_bytes", "rd_sect"), ("disk_write_bytes", "wr_sect")):
            value = _read(vbd / "statistics" / file)
            if value is not None:
                found[name] = found.get(name, 0) + value * SECTOR
    return found


__all__ = ["SECTOR", "counters"]
