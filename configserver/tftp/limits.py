"""What one client address may hold of the TFTP server: bookkeeping only, no I/O, no clock.

Per address (all its transfers together) the service caps the number of transfers
(``max_transfers_per_client``) and the bytes their windows hold (``max_inflight_per_client``):
a transfer never has more than its window (blksize x windowsize, at most the file) sent and
not acknowledged, so the windows' sum bounds what the address can have in flight, and with
the bounded retransmission of ``transfer.py``, what a client that goes silent can make the
server send (issue 13). A new transfer's window is negotiated down to what is left.
"""

from __future__ import annotations

from dataclasses import dataclass

from configserver.tftp.options import TransferParameters


def window_bytes(params: TransferParameters, size: int) -> int:
    """The most a transfer of ``size`` bytes with ``params`` has in flight at once."""
    return min(params.windowsize * params.blksize, size)


@dataclass
class ClientShare:
    transfers: int = 0
    window_bytes: int = 0


class ClientShares:
    """Transfers and window bytes per client address, against the two per-address caps."""

    def __init__(self, *, max_transfers: int, max_window_bytes: int) -> None:
        self.max_transfers = max_transfers
        self.max_window_bytes = max_window_bytes
        self.shares: dict[str, ClientShare] = {}

    def __bool__(self) -> bool:
        return bool(self.shares)

    def transfers(self, address: str) -> int:
        share = self.shares.get(address)
        return share.transfers if share else 0

    def full(self, address: str) -> bool:
        """Whether ``address`` runs as many transfers as it may."""
        return self.transfers(address) >= self.max_transfers

    def room(self, address: str) -> int:
        """The window bytes a new transfer of ``address`` may still take."""
        share = self.shares.get(address)
        return self.max_window_bytes - (share.window_bytes if share else 0)

    def add(self, address: str, window: int) -> None:
        share = self.shares.setdefault(address, ClientShare())
        share.transfers += 1
        share.window_bytes += window

    def remove(self, address: str, window: int) -> None:
        share = self.shares.get(address)
        if share is None:
            return
        share.transfers -= 1
        share.window_bytes -= window
        if share.transfers <= 0:
            del self.shares[address]
