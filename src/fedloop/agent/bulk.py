"""Model bodies to and from the aggregator over keep-alive connections of `http.client`.

A download is read by the socket straight into the agent's preallocated buffer
(`HTTPResponse.readinto`), an upload is sent from views of the tensors; the JSON calls stay on
httpx. httpx reads through h11 in 64 KiB pieces, each through several layers of Python, and
joins each piece of an upload with its framing: measured on the reference VM against a real
aggregator on loopback, a 4 MB model took 2.7 ms of the agent's CPU to download with httpx and
0.7 ms with `http.client`, and 3.0 vs 1.1 ms to upload (100 MB: 61 vs 18 ms down, 35 vs 23 ms
up).

Where httpx would go through a proxy (``HTTPS_PROXY`` and friends), the agent keeps httpx for
bodies too (`usable` is False): this module connects directly.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from urllib.parse import urlencode, urlsplit

__all__ = ["BulkConnection", "usable"]

# What a connection the server closed while it sat idle raises on its next request: the
# request never reached the server, so it is sent again on a new connection.
_STALE = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
)


def usable(url: str) -> bool:
    """Return whether bodies for `url` can go over a direct connection (no proxy applies)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return True
    return bool(urllib.request.proxy_bypass(parts.hostname))  # NO_PROXY (no_proxy) names it


class BulkResponse:
    """A response whose body is read by the caller: `readinto` a buffer, or `text()`.

    Use it as a context manager: leaving normally reads what is left of the body and hands the
    connection back for the next request; leaving with an exception closes the connection.
    """

    def __init__(
        self,
        response: http.client.HTTPResponse,
        conn: http.client.HTTPConnection,
        done: Callable[[http.client.HTTPConnection], None],
    ) -> None:
        self._response, self._conn, self._done = response, conn, done
        self.status = response.status
        self.headers = response.headers  # case-insensitive .get()

    def readinto(self, view: memoryview) -> int:
        return self._response.readinto(view)

    def text(self, limit: int = 64 * 1024) -> str:
        return self._response.read(limit).decode("utf-8", "replace")

    def __enter__(self) -> BulkResponse:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self._response.read()  # an unread rest would spoil the connection's next request
            self._done(self._conn)
        else:
            self._response.close()
            self._conn.close()  # its socket may hold an unread rest: never reuse it


class BulkConnection:
    """Keep-alive HTTP/1.1 (or HTTPS) connections to the aggregator's base URL, for any thread.

    A request takes an idle connection (or opens one) and gives it back when its response is
    read, as httpx's pool does: one `AggregatorClient` may be used from several threads.
    """

    IDLE = 4  # idle connections kept

    def __init__(
        self,
        url: str,
        verify: bool | ssl.SSLContext = True,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
    ) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.context: ssl.SSLContext | None = None
        if self.https:
            if isinstance(verify, ssl.SSLContext):
                self.context = verify
            else:
                self.context = ssl.create_default_context()
                if not verify:
                    self.context.check_hostname = False
                    self.context.verify_mode = ssl.CERT_NONE
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self.https:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.connect_timeout, context=self.context
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        conn.connect()
        return conn

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        """Return an idle connection (True: it served before) or a new one (False)."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.sock is not None:
                    return conn, True
        return self._connect(), False

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        # A "Connection: close" answer has closed `conn` already (sock is None): dropped.
        with self._lock:
            if conn.sock is not None and len(self._idle) < self.IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, object] | None = None,
        headers: Mapping[str, str] | None = None,
        body: Iterable[memoryview] | None = None,
        timeout: float | None = None,
    ) -> BulkResponse:
        """Send a request and return its response once the status line and headers are in.

        A `body` must come with its content-length in `headers`. Raises OSError or
        http.client.HTTPException when the aggregator cannot be reached or the connection
        breaks (a kept connection the server closed while idle is replaced once, unseen).
        """
        target = self.prefix + path + (f"?{urlencode(params)}" if params else "")
        pieces = list(body) if body is not None else None  # sent again after a stale connection
        for attempt in (1, 2):
            conn, reused = self._take()
            try:
                assert conn.sock is not None
                conn.sock.settimeout(timeout if timeout is not None else self.timeout)
                conn.request(method, target, body=pieces, headers=dict(headers or {}))
                response = conn.getresponse()
            except _STALE:
                conn.close()
                if reused and attempt == 1:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return BulkResponse(response, conn, self._give_back)
        raise AssertionError("unreachable")
