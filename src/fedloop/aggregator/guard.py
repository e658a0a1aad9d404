"""Limits on what one HTTP connection may cost the aggregator, before and while it sends a request.

uvicorn's httptools protocol buffers a request's head (request line and headers) without any
limit, waits for it forever, waits forever between the pieces of a body, and accepts connections
until the process runs out of open files. A stranger can make it do each of these before any
token is looked at: one endless header value grew an aggregator by 589 MB, and 746 connections
that never finished their heads left it unable to answer anyone (docs/security.md,
"Connections"). `protocol_class(limits)` is the aggregator's protocol (`direct.protocol_class`)
with four limits added:

- a head over `max_head_bytes` is answered 431 and its connection closed, whatever it says;
- a head not complete `head_timeout` seconds after its connection opened (on a kept-alive
  connection: after its first byte) is answered 408 and closed;
- a body that gets no byte for `body_idle_timeout` seconds while the aggregator reads it is
  answered 408 (unless an answer is on its way) and closed. An idle timeout, not a total one: an
  upload that keeps sending is never cut, however large and slow; time the aggregator itself
  stops reading (a full buffer, an upload waiting its turn) does not count;
- once more than `max_connections` are open, a new one closes the connection that has waited
  longest for a request head (a half-sent head, or a kept-alive connection between requests),
  or itself when none is waiting. Connections in a request (an upload, a long poll) and
  WebSockets are never closed for a newcomer.

A long poll or a model download is past its head and its (empty) body, so no limit here touches
it, nor a WebSocket, which leaves this protocol at its upgrade.
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fedloop.aggregator import direct
from fedloop.protocol.messages import ErrorResponse

log = logging.getLogger("fedloop.aggregator")

# A connection's phase: waiting for or reading a request head; reading its body; the request
# complete (being answered); handed over (WebSocket) or closed.
_HEAD, _BODY, _AFTER, _GONE = range(4)

# Open file descriptors the aggregator needs besides its connections (database, blobs being
# written, logs, the event loop's own): the default connection cap leaves them free.
FD_RESERVE = 64

# Seconds between two log lines about connections closed for the same reason.
_LOG_EVERY = 60.0


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may take: see the module's docstring."""

    max_head_bytes: int = 64 * 1024
    head_timeout: float = 20.0
    body_idle_timeout: float = 60.0
    max_connections: int = 1000


