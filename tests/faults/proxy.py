"""A loopback TCP proxy that a test can throttle, pause, cut and restore: a flaky network.

It runs its own asyncio loop in a daemon thread; every control method is safe to call from the
test's thread. `pause()` stops forwarding but keeps the connections open (packets silently
dropped, as behind a dead NAT); `drop()` resets every connection and every new one until
`resume()` (a cut cable); `answer(503)` resets them too but answers every new request with that
HTTP status, as a load balancer does while its backend is down; `throttle()` limits the bytes
per second in each direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any

_CHUNK = 64 * 1024


class Proxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.bytes_up = 0  # client → server, forwarded
        self.bytes_down = 0  # server → client, forwarded
        self.connections = 0  # accepted, in all
        self.up_rate: float | None = None  # bytes per second, None = as fast as possible
        self.down_rate: float | None = None
        self._dropping = False
        self._answer: int | None = None
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # --- control (from any thread) --------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Proxy:
        self._thread.start()
        self._run(self._start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def throttle(self, up: float | None = None, down: float | None = None) -> None:
        """Limit forwarding to `up`/`down` bytes per second (None: unlimited)."""
        self.up_rate, self.down_rate = up, down

    def pause(self) -> None:
        """Stop forwarding; connections stay open and bytes wait (a black hole)."""
        self._run(self._set_flowing(False))

    def drop(self) -> None:
        """Reset every open connection, and each new one, until `resume()`."""
        self._dropping = True
        self._run(self._reset_all())

    def answer(self, status: int) -> None:
        """Reset every open connection and answer each new request with `status`, until
        `resume()`: a load balancer whose backend is down."""
        self._answer = status
        self.drop()

    def resume(self) -> None:
        """Forward again (after `pause`), accept connections again (after `drop`, `answer`)."""
        self._dropping = False
        self._answer = None
        self._run(self._set_flowing(True))

    def _run(self, work: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=10)

    # --- the loop's side ------------------------------------------------------------------
    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()

    async def _set_flowing(self, on: bool) -> None:
        assert self._flowing is not None
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _reset_all(self) -> None:
        for writer in list(self._open):
            _reset(writer)
        self._open.clear()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._answer is not None:
            await _answer(client_r, client_w, self._answer)
            return
        if self._dropping:
            _reset(client_w)
            return
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _reset(client_w)
            return
        self._open |= {client_w, server_w}
        await asyncio.gather(
            self._pump(client_r, server_w, "up"),
            self._pump(server_r, client_w, "down"),
            return_exceptions=True,
        )
        for writer in (client_w, server_w):
            self._open.discard(writer)
            writer.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await self._flowing.wait()
                if self._dropping:
                    break
                rate = self.up_rate if direction == "up" else self.down_rate
                if rate:
                    started = loop.time()
                writer.write(data)
                await writer.drain()
                if direction == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                if rate:
                    await asyncio.sleep(max(0.0, len(data) / rate - (loop.time() - started)))
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            pass
        finally:
            # One side gone: end the other half too, so neither end waits forever.
            if direction == "down" or self._dropping:
                writer.close()


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int) -> None:
    """Read a request's head and answer it with `status` and a short HTML body, then close."""
    with contextlib.suppress(
        OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError
    ):
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        body = f"<html><body><h1>{status} Service Unavailable</h1></body></html>".encode()
        writer.write(
            f"HTTP/1.1 {status} Service Unavailable\r\ncontent-type: text/html\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (linger 0), as a cut connection looks to both ends."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
