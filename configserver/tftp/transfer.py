"""One read transfer as a state machine: events in, datagrams to send and a deadline out.

``TftpTransfer`` does no I/O of its own: the file is read through the ``read`` callable it is
given (``os.pread`` on a shared descriptor in the server, a bytes slice in tests), the caller
sends the datagrams the event methods return and calls ``on_timeout`` once ``deadline`` passes.
Time is always passed in, so tests drive it with a fake clock.

Blocks are numbered from 1 in absolute terms; the wire carries the number modulo 65536 (after
65535 comes 0, as tftp-hpa, atftp, curl and iPXE expect). A file of ``size`` bytes takes
``size // blksize + 1`` blocks: the last one is shorter than blksize, possibly empty.

Windows follow RFC 7440: up to ``windowsize`` blocks are sent, the client acknowledges the
last block it received in order, and the next window starts after it. An acknowledgement of
anything already acknowledged is ignored (no Sorcerer's Apprentice resend); a lost block or
ACK is repaired by the retransmission timer. Without a client-chosen timeout (RFC 2349) the
timer adapts to the measured round trip (RFC 6298 style, Karn's rule), bounded by
``RetransmitPolicy``.

Each timeout doubles the timer (up to ``maximum``), and the transfer gives up after
``retries`` timeouts in a row *and* at least ``give_up_after`` seconds without progress. The
first timeout resends the whole window; further timeouts in a row resend only its first and
last blocks (a probe, much as TCP resends one segment after a timeout). A client that went
silent once used to get the whole window on each of a dozen timeouts (issue 13: 16.8 MB each
with blksize 65464 and windowsize 256); now it gets the window twice and two blocks per
further timeout, and the window itself is bounded at negotiation (``options.negotiate``).
Those two blocks are what a client still missing something needs: one that lacks the first
block can only say so with a duplicate ACK, which is ignored, and one that lacks only the
last cannot know the window is over; a client that has both acknowledges on its own timer
(atftp, after 5 s of silence). A transfer whose client never answered at all (no ACK of the
OACK or of block 1) gives up after ``silent_timeout`` seconds, sooner: it holds a slot that
a real client may need.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable
from dataclasses import dataclass

from configserver.tftp.codec import Error, ErrorCode, OptionAck, data_header
from configserver.tftp.options import TransferParameters


class Phase(enum.Enum):
    OACK_SENT = "oack-sent"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class RetransmitPolicy:
    initial: float = 1.0
    minimum: float = 0.02
    maximum: float = 1.0
    retries: int = 5
    give_up_after: float = 5.0
    silent_timeout: float = 3.0


class TftpTransfer:
    """The server side of one read transfer."""

    def __init__(self, size: int, params: TransferParameters, read: Callable[[int, int], bytes],
                 *, policy: RetransmitPolicy = RetransmitPolicy(), now: float) -> None:
        self.size = size
        self.params = params
        self.blksize = params.blksize
        self.windowsize = params.windowsize
        self.block_count = size // params.blksize + 1
        self._read = read
        self._policy = policy
        self.phase = Phase.OACK_SENT if params.oack else Phase.SENDING
        # True until DONE or FAILED (a plain attribute: the hot path reads it per packet).
        self.active = True
        self.failure: str | None = None
        # First block not yet acknowledged, and the highest block sent in the current window.
        self.base = 1
        self.sent_high = 0
        self.started = now
        self.finished: float | None = None
        self.retransmissions = 0
        self._fixed_rto = float(params.timeout) if params.timeout else None
        self._rto = self._fixed_rto or policy.initial
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._timeouts = 0
        self._backed_off = False
        self._last_progress = now
        self._oack_acknowledged = False
        self._window_sent_at = now
        self._window_retransmitted = False
        self.deadline: float | None = None

    # -- queries ---------------------------------------------------------------------------

    @property
    def finished_ok(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def bytes_acknowledged(self) -> int:
        return min(self.size, (self.base - 1) * self.blksize)

    @property
    def answered(self) -> bool:
        """Whether the client acknowledged anything (the OACK, or a block) yet."""
        return self.base > 1 or self._oack_acknowledged

    @property
    def rto(self) -> float:
        return self._rto

    @property
    def srtt(self) -> float | None:
        """The smoothed round trip in seconds, None before the first sample."""
        return self._srtt

    # -- events ----------------------------------------------------------------------------

    def start(self, now: float) -> list[bytes]:
        """The datagrams that answer the request: the OACK, or the first window."""
        if self.phase is Phase.OACK_SENT:
            self._arm(now, retransmitted=False)
            return [OptionAck(self.params.oack).encode()]
        return self._send_window(now, retransmitted=False)

    def on_ack(self, block: int, now: float) -> list[bytes]:
        """An ACK from the client's TID; returns what to send next (often nothing)."""
        if self._acknowledge(block, now):
            return self._send_window(now, retransmitted=False)
        return []

    def next_block(self, block: int, now: float) -> int:
        """``on_ack`` for a caller that builds the DATA packets itself (windowsize 1 only).

        The same state change as ``on_ack``; returns the number of the one block to send
        now, or 0 when there is nothing to send. It spares the lock-step hot path reading
        the file and building the packet one block at a time (``lockstep.py``).
        """
        if self._acknowledge(block, now):
            self.sent_high = base = self.base
            self._window_sent_at = now
            self._window_retransmitted = False
            self.deadline = now + self._rto
            return base
        return 0

    def on_error(self, code: int, message: str, now: float) -> None:
        """The client aborted the transfer (e.g. ERROR 8 refusing our OACK)."""
        if self.active:
            self.failure = f"client error {code}: {message[:80]}"
            self._finish(Phase.FAILED, now)

    def on_timeout(self, now: float) -> list[bytes]:
        """Call when ``deadline`` has passed; retransmits, or gives up and says so."""
        if not self.active or self.deadline is None or now < self.deadline:
            return []
        self._timeouts += 1
        policy = self._policy
        if not self.answered and now >= self.started + policy.silent_timeout:
            self.failure = "client never answered"
        elif (self._timeouts > policy.retries
                and now - self._last_progress >= policy.give_up_after):
            self.failure = "client stopped answering"
        if self.failure is not None:
            self._finish(Phase.FAILED, now)
            return [Error(ErrorCode.NOT_DEFINED, "timeout").encode()]
        if self._fixed_rto is None:
            self._rto = min(self._rto * 2, policy.maximum)
            self._backed_off = True
        self.retransmissions += 1
        if self.phase is Phase.OACK_SENT:
            self._arm(now, retransmitted=True)
            return [OptionAck(self.params.oack).encode()]
        if self._timeouts > 1 and self.windowsize > 1:
            # A probe: the window's first and last blocks; the others stay sent.
            self._arm(now, retransmitted=True)
            probe = sorted({self.base, self.sent_high})
            return [self.packet(block) for block in probe]
        return self._send_window(now, retransmitted=True)

    def abort(self, reason: str, now: float) -> None:
        if self.active:
            self.failure = reason
            self._finish(Phase.FAILED, now)

    # -- internals -------------------------------------------------------------------------

    def _acknowledge(self, block: int, now: float) -> bool:
        """Apply an ACK; True when the next window is to be sent now."""
        if self.phase is not Phase.SENDING:
            if self.phase is not Phase.OACK_SENT or block != 0:
                return False
            self._sample_rtt(now)
            self.phase = Phase.SENDING
            self._oack_acknowledged = True
            self._timeouts = 0
            self._last_progress = now
            return True
        last_acked = self.base - 1
        delta = (block - last_acked) & 0xFFFF
        if delta == 0 or delta > self.sent_high - last_acked:
            return False  # duplicate or stale: the timer, not the ACK, repairs losses
        acked = last_acked + delta
        # One RTT sample per window, and per 8 blocks in lock-step (plenty, and cheaper),
        # but at once after a back-off, so that one loss does not slow the next blocks.
        if acked == self.sent_high and (self.windowsize > 1 or self._backed_off
                                        or not acked & 7):
            self._sample_rtt(now)
        self.base = acked + 1
        self._timeouts = 0
        self._last_progress = now
        if acked >= self.block_count:
            self._finish(Phase.DONE, now)
            return False
        return True

    def packet(self, block: int) -> bytes:
        """The DATA datagram of absolute block ``block`` (1-based)."""
        offset = (block - 1) * self.blksize
        length = max(0, min(self.blksize, self.size - offset))
        payload = self._read(offset, length) if length else b""
        if len(payload) != length:
            # A short block would end the transfer early: the client would keep a truncated file.
            raise OSError(errno.EIO, f"file changed while being served (block {block})")
        return data_header(block) + payload

    def _send_window(self, now: float, *, retransmitted: bool) -> list[bytes]:
        last = min(self.base + self.windowsize - 1, self.block_count)
        self.sent_high = last
        self._arm(now, retransmitted=retransmitted)
        return [self.packet(n) for n in range(self.base, last + 1)]

    def _arm(self, now: float, *, retransmitted: bool) -> None:
        if not retransmitted:
            self._window_sent_at = now
            self._window_retransmitted = False
        else:
            self._window_retransmitted = True
        deadline = now + self._rto
        if not self.answered:
            deadline = min(deadline, self.started + self._policy.silent_timeout)
        self.deadline = deadline

    def _sample_rtt(self, now: float) -> None:
        if self._window_retransmitted:
            return  # Karn: an ACK of a retransmitted window says nothing about the RTT
        sample = max(0.0, now - self._window_sent_at)
        if self._srtt is None:
            self._srtt, self._rttvar = sample, sample / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - sample)
            self._srtt = 0.875 * self._srtt + 0.125 * sample
        if self._fixed_rto is not None:
            return  # the client chose the timeout (RFC 2349); the RTT only informs polling
        self._backed_off = False
        rto = self._srtt + 4 * self._rttvar
        self._rto = min(max(rto, self._policy.minimum), self._policy.maximum)

    def _finish(self, phase: Phase, now: float) -> None:
        self.phase = phase
        self.active = False
        self.finished = now
        self.deadline = None