def default_max_connections() -> int:
    """Return the connection cap that leaves `FD_RESERVE` of the process's open files free."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 1000
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(16, soft - FD_RESERVE)


class _Server:
    """One server's connections waiting for a request head (oldest first), and its log lines."""

    def __init__(self) -> None:
        self.waiting: OrderedDict[Any, None] = OrderedDict()
        self._logged: dict[str, tuple[float, int]] = {}

    def note(self, loop: asyncio.AbstractEventLoop, reason: str, message: str) -> None:
        """Log `message` once a minute at most for each `reason`, with how many were not."""
        now = loop.time()
        last, held = self._logged.get(reason, (-math.inf, 0))
        if now - last < _LOG_EVERY:
            self._logged[reason] = (last, held + 1)
            return
        self._logged[reason] = (now, 0)
        more = f" ({held} more like it since the last such line)" if held else ""
        log.warning("%s%s", message, more)


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a head over the limit."""


# Each uvicorn server's state, by its `ServerState`.
_servers: weakref.WeakKeyDictionary[Any, _Server] = weakref.WeakKeyDictionary()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"


def _answer(status: int, code: str, detail: str) -> bytes:
    body = ErrorResponse(error=code, detail=detail).model_dump_json().encode()
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


@functools.cache
def protocol_class(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """The aggregator's httptools protocol with `limits` on each connection (module doc).

    Needs httptools, as `direct.protocol_class` does.
    """
    import httptools
    from uvicorn.protocols.http.flow_control import FlowControl

    base: Any = direct.protocol_class()

    class _Flow(FlowControl):
        """uvicorn's flow control, telling its connection when reading starts again."""

        def __init__(self, transport: asyncio.Transport, owner: Any) -> None:
            super().__init__(transport)
            self._owner = owner

        def resume_reading(self) -> None:
            if self.read_paused:
                self._owner.touch()  # the time paused was the aggregator's, not the client's
            super().resume_reading()

    class GuardedProtocol(base):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._phase = _HEAD
            self._head_bytes = 0  # bytes of the current head so far
            self._head_too_large = False
            self._messages = 0  # request heads begun, to tell a read holding two apart
            self._last_read = 0.0
            self._head_timer: asyncio.TimerHandle | None = None
            self._idle_timer: asyncio.TimerHandle | None = None
            self._guard: _Server | None = None

        # --- the connection ---------------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self.flow = _Flow(transport, self)
            self.touch()
            self._head_timer = self.loop.call_later(limits.head_timeout, self._head_expired)
            guard = self._guard = _servers.setdefault(self.server_state, _Server())
            guard.waiting[self] = None
            if len(self.connections) > limits.max_connections:
                self._make_room(guard)

        def connection_lost(self, exc: Exception | None) -> None:
            self._forget()
            super().connection_lost(exc)

        def handle_websocket_upgrade(self) -> None:
            self._forget()  # the WebSocket protocol has the connection from here on
            super().handle_websocket_upgrade()

        def touch(self) -> None:
            """Note that the connection is not idle now (bytes came, or reading resumed)."""
            self._last_read = self.loop.time()

        def data_received(self, data: bytes) -> None:
            # uvicorn's own, with the head counted and the body's idle timer set.
            self._last_read = self.loop.time()
            self._unset_keepalive_if_required()
            in_head, messages = self._phase == _HEAD, self._messages
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            except httptools.HttpParserError:
                if self._head_too_large:
                    self._refuse_head()
                    return
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
                return
            if self._phase == _HEAD:
                if self._head_timer is None:  # a kept-alive connection's next request began
                    self._head_timer = self.loop.call_later(limits.head_timeout, self._head_expired)
                # All of this read is head when it began in one and began at most one request
                # (a read that ends a pipelined request and begins the next is left uncounted;
                # the parser's callbacks still count that head exactly once it completes).
                if in_head and self._messages - messages <= 1:
                    self._head_bytes += len(data)
                    if self._head_bytes > limits.max_head_bytes:
                        self._refuse_head()
            elif self._phase == _BODY and self._idle_timer is None:
                self._idle_timer = self.loop.call_later(limits.body_idle_timeout, self._idle_check)

        # --- parser callbacks -------------------------------------------------------------
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._messages += 1
            self._phase, self._head_bytes = _HEAD, 0

        def on_headers_complete(self) -> None:
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > limits.max_head_bytes:
                self._head_too_large = True
                raise _HeadTooLarge()  # stops the parser; data_received answers
            self._head_done()
            self._phase = _BODY
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._body_done()

        def direct_body_read(self) -> None:
            self._last_read = self.loop.time()

        def direct_body_complete(self) -> None:
            self._body_done()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._wait_for_next()

        # --- phases -----------------------------------------------------------------------
        def _head_done(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            if self._guard is not None:
                self._guard.waiting.pop(self, None)

        def _body_done(self) -> None:
            self._phase = _AFTER
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            self._wait_for_next()

        def _wait_for_next(self) -> None:
            """Once a request is read and answered, the connection waits for the next head."""
            cycle = self.cycle
            if (
                self._phase == _AFTER
                and cycle is not None
                and cycle.response_complete
                and not self.pipeline
                and not self.transport.is_closing()
                and self._guard is not None
            ):
                self._phase, self._head_bytes = _HEAD, 0
                self._guard.waiting[self] = None

        def _forget(self) -> None:
            self._head_done()
            self._phase = _GONE
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None

        # --- limits -----------------------------------------------------------------------
        def _refuse_head(self) -> None:
            self._head_too_large = False
            detail = (
                f"the request line and headers exceed {limits.max_head_bytes} bytes "
                "(the aggregator's max_header_bytes)"
            )
            self._close(431, "headers_too_large", detail)

        def _head_expired(self) -> None:
            self._head_timer = None
            if self._phase == _HEAD:
                detail = (
                    f"the request's headers did not arrive within {limits.head_timeout:g} s "
                    "(the aggregator's header_timeout)"
                )
                self._close(408, "request_timeout", detail)

        def _idle_check(self) -> None:
            self._idle_timer = None
            if self._phase != _BODY:
                return
            now = self.loop.time()
            if self.flow.read_paused:  # the aggregator is not reading: not the client's time
                self._last_read = now
            idle = now - self._last_read
            if idle < limits.body_idle_timeout:
                self._idle_timer = self.loop.call_later(
                    limits.body_idle_timeout - idle, self._idle_check
                )
                return
            detail = (
                f"no byte of the request body arrived for {limits.body_idle_timeout:g} s "
                "(the aggregator's body_idle_timeout)"
            )
            self._close(408, "request_timeout", detail)

        def _close(self, status: int, code: str, detail: str) -> None:
            """Answer `status` unless another answer is under way, and close the connection."""
            cycle = self.cycle
            if self._phase == _HEAD:
                free = cycle is None or cycle.response_complete
            else:
                free = cycle is not None and not cycle.response_started
            if free and not self.transport.is_closing():
                self.transport.write(_answer(status, code, detail))
            if self._guard is not None:
                peer = _peer(self.client)
                self._guard.note(self.loop, code, f"closed the connection of {peer}: {detail}")
            self._forget()
            self.transport.close()

        def _make_room(self, guard: _Server) -> None:
            """Close the connection that has waited longest for a head (this one if no other)."""
            oldest = next(iter(guard.waiting))
            oldest._forget()
            oldest.transport.close()
            if oldest is not self:
                guard.note(
                    self.loop,
                    "evicted",
                    f"closed the connection of {_peer(oldest.client)}, idle before a request, "
                    f"to make room for a new one (max_connections {limits.max_connections})",
                )
            else:
                guard.note(
                    self.loop,
                    "max_connections",
                    f"{len(self.connections) - 1} connections are open (max_connections "
                    f"{limits.max_connections}) and none is idle: refused a new one; raise the "
                    "open-file limit (ulimit -n) or max_connections",
                )

    return GuardedProtocol
