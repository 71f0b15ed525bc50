"""Option negotiation for read requests (RFC 2347, 2348, 2349, 7440), pure.

The server answers only the options it accepts, in request order; an option it does not know,
or whose value is malformed or out of the RFC's range, is left out of the OACK (RFC 2347: the
server "may ignore" it) and the transfer proceeds with the default. Values above what this
server allows are lowered, which RFC 2348 and RFC 7440 permit for blksize and windowsize.
``tsize`` is declined for an empty file: curl (7.88, Debian bookworm) takes ``tsize 0`` in an OACK
for an illegal operation and aborts, and a client that asked for the size loses nothing when
the first DATA block is empty anyway.
When no option is accepted there is no OACK and the first DATA block answers the request.

``max_window_bytes`` bounds what one window may hold (blksize x windowsize: what is in flight
before the client acknowledges): windowsize is lowered to fit, and blksize too when not even
one block fits, though not below 512 (or what the client asked for, if less); the caller
checks the result, which may still not fit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from configserver.tftp.codec import DEFAULT_BLKSIZE

BLKSIZE_MIN, BLKSIZE_MAX = 8, 65464
TIMEOUT_MIN, TIMEOUT_MAX = 1, 255
WINDOWSIZE_MIN, WINDOWSIZE_MAX = 1, 65535


@dataclass(frozen=True)
class TransferParameters:
    """What a read transfer runs with after negotiation."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    # Seconds the client asked for (RFC 2349); None lets the server pick an adaptive timeout.
    timeout: int | None = None
    # The OACK to send first; empty when no option was accepted.
    oack: tuple[tuple[str, str], ...] = ()


def _number(text: str) -> int | None:
    """A decimal option value, or None if it is not one (no signs, spaces or exponents)."""
    if not text or len(text) > 20 or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def negotiate(options: Iterable[tuple[str, str]], file_size: int, *,
              max_blksize: int = BLKSIZE_MAX,
              max_windowsize: int = WINDOWSIZE_MAX,
              max_window_bytes: int | None = None) -> TransferParameters:
    """Decide the parameters of a read transfer of a ``file_size``-byte file."""
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, None
    accepted: list[str] = []
    seen: set[str] = set()
    for name, value in options:
        if name in seen:
            continue  # the first occurrence of an option counts
        seen.add(name)
        number = _number(value)
        if number is None:
            continue
        if name == "blksize" and number >= BLKSIZE_MIN:
            blksize = min(number, BLKSIZE_MAX, max_blksize)
        elif name == "tsize" and file_size:
            pass
        elif name == "timeout" and TIMEOUT_MIN <= number <= TIMEOUT_MAX:
            timeout = number
        elif name == "windowsize" and number >= WINDOWSIZE_MIN:
            windowsize = min(number, WINDOWSIZE_MAX, max_windowsize)
        else:
            continue
        accepted.append(name)
    if max_window_bytes is not None:
        blksize = max(min(blksize, max_window_bytes), min(blksize, DEFAULT_BLKSIZE))
        windowsize = max(1, min(windowsize, max_window_bytes // blksize))
    values = {"blksize": blksize, "tsize": file_size, "timeout": timeout,
              "windowsize": windowsize}
    return TransferParameters(blksize=blksize, windowsize=windowsize, timeout=timeout,
                              oack=tuple((name, str(values[name])) for name in accepted))
