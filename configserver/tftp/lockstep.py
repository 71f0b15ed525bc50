"""Lock-step (windowsize 1) transfers on a blocking socket in a worker thread. Moves bytes only.

A client without ``windowsize`` (every PXE ROM, most clients) acknowledges each block before
it gets the next, so the transfer's speed is one round trip per block, and on the event loop
each round trip pays ``epoll_wait``, the loop's callback machinery and about 5 us of state
machine and packet building in CPython. Here the same ``TftpTransfer`` is driven from a
worker thread that sleeps in ``recvfrom`` on the transfer's own blocking socket: the kernel
wakes exactly this thread when the ACK arrives (``recv`` and ``send`` release the GIL, so
the event loop is not held up), and the hot path is one ``recv``, ``next_block`` and one
``send`` of a DATA packet laid out in place in a buffer filled by one ``preadv`` per 128 KiB
of the file. The socket is connected to the client (``server.open_connected_pair``), which
spares both calls an address; packets from other TIDs reach the pair's other socket, which
the event loop answers with ERROR 5. The retransmission timer is the socket's receive timeout
(SO_RCVTIMEO), set to just under the transfer's deadline and changed only when the deadline
moves by more than half a millisecond, and ``on_timeout`` runs once the deadline has passed: the
state machine, not this module, decides every retransmission, back-off and give-up, as it
does on the event loop.

The composing code (``service.py``) runs ``LockstepSender.run`` through
``loop.run_in_executor`` on an executor of a bounded number of threads, records what
``run`` left behind once it returns, and calls ``stop`` (from any thread) to end it early;
``stop`` shuts the socket's receive side down, which wakes a thread waiting in ``recv``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable

from configserver.tftp.codec import Error, ErrorCode, Opcode, parse
from configserver.tftp.transfer import TftpTransfer

log = logging.getLogger(__name__)

Address = tuple[str, int]
# Clients send only ACK and ERROR to a transfer socket; longer datagrams are cut, harmlessly.
_CLIENT_DATAGRAM = 1024
_SEND_BUFFER = 4 * 1024 * 1024
# File data read ahead per preadv, and at most this many blocks (preadv's IOV_MAX is 1024).
_READ_AHEAD = 128 * 1024
_MAX_SLOTS = 1024
# The receive timeout is left alone while it is at most this much shorter than the time
# left to the deadline (it is armed half of it shorter); expiring early only costs one more
# wait for the rest.
_TIMER_SLACK = 0.001
_TIMEVAL = struct.Struct("@ll")
_ACK, _ERROR = int(Opcode.ACK), int(Opcode.ERROR)

# Logs a packet that does not belong to the transfer (rate-limited by the caller).
StrayPacket = Callable[..., None]


class LockstepSender:
    """Runs one windowsize-1 transfer over ``sock``, connected to the client, until it ends.

    ``fd`` is the file's descriptor and ``transfer`` its state machine, which only this
    object touches between ``run`` and its return. After ``run``: ``read_error`` is the
    OSError that ended the transfer, if reading the file did.
    """

    def __init__(self, sock: socket.socket, client: Address, transfer: TftpTransfer, *,
                 fd: int, stray: StrayPacket,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if transfer.windowsize != 1:
            raise ValueError("a lock-step transfer has windowsize 1")
        self.client = client
        self.transfer = transfer
        self.read_error: OSError | None = None
        self._sock = sock
        self._fd = fd
        self._stray = stray
        self._clock = clock
        self._stopping = False
        self._timer = 0.0
        blksize = transfer.blksize
        self._blksize = blksize
        self._last_length = transfer.size - (transfer.block_count - 1) * blksize
        # Slot i holds the DATA packet of block first + i: 4 header bytes, then the data.
        self._slots = max(1, min(_MAX_SLOTS, _READ_AHEAD // blksize))
        self._slot = slot = 4 + blksize
        self._buffer = bytearray(self._slots * slot)
        self._view = view = memoryview(self._buffer)
        self._payloads = [view[i * slot + 4:(i + 1) * slot] for i in range(self._slots)]
        for i in range(self._slots):
            self._buffer[i * slot + 1] = Opcode.DATA
        self._first = 0  # block in slot 0; 0 while nothing is read

    def stop(self) -> None:
        """End the transfer soon (``run`` aborts it); safe from any thread, more than once."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        """Close the socket; only once ``run`` has returned."""
        self._sock.close()

    def run(self) -> None:
        """Serve the transfer from start to end (in a worker thread)."""
        transfer = self.transfer
        try:
            self._sock.setblocking(True)  # waits are bounded by SO_RCVTIMEO
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
            self._send(transfer.start(self._clock()))
            self._serve()
        except OSError as exc:
            # Reading the file failed (the socket's errors are handled where they happen).
            self.read_error = exc
            transfer.abort(f"read error: {exc}", self._clock())
            self._send([Error(ErrorCode.NOT_DEFINED, "server read error").encode()])

    def _serve(self) -> None:
        transfer, client = self.transfer, self.client
        recv, send, clock = self._sock.recv, self._sock.send, self._clock
        # The hot path's names, local: about a microsecond a block in all.
        buffer, view, slots, slot = self._buffer, self._view, self._slots, self._slot
        blksize, last_block, last_length = self._blksize, transfer.block_count, self._last_length
        next_block = transfer.next_block
        now = clock()
        while transfer.active:
            if self._stopping:
                transfer.abort("server stopping", now)
                return
            assert transfer.deadline is not None  # set while the transfer is active
            left = transfer.deadline - now
            if left <= 0:
                self._send(transfer.on_timeout(now))
                now = clock()
                continue
            if not 0 <= left - self._timer <= _TIMER_SLACK:
                self._set_timer(left)
            try:
                data = recv(_CLIENT_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                now = clock()  # the receive timeout expired: the loop checks the deadline
                continue
            except OSError as exc:
                # ECONNREFUSED: an ICMP error from a client that went away; like a loss.
                log.debug("TFTP transfer socket receive failed: %s", exc)
                now = clock()
                continue
            now = clock()
            if len(data) >= 4 and data[0] == 0 and data[1] == _ACK:
                block = next_block((data[2] << 8) | data[3], now)
                if not block:
                    continue
                # The DATA packet, in place in the read-ahead buffer: slot i holds block
                # first + i, its header's opcode already written.
                index = block - self._first
                if index >= slots or index < 0 or not self._first:
                    self._fill(block)
                    index = 0
                start = index * slot
                buffer[start + 2] = (block >> 8) & 0xFF
                buffer[start + 3] = block & 0xFF
                try:
                    send(view[start:start + 4 + (blksize if block < last_block
                                                 else last_length)])
                except (BlockingIOError, InterruptedError):
                    pass  # a full send buffer is a lost packet; the timer resends
                except OSError as exc:
                    log.debug("TFTP send to %s:%d failed: %s", *client, exc)
            elif len(data) >= 4 and data[0] == 0 and data[1] == _ERROR:
                packet = parse(data)
                assert isinstance(packet, Error)
                transfer.on_error(packet.code, packet.message, now)
            elif not self._stopping:  # (shut down, recv returns b"")
                self._stray("TFTP: unexpected %d-byte packet from %s:%d during a transfer; "
                            "dropped", len(data), *client)

    def _fill(self, block: int) -> None:
        offset = (block - 1) * self._blksize
        wanted = min(self._slots * self._blksize, self.transfer.size - offset)
        got = 0
        if wanted > 0:
            got = os.preadv(self._fd, self._payloads, offset)
        if got < wanted:
            # A short block would end the transfer early: the client would keep a truncated file.
            raise OSError(errno.EIO, f"file changed while being served (block {block})")
        self._first = block

    def _set_timer(self, left: float) -> None:
        """Arm the receive timeout to expire half the slack before ``left`` from now."""
        timer = left - _TIMER_SLACK / 2 if left > _TIMER_SLACK else left
        # SO_RCVTIMEO of zero means "wait forever": never arm less than a microsecond.
        micros = max(1, int(timer * 1e6))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                              _TIMEVAL.pack(*divmod(micros, 1_000_000)))
        self._timer = micros / 1e6

    def _send(self, datagrams: list[bytes]) -> None:
        for datagram in datagrams:
            try:
                self._sock.send(datagram)
            except OSError as exc:
                log.debug("TFTP send to %s:%d failed: %s", *self.client, exc)
                return
