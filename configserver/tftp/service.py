"""The TFTP service: answers read requests from the served roots, one transfer per client TID.

This is where the pieces meet: ``codec`` parses requests, ``files`` resolves and opens what
they name, ``options`` negotiates, ``transfer`` runs each transfer and ``server`` moves the
bytes. The service enforces the limits (all transfers; transfers and bytes in flight per
client address, ``limits``), turns each transfer into boot events of the node whose DHCP
lease holds the client address, and logs bad packets at a bounded rate before dropping them.

While every slot is taken, a new request takes the slot of the oldest transfer whose client
never answered (requests that nobody acknowledges, such as a flood from spoofed addresses,
would otherwise keep real clients out until they time out); such transfers also end on their
own after ``silent_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from configserver.config import ServerConfig, TftpConfig
from configserver.ratelog import RateLimitedLog
from configserver.tftp.codec import (
    Error,
    ErrorCode,
    Opcode,
    ReadRequest,
    TransferMode,
    WriteRequest,
    parse,
)
from configserver.tftp.errors import FileRefused, MalformedPacket, TftpSocketError
from configserver.tftp.files import Catalog, OpenFiles, ServedRoots, SharedFile
from configserver.tftp.limits import ClientShares, window_bytes
from configserver.tftp.lockstep import LockstepSender
from configserver.tftp.netascii import NetasciiReader
from configserver.tftp.options import negotiate
from configserver.tftp.server import (
    Address,
    RequestListener,
    TransferEndpoint,
    open_connected_pair,
    open_udp_socket,
)
from configserver.tftp.transfer import RetransmitPolicy, TftpTransfer

log = logging.getLogger(__name__)

# Netascii transfers convert the file to learn its size; larger files must use octet mode.
NETASCII_MAX = 1024 * 1024

ResolveMac = Callable[[str], str | None]
RecordEvent = Callable[[str, str, dict], None]
# Tells the event loop that an event is likely before a time (PollingSelector.expect).
ExpectEvent = Callable[[float], None]


class TransferSlot:
    """What the service keeps of every running transfer, wherever it runs (what
    ``TftpService.finish`` reads)."""

    def __init__(self, service: TftpService, client: Address, *, filename: str,
                 mac: str | None, shared: SharedFile, transfer: TftpTransfer) -> None:
        self.service = service
        self.client = client
        self.filename = filename
        self.mac = mac
        self.shared = shared
        self.transfer = transfer
        # What this transfer takes of its client address's bytes in flight.
        self.window_bytes = window_bytes(transfer.params, transfer.size)


class ActiveTransfer(TransferSlot):
    """One running transfer: its state machine, socket, file and timer."""

    def __init__(self, service: TftpService, client: Address, *, filename: str,
                 mac: str | None, shared: SharedFile, transfer: TftpTransfer,
                 local_address: str) -> None:
        super().__init__(service, client, filename=filename, mac=mac, shared=shared,
                         transfer=transfer)
        self._loop = service.loop
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.endpoint = TransferEndpoint.open(self._loop, local_address, service.interface,
                                              self.on_datagram)

    def begin(self) -> None:
        try:
            out = self.transfer.start(self._loop.time())
        except OSError as exc:
            self._read_failed(exc)
            return
        self.endpoint.send(out, self.client)
        self._poll_for_ack()
        self._rearm()

    def _read_failed(self, exc: OSError) -> None:
        """The file could not be read: tell the client, end the transfer, free its slot."""
        log.warning("TFTP: reading %r for %s:%d failed: %s", self.filename, *self.client, exc)
        self.transfer.abort(f"read error: {exc}", self._loop.time())
        self.endpoint.send([Error(ErrorCode.NOT_DEFINED, "server read error").encode()],
                           self.client)
        self.service.finish(self)

    def on_datagram(self, data: bytes, sender: Address) -> None:
        if sender != self.client:
            # RFC 1350: a packet from an unknown TID is answered, and the transfer goes on.
            self.endpoint.send([Error(ErrorCode.UNKNOWN_TID, "unknown transfer ID").encode()],
                               sender)
            self.service.bad_packets.warning("TFTP packet from unknown TID %s:%d (transfer of "
                                             "%s to %s:%d)", *sender, self.filename,
                                             *self.client)
            return
        transfer = self.transfer
        if len(data) >= 4 and data[0] == 0 and data[1] == Opcode.ACK:
            try:
                out = transfer.on_ack((data[2] << 8) | data[3], self._loop.time())
            except OSError as exc:
                self._read_failed(exc)
                return
            if out:
                self.endpoint.send(out, self.client)
                self._poll_for_ack()
        elif len(data) >= 4 and data[0] == 0 and data[1] == Opcode.ERROR:
            packet = parse(data)
            assert isinstance(packet, Error)
            transfer.on_error(packet.code, packet.message, self._loop.time())
        else:
            self.service.bad_packets.warning("TFTP: unexpected %d-byte packet from %s:%d "
                                             "during a transfer; dropped", len(data),
                                             *self.client)
            return
        if not transfer.active:
            self.service.finish(self)
            return
        deadline = transfer.deadline
        if deadline is not None and deadline < self._timer_at:
            self._rearm()

    def evict(self) -> None:
        """End the transfer at once to free its slot for another client."""
        self.transfer.abort("evicted: server full and the client never answered",
                            self._loop.time())
        self.endpoint.send([Error(ErrorCode.NOT_DEFINED, "server busy").encode()],
                           self.client)
        self.service.finish(self)

    def _poll_for_ack(self) -> None:
        """Wait for a quick client's next ACK by polling, not sleeping (see eventloop.py).

        Polling goes on for twice the smoothed round trip at most: long enough for an ACK
        that comes as usual, short enough not to burn much CPU time for one that is lost.
        """
        expect = self.service.expect_event
        if expect is not None:
            srtt = self.transfer.srtt
            if srtt is not None and srtt < self.service.config.busy_poll:
                expect(self._loop.time() + 2 * srtt)

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.transfer.deadline
        if deadline is not None:
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        transfer = self.transfer
        now = self._loop.time()
        if transfer.active and transfer.deadline is not None and transfer.deadline <= now:
            try:
                out = transfer.on_timeout(now)
            except OSError as exc:
                self._read_failed(exc)
                return
            if out:
                self.endpoint.send(out, self.client)
        if transfer.active:
            self._rearm()
        else:
            self.service.finish(self)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.endpoint.close()


class LockstepTransfer(TransferSlot):
    """One windowsize-1 transfer run by a worker thread (``lockstep.py``), not by the loop.

    The state machine belongs to the thread until ``ended`` is done.
    """

    def __init__(self, service: TftpService, client: Address, *, filename: str,
                 mac: str | None, shared: SharedFile, transfer: TftpTransfer,
                 local_address: str) -> None:
        super().__init__(service, client, filename=filename, mac=mac, shared=shared,
                         transfer=transfer)
        loop = service.loop

        def stray(message: str, *args: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(service.bad_packets.warning, message, *args)

        sock, others = open_connected_pair(local_address, service.interface, client)
        self.sender = LockstepSender(sock, client, transfer, fd=shared.fd, stray=stray)
        self.strangers = TransferEndpoint(loop, others, self._stranger)
        self.ended: asyncio.Future[None] | None = None

    def begin(self) -> None:
        # Through the loop's run_in_executor, so that a PollingEventLoop holds its polling
        # (which would keep this thread waiting for the GIL) while the thread runs.
        self.ended = self.service.loop.run_in_executor(self.service.lockstep_threads,
                                                       self.sender.run)
        self.ended.add_done_callback(self._ended)

    def _ended(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("TFTP lock-step transfer to %s:%d failed", *self.client,
                      exc_info=future.exception())
            self.transfer.abort("server error", self.service.loop.time())
        elif self.sender.read_error is not None:
            log.warning("TFTP: reading %r for %s:%d failed: %s", self.filename, *self.client,
                        self.sender.read_error)
        self.service.finish(self)

    def _stranger(self, data: bytes, sender: Address) -> None:
        if sender == self.client:
            return  # sent before the connected socket was (it cannot know the port yet)
        # RFC 1350: a packet from an unknown TID is answered, and the transfer goes on.
        self.strangers.send([Error(ErrorCode.UNKNOWN_TID, "unknown transfer ID").encode()],
                            sender)
        self.service.bad_packets.warning("TFTP packet from unknown TID %s:%d (transfer of "
                                         "%s to %s:%d)", *sender, self.filename, *self.client)

    def stop(self) -> None:
        self.sender.stop()

    def close(self) -> None:
        self.strangers.close()
        self.sender.close()


class TftpService:
    """The running TFTP server; ``close`` stops it and every transfer."""

    def __init__(self, config: TftpConfig, interface: str | None,
                 roots: Mapping[str, Path | Catalog], *,
                 resolve_mac: ResolveMac, record_event: RecordEvent,
                 loop: asyncio.AbstractEventLoop,
                 expect_event: ExpectEvent | None = None) -> None:
        self.config = config
        self.interface = interface
        self.loop = loop
        self.roots = ServedRoots(roots)
        self.files = OpenFiles()
        self.transfers: dict[Address, ActiveTransfer | LockstepTransfer] = {}
        # Windowsize-1 transfers run in these threads, up to config.lockstep_threads at once;
        # the others run on the event loop.
        self.lockstep_threads = ThreadPoolExecutor(max(1, config.lockstep_threads),
                                                   thread_name_prefix="tftp-lockstep")
        self.lockstep_running = 0
        self.per_client = ClientShares(max_transfers=config.max_transfers_per_client,
                                       max_window_bytes=config.max_inflight_per_client)
        # Transfers on the loop whose client has not answered (yet), oldest first; those
        # that have are dropped from it lazily (see _evict_unanswered).
        self.unanswered: dict[Address, ActiveTransfer] = {}
        self.bad_packets = RateLimitedLog(log)
        self.completed = 0
        self.failed = 0
        self.bytes_sent = 0  # acknowledged by the clients, transfers ended
        self.retransmissions = 0
        self.refused: Counter[int] = Counter()  # requests answered with an ERROR, by code
        self._resolve_mac = resolve_mac
        self._record_event = record_event
        self.expect_event = expect_event if config.busy_poll > 0 else None
        # atftp ignores a repeated block and re-ACKs only when its own 5 s timer expires,
        # which each ignored block restarts: after a lost ACK it answers only once our
        # back-off exceeds 5 s. Hence the long back-off ceiling (reached within `retries`
        # timeouts from the 20 ms minimum: the timer quadruples on each).
        self._policy = RetransmitPolicy(
            initial=config.timeout, minimum=min(config.min_timeout, config.timeout),
            maximum=8 * config.timeout, retries=config.retries,
            give_up_after=max(4 * config.timeout * config.retries, 30.0),
            silent_timeout=config.silent_timeout)
        self.listener: RequestListener | None = None

    def listen(self) -> None:
        address, port = self.config.bind_address, self.config.port
        try:
            sock = open_udp_socket(address, port, self.interface, pktinfo=True)
        except OSError as exc:
            where = f" on {self.interface}" if self.interface else ""
            raise TftpSocketError(f"cannot open TFTP port {address}:{port}{where}: {exc}",
                                  hint="TFTP needs root (or CAP_NET_BIND_SERVICE) and a free "
                                       "port; '--tftp off' turns it off") from exc
        self.listener = RequestListener(self.loop, sock, self.on_request)
        log.info("TFTP listening on %s:%d%s", *self.listener.address,
                 f" ({self.interface})" if self.interface else "")

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        threaded = [a for a in self.transfers.values() if isinstance(a, LockstepTransfer)]
        for active in threaded:
            active.stop()
        ended = [a.ended for a in threaded if a.ended is not None]
        if ended:
            await asyncio.wait(ended, timeout=10)
        for active in list(self.transfers.values()):
            if isinstance(active, ActiveTransfer):
                active.transfer.abort("server stopping", self.loop.time())
                self.finish(active)
        self.lockstep_threads.shutdown(wait=False)
        self.files.close()

    # -- requests --------------------------------------------------------------------------

    def on_request(self, data: bytes, client: Address, local_address: str) -> None:
        try:
            request = parse(data)
        except MalformedPacket as exc:
            self.bad_packets.warning("TFTP: malformed request from %s:%d dropped: %s",
                                     *client, exc)
            return
        if isinstance(request, WriteRequest):
            self._refuse(client, ErrorCode.ACCESS_VIOLATION, "read-only server")
            log.info("TFTP write request for %r from %s:%d refused", request.filename[:100],
                     *client)
            return
        if not isinstance(request, ReadRequest):
            self.bad_packets.warning("TFTP: %s packet from %s:%d on the request port dropped",
                                     type(request).__name__, *client)
            return
        if client in self.transfers:
            return  # a retransmitted request: the running transfer answers it
        if request.mode is TransferMode.MAIL:
            self._refuse(client, ErrorCode.ILLEGAL_OPERATION, "mail mode is not supported")
            return
        if self.per_client.full(client[0]):
            self._refuse(client, ErrorCode.NOT_DEFINED, "too many transfers from this client")
            self.bad_packets.warning("TFTP: client %s reached its limit of %d transfers",
                                     client[0], self.config.max_transfers_per_client)
            return
        if len(self.transfers) >= self.config.max_transfers and not self._evict_unanswered():
            self._refuse(client, ErrorCode.NOT_DEFINED, "server busy, try again later")
            self.bad_packets.warning("TFTP: %d transfers running, request from %s:%d refused",
                                     len(self.transfers), *client)
            return
        self._start(request, client, local_address)

    def _evict_unanswered(self) -> bool:
        """End the oldest transfer whose client never answered; False if there is none."""
        while self.unanswered:
            active = self.unanswered.pop(next(iter(self.unanswered)))
            if active.transfer.active and not active.transfer.answered:
                self.bad_packets.warning("TFTP: %d transfers running; the oldest that was "
                                         "never answered (%s:%d) makes room",
                                         len(self.transfers), *active.client)
                active.evict()
                return True
        return False

    def _start(self, request: ReadRequest, client: Address, local_address: str) -> None:
        try:
            path = self.roots.resolve(request.filename)
            shared = self.files.acquire(path)
        except FileRefused as exc:
            log.info("TFTP request for %r from %s:%d refused: %s", request.filename[:100],
                     *client, exc.message)
            self._refuse(client, exc.tftp_code, exc.message)
            return
        read, size = shared.read, shared.size
        if request.mode is TransferMode.NETASCII:
            # Netascii's size is known only after converting the whole file, so it is
            # offered for small text files only; boot files are fetched in octet mode.
            if shared.size > NETASCII_MAX:
                self.files.release(shared)
                self._refuse(client, ErrorCode.NOT_DEFINED,
                             f"netascii only for files up to {NETASCII_MAX} bytes; use octet")
                return
            try:
                reader = NetasciiReader(shared.read, shared.size)
            except OSError as exc:
                self.files.release(shared)
                log.warning("TFTP: reading %r failed: %s", request.filename, exc)
                self._refuse(client, ErrorCode.NOT_DEFINED, "server read error")
                return
            read, size = reader.read, reader.size
        room = self.per_client.room(client[0])
        params = negotiate(request.options, size, max_blksize=self.config.max_blksize,
                           max_windowsize=self.config.max_windowsize, max_window_bytes=room)
        if window_bytes(params, size) > room:
            self.files.release(shared)
            self._refuse(client, ErrorCode.NOT_DEFINED, "too much data in flight to this client")
            self.bad_packets.warning("TFTP: client %s has %d bytes in flight, its limit; "
                                     "request refused", client[0],
                                     self.config.max_inflight_per_client - room)
            return
        if request.mode is TransferMode.NETASCII:
            reader.keep = params.windowsize * params.blksize
        transfer = TftpTransfer(size, params, read, policy=self._policy, now=self.loop.time())
        mac = self._mac_of(client[0])
        kind: type[ActiveTransfer | LockstepTransfer] = ActiveTransfer
        if (params.windowsize == 1 and request.mode is TransferMode.OCTET
                and self.lockstep_running < self.config.lockstep_threads):
            kind = LockstepTransfer
        try:
            active = kind(self, client, filename=request.filename, mac=mac, shared=shared,
                          transfer=transfer, local_address=local_address)
        except OSError as exc:
            self.files.release(shared)
            log.warning("TFTP: cannot open a transfer socket for %s:%d: %s", *client, exc)
            self._refuse(client, ErrorCode.NOT_DEFINED, "server cannot start the transfer")
            return
        self.transfers[client] = active
        self.per_client.add(client[0], active.window_bytes)
        if isinstance(active, LockstepTransfer):
            self.lockstep_running += 1
        else:
            self.unanswered[client] = active
        log.debug("TFTP %s:%d (%s) reads %r: %d bytes, blksize %d, windowsize %d", *client,
                  mac or "unknown MAC", request.filename, size, params.blksize,
                  params.windowsize)
        self._event(mac, "tftp.start", {"file": request.filename, "bytes": size,
                                        "seconds": 0.0, "client": client[0]})
        active.begin()

    def finish(self, active: ActiveTransfer | LockstepTransfer) -> None:
        """Tear down a transfer that ended (or is being aborted) and record how it went."""
        if self.transfers.get(active.client) is not active:
            return
        del self.transfers[active.client]
        if isinstance(active, LockstepTransfer):
            self.lockstep_running -= 1
        self.unanswered.pop(active.client, None)
        self.per_client.remove(active.client[0], active.window_bytes)
        active.close()
        self.files.release(active.shared)
        transfer = active.transfer
        self.bytes_sent += transfer.bytes_acknowledged
        self.retransmissions += transfer.retransmissions
        seconds = round((transfer.finished or self.loop.time()) - transfer.started, 3)
        details = {"file": active.filename, "bytes": transfer.bytes_acknowledged,
                   "seconds": seconds, "client": active.client[0]}
        if transfer.finished_ok:
            self.completed += 1
            log.info("TFTP sent %r to %s (%s): %d bytes in %.3f s, %d retransmissions",
                     active.filename, active.client[0], active.mac or "unknown MAC",
                     transfer.size, seconds, transfer.retransmissions)
            self._event(active.mac, "tftp.done", details)
        else:
            self.failed += 1
            log.info("TFTP transfer of %r to %s (%s) failed: %s", active.filename,
                     active.client[0], active.mac or "unknown MAC", transfer.failure)
            self._event(active.mac, "tftp.error", {**details, "error": transfer.failure})

    # -- helpers ---------------------------------------------------------------------------

    def _refuse(self, client: Address, code: int, message: str) -> None:
        self.refused[int(code)] += 1
        if self.listener is not None:
            self.listener.send(Error(code, message).encode(), client)

    def _mac_of(self, client_ip: str) -> str | None:
        try:
            return self._resolve_mac(client_ip)
        except Exception:
            log.exception("TFTP: resolving the MAC of %s failed", client_ip)
            return None

    def _event(self, mac: str | None, kind: str, details: dict) -> None:
        if mac is None:
            return
        try:
            self._record_event(mac, kind, details)
        except Exception:
            log.exception("TFTP: recording %s for %s failed", kind, mac)


async def start_tftp(config: ServerConfig, roots: Mapping[str, Path | Catalog], *,
                     resolve_mac: ResolveMac, record_event: RecordEvent,
                     expect_event: ExpectEvent | None = None) -> TftpService:
    """Start serving ``roots`` over TFTP as ``config.tftp`` says; close the result to stop.

    ``expect_event`` (the loop's ``PollingSelector.expect``, when it has one) lets quick
    lock-step clients be waited for by polling.
    """
    service = TftpService(config.tftp, config.interface, roots, resolve_mac=resolve_mac,
                          record_event=record_event, loop=asyncio.get_running_loop(),
                          expect_event=expect_event)
    service.listen()
    return service
