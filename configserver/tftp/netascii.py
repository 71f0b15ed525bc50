"""Netascii (RFC 764 as used by RFC 1350) as a random-access view of a file, pure.

LF becomes CR LF and CR becomes CR NUL. The converted stream is produced sequentially from
the file and kept from ``keep`` bytes before the last read on, so a retransmitted window is
served from memory; reading further back restarts the conversion (correct, just slower).
"""

from __future__ import annotations

from collections.abc import Callable

_CHUNK = 64 * 1024


def to_netascii(raw: bytes) -> bytes:
    return raw.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


class NetasciiReader:
    """``read(offset, length)`` over the netascii form of a file read with ``read_raw``."""

    def __init__(self, read_raw: Callable[[int, int], bytes], raw_size: int) -> None:
        self._read_raw = read_raw
        self._raw_size = raw_size
        self.keep = _CHUNK
        size, position = raw_size, 0
        while position < raw_size:
            chunk = read_raw(position, min(_CHUNK, raw_size - position))
            if not chunk:
                break
            size += chunk.count(b"\n") + chunk.count(b"\r")
            position += len(chunk)
        self.size = size
        self._restart()

    def _restart(self) -> None:
        self._raw_position = 0
        self._start = 0
        self._buffer = bytearray()

    def read(self, offset: int, length: int) -> bytes:
        if offset < self._start:
            self._restart()
        while (self._start + len(self._buffer) < offset + length
               and self._raw_position < self._raw_size):
            chunk = self._read_raw(self._raw_position,
                                   min(_CHUNK, self._raw_size - self._raw_position))
            if not chunk:
                break
            self._raw_position += len(chunk)
            self._buffer += to_netascii(chunk)
        begin = offset - self._start
        result = bytes(self._buffer[begin:begin + length])
        drop = offset - self.keep - self._start
        if drop > 0:
            del self._buffer[:drop]
            self._start += drop
        return result
