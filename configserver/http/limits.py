"""HTTP resource limits: idle and slow connections, and request bodies before they are read.

* **Idle connections and slow heads** (``keepalive_timeout``): aiohttp's keep-alive timer runs
  from the moment a connection is made and again after every answer; a connection that has not
  delivered a whole request head by then is closed. That covers a client that connects and
  sends nothing, a keep-alive connection left open, and a head trickled a byte at a time.
* **Slow bodies** (``body_timeout``): once the head is in, the whole body must arrive within
  this many seconds, or the answer is 408 and the connection closes. Answers themselves (an
  initramfs to a slow link) are not limited.
* **Bodies before reading**: a route's limit is checked against ``Content-Length`` before any
  byte of the body is read, and while reading when there is none (chunked); a route may also
  check credentials first (``expect_handler``), so that a client sending
  ``Expect: 100-continue`` is refused before it sends the body at all. An answer to a request
  whose body was left unread closes the connection: a client that sends the body anyway has
  at most ``LINGER`` seconds of it discarded, unparsed, so that it sees the answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion11

from configserver.config import HttpConfig
from configserver.errors import ExpectationFailed, NetbootError, RequestTimeout, RequestTooLarge
from configserver.http.appkeys import CONFIG

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Check = Callable[[web.Request], Awaitable[None]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
READ_CHUNK = 64 * 1024
LINGER = 2.0


def runner_options(http: HttpConfig) -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner`` (handed on to each connection's handler)."""
    return {"keepalive_timeout": http.keepalive_timeout,
            # After an answer to a request whose body was not read, the rest is discarded
            # (not parsed, not kept) for at most this long, so that the client sees the answer
            # rather than a reset; then the connection closes (aiohttp's default is 10 s).
            "lingering_time": LINGER,
            # Request line and each header line (aiohttp's defaults, stated here).
            "max_line_size": 8190, "max_field_size": 8190}


def error_response(error: NetbootError) -> web.Response:
    """The JSON error answer, closing the connection (its body may be unread)."""
    response = web.json_response(error.to_json(), status=error.status)
    response.force_close()
    return response


@web.middleware
async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """408 for a request whose body has not fully arrived ``body_timeout`` after its head;
    no limit once it has. Outermost middleware: it also sees the error answers."""
    if request.content.is_eof():
        response = await handler(request)
    else:
        loop = asyncio.get_running_loop()
        limit = request.app[CONFIG].http.body_timeout
        try:
            async with asyncio.timeout(None) as deadline:
                timer = loop.call_later(limit, _expire_unless_received, request, deadline)
                try:
                    response = await handler(request)
                finally:
                    timer.cancel()
        except TimeoutError:
            log.info("%s %s from %s: body not received within %.0fs", request.method,
                     request.path, request.remote, limit)
            return error_response(RequestTimeout(
                f"request body not received within {limit:.0f} seconds"))
    if not request.content.is_eof():
        # Refused without reading (all of) its body: the connection closes after the answer.
        response.force_close()
    return response


def _expire_unless_received(request: web.Request, deadline: asyncio.Timeout) -> None:
    if not request.content.is_eof():
        deadline.reschedule(asyncio.get_running_loop().time())


def check_length(request: web.Request, limit: int) -> None:
    """Refuse a declared body larger than ``limit`` before reading any of it."""
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(f"request body of {request.content_length} bytes is larger than "
                              f"the {limit} bytes this request takes")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, never more than ``limit`` bytes of it (with or without a length)."""
    check_length(request, limit)
    body = bytearray()
    async for chunk in request.content.iter_chunked(READ_CHUNK):
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(f"request body larger than the {limit} bytes this request "
                                  "takes")
    return bytes(body)


def expect_handler(limit: int, check: Check | None = None) -> ExpectHandler:
    """For ``Expect: 100-continue``: refuse a body over ``limit`` or a request ``check``
    refuses (with its NetbootError) before telling the client to send the body."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version != HttpVersion11:
            return None
        if request.headers.get("Expect", "").lower() != "100-continue":
            return error_response(ExpectationFailed(
                f"unknown Expect: {request.headers.get('Expect', '')[:64]}"))
        try:
            check_length(request, limit)
            if check is not None:
                await check(request)
        except NetbootError as exc:
            return error_response(exc)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own size starts after this line
        return None

    return expect
