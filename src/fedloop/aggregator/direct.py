"""Large request bodies read by the socket straight into the application's buffer.

uvicorn hands a request body to the application in the pieces its parser saw, and copies each
piece four times on the way (the event loop's bytes, the parser's slice, the request's
bytearray, the ``bytes`` of the ASGI message) before `read_body` copies it into the pooled
buffer; reading also stops and restarts every 64 KiB. For a 4 MB model upload on loopback that
is 4.2 ms of the server's CPU; read straight into the buffer, 0.7 ms (docs/performance.md,
seventh pass).

`protocol_class()` is uvicorn's httptools protocol with one addition. A request whose body
has a Content-Length of at least `DIRECT_MIN` bytes gets an object in its ASGI scope,
``scope["extensions"][EXTENSION]`` (a `DirectBody`). An application that wants the body calls
`DirectBody.read_into` with a buffer of exactly that size, after its own checks (a request it
refuses is answered without its body being read, as before). The connection's transport then
talks to a `_BodySink`, an `asyncio.BufferedProtocol` whose buffer is the rest of the
application's, until the body is complete; the HTTP protocol then takes the connection back
with a fresh parser for the next request. An application that never calls it gets the body
from ``receive()`` as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect

EXTENSION = "fedloop.direct_body"

# Smaller bodies arrive in one or two reads: the usual path costs nothing worth avoiding.
DIRECT_MIN = 256 * 1024


class DirectBody:
    """The body of one request, not yet read: `read_into` reads it into a caller's buffer."""

    def __init__(self, protocol: Any, cycle: Any, size: int) -> None:
        # protocol: a `protocol_class()` instance; cycle: its uvicorn RequestResponseCycle.
        self._protocol = protocol
        self._cycle = cycle
        self.size = size
        self._used = False

    async def read_into(
        self, target: memoryview, on_data: Callable[[memoryview], object] | None = None
    ) -> None:
        """Fill `target` (exactly `size` bytes) with the body; `on_data` sees each piece once.

        Raises `ClientDisconnect` if the client goes before the body is complete.
        """
        if self._used:
            raise RuntimeError("the body was already read")
        if target.nbytes != self.size:
            raise ValueError(f"the buffer holds {target.nbytes} bytes, the body {self.size}")
        self._used = True
        cycle, protocol = self._cycle, self._protocol
        if cycle.disconnected:
            raise ClientDisconnect()
        transport = protocol.transport
        if cycle.waiting_for_100_continue and not transport.is_closing():
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        # What the parser already passed on (the rest of the read that held the headers).
        early = len(cycle.body)
        target[:early] = cycle.body
        cycle.body = bytearray()
        if on_data is not None and early:
            on_data(target[:early])
        if early < self.size:
            done: asyncio.Future[None] = protocol.loop.create_future()
            transport.set_protocol(_BodySink(protocol, target, early, on_data, done))
            protocol.flow.resume_reading()
            await done
            cycle.more_body = False
        # A later receive() (a disconnect check) finds the request complete.
        cycle.message_event.set()


class _BodySink(asyncio.BufferedProtocol):
    """The connection's protocol while a body is read into `target[filled:]`."""

    def __init__(
        self,
        owner: Any,
        target: memoryview,
        filled: int,
        on_data: Callable[[memoryview], object] | None,
        done: asyncio.Future[None],
    ) -> None:
        self.owner = owner
        self.target = target
        self.filled = filled
        self.on_data = on_data
        self.done = done

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.target[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.on_data is not None:
            self.on_data(self.target[self.filled : self.filled + nbytes])
        self.filled += nbytes
        self.owner.direct_body_read()
        if self.filled == self.target.nbytes and not self.done.done():
            # Before the next read reaches it: the old parser still counts the body bytes it
            # did not see, so the next request starts with a new one.
            self.owner.parser = self.owner.new_parser()
            self.owner.transport.set_protocol(self.owner)
            self.owner.direct_body_complete()
            self.done.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connection_lost(exc)
        if not self.done.done():
            self.done.set_exception(ClientDisconnect())

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()


@functools.cache
def protocol_class() -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, offering large bodies as a `DirectBody` (module doc).

    Needs httptools (imported here, so that this module loads without it).
    """
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class DirectBodyProtocol(HttpToolsProtocol):
        def new_parser(self) -> httptools.HttpRequestParser:
            parser = httptools.HttpRequestParser(self)
            with contextlib.suppress(AttributeError):  # httptools < 0.6.3 has no leniencies
                parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn
            return parser

        def on_headers_complete(self) -> None:
            before = self.cycle
            super().on_headers_complete()
            cycle = self.cycle
            # Not for upgrades (no new cycle), nor a request queued behind a pipelined one.
            if cycle is before or self.pipeline or self.scope["method"] not in ("POST", "PUT"):
                return
            size = _content_length(self.headers)
            if size is None or size < DIRECT_MIN:
                return
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[EXTENSION] = DirectBody(self, cycle, size)

        # Told of a direct body's progress, for subclasses that watch the connection
        # (`guard.protocol_class`): its parser sees neither those bytes nor the body's end.
        def direct_body_read(self) -> None:
            """Bytes of a direct body arrived."""

        def direct_body_complete(self) -> None:
            """The direct body is complete; the connection is this protocol's again."""

    return DirectBodyProtocol


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The request's Content-Length, or None when it has none or is chunked."""
    size = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            try:
                size = int(value)
            except ValueError:
                return None
    return size
