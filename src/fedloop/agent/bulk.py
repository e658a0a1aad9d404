"""Model bodies to and from the aggregator over keep-alive HTTP/1.1 connections of its own.

A download is read by the socket straight into the agent's preallocated buffer (`readinto`),
an upload is sent from views of the tensors with its request head in one `sendmsg`; the JSON
calls stay on httpx. httpx reads through h11 in 64 KiB pieces, each through several layers of
Python, and joins each piece of an upload with its framing: measured on the reference VM
against a real aggregator on loopback, a 4 MB model took 2.7 ms of the agent's CPU to download
with httpx and 0.7 ms with `http.client` (3.0 vs 1.1 ms to upload). `http.client` in turn
parses every response head with the `email` package and sends an upload in one system call per
piece: over it, 10 agents × 4 MB used 44–45 ms of CPU a round in all, 39–40 ms over this
module's own client (docs/performance.md, eleventh pass).

The client speaks the HTTP/1.1 that an aggregator (or a proxy in front of it) answers with:
a body framed by Content-Length, by chunked transfer coding or by the connection's close, and
interim 1xx answers skipped. Errors are `OSError` (refused, reset, timed out, TLS) or
`http.client.HTTPException` (a malformed or cut answer), as `http.client` raises them.

Where httpx would go through a proxy (``HTTPS_PROXY`` and friends), the agent keeps httpx for
bodies too (`usable` is False): this module connects directly.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterable, Mapping
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
_MAX_HEAD = 64 * 1024  # bytes of a response's status line and headers
_READ = 64 * 1024  # bytes asked for at once while reading a head or a chunk's size line
_IOV_MAX = 1024  # buffers per sendmsg call


def usable(url: str) -> bool:
    """Return whether bodies for `url` can go over a direct connection (no proxy applies)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return True
    return bool(urllib.request.proxy_bypass(parts.hostname))  # NO_PROXY (no_proxy) names it


class _Connection:
    """A socket to the aggregator and what was read from it past the last response's end."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ahead = bytearray()  # received, not yet consumed

    def close(self) -> None:
        self.sock.close()

    def send(self, pieces: list[memoryview]) -> None:
        """Send every byte of `pieces`, in order: with as few system calls as the socket takes."""
        if isinstance(self.sock, ssl.SSLSocket):  # TLS records: no scatter-gather send
            for piece in pieces:
                self.sock.sendall(piece)
            return
        while pieces:
            sent = self.sock.sendmsg(pieces[:_IOV_MAX])
            while pieces and sent >= len(pieces[0]):
                sent -= len(pieces[0])
                pieces.pop(0)
            if pieces and sent:
                pieces[0] = pieces[0][sent:]

    def fill(self) -> int:
        """Receive more into `ahead`; return how many bytes came (0: the peer closed)."""
        data = self.sock.recv(_READ)
        self.ahead += data
        return len(data)

    def line(self) -> bytes:
        """Consume and return one CRLF-terminated line (without its end) of a chunked body."""
        while (end := self.ahead.find(b"\r\n")) < 0:
            if len(self.ahead) > _MAX_HEAD:
                raise http.client.LineTooLong("chunk size line")
            if not self.fill():
                raise http.client.IncompleteRead(b"")
        line = bytes(self.ahead[:end])
        del self.ahead[: end + 2]
        return line

    def read_into(self, view: memoryview) -> int:
        """Fill the start of `view` from what was read ahead, else from one receive."""
        if self.ahead:
            count = min(len(self.ahead), len(view))
            view[:count] = self.ahead[:count]
            del self.ahead[:count]
            return count
        return self.sock.recv_into(view)


def _parse_head(head: bytes) -> tuple[int, bool, dict[str, str]]:
    """Return (status, HTTP/1.1, headers with lowercase names) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/") or len(code) != 3 or not code.isdigit():
        raise http.client.BadStatusLine(lines[0])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise http.client.HTTPException(f"malformed header line {line!r}")
        key, value = name.lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return int(code), version == "HTTP/1.1", headers


class BulkResponse:
    """A response whose body is read by the caller: `readinto` a buffer, or `text()`.

    Use it as a context manager: leaving normally reads what is left of the body and hands the
    connection back for the next request; leaving with an exception closes the connection.
    """

    def __init__(self, owner: BulkConnection, conn: _Connection, method: str) -> None:
        self._owner, self._conn = owner, conn
        self.status, keep, self.headers = self._read_head()
        coding = self.headers.get("transfer-encoding", "").lower()
        self._chunked = coding.endswith("chunked")
        self._left: int | None = None  # bytes of the body (or of the current chunk) to come
        if method == "HEAD" or self.status in (204, 304):
            self._left = 0
        elif self._chunked:
            self._left = self._next_chunk()
        elif coding:
            raise http.client.HTTPException(f"unsupported transfer-encoding {coding!r}")
        elif "content-length" in self.headers:
            try:
                self._left = int(self.headers["content-length"])
            except ValueError as exc:
                raise http.client.HTTPException("Content-Length is not a number") from exc
            if self._left < 0:
                raise http.client.HTTPException("negative Content-Length")
        # A body that ends with the connection cannot be followed by another answer.
        self._reusable = keep and self._left is not None

    def _read_head(self) -> tuple[int, bool, dict[str, str]]:
        conn = self._conn
        while True:
            while (end := conn.ahead.find(b"\r\n\r\n")) < 0:
                if len(conn.ahead) > _MAX_HEAD:
                    raise http.client.LineTooLong("response head")
                if not conn.fill():
                    if conn.ahead:
                        raise http.client.IncompleteRead(bytes(conn.ahead))
                    # On a kept connection: closed while idle (`request` sends it again).
                    raise http.client.RemoteDisconnected("closed without answering")
            if end > _MAX_HEAD:
                raise http.client.LineTooLong("response head")
            head = bytes(conn.ahead[:end])
            del conn.ahead[: end + 4]
            status, http11, headers = _parse_head(head)
            if 100 <= status < 200 and status != 101:
                continue  # interim (100 Continue, 103 Early Hints): the answer follows
            tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
            keep = http11 and "close" not in tokens
            return status, keep, headers

    def _next_chunk(self) -> int:
        size = self._conn.line().split(b";", 1)[0].strip()
        try:
            left = int(size, 16)
        except ValueError as exc:
            raise http.client.HTTPException(f"bad chunk size {size!r}") from exc
        if left == 0:  # the last chunk: trailers, up to an empty line
            while self._conn.line():
                pass
        return left

    def readinto(self, view: memoryview) -> int:
        """Read body bytes into the start of `view`; return how many (0: the body has ended,
        or the connection closed before its announced end, as `http.client` does)."""
        if self._left == 0 or not len(view):
            return 0
        if self._left is not None:
            view = view[: self._left]
        count = self._conn.read_into(view)
        if self._left is None:  # delimited by the connection's close
            return count
        if not count:  # closed early: the caller finds the body short
            self._left, self._reusable = 0, False
            return 0
        self._left -= count
        if self._chunked and self._left == 0:
            if self._conn.line():  # the CRLF after a chunk's data
                raise http.client.HTTPException("chunk data longer than its size")
            self._left = self._next_chunk()
        return count

    def read(self, limit: int | None = None) -> bytes:
        """Return the rest of the body (at most `limit` bytes)."""
        out = bytearray()
        while limit is None or len(out) < limit:
            want = _READ if limit is None else min(_READ, limit - len(out))
            piece = bytearray(want)
            count = self.readinto(memoryview(piece))
            if not count:
                break
            out += piece[:count]
        return bytes(out)

    def text(self, limit: int = 64 * 1024) -> str:
        return self.read(limit).decode("utf-8", "replace")

    def __enter__(self) -> BulkResponse:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None and self._reusable:
            self.read()  # an unread rest would spoil the connection's next request
            self._owner._give_back(self._conn)
        else:
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
        default = 443 if self.https else 80
        self.port = parts.port or default
        name = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        self.authority = name if self.port == default else f"{name}:{self.port}"
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
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connect(self) -> _Connection:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.context is not None:
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        return _Connection(sock)

    def _take(self) -> tuple[_Connection, bool]:
        """Return an idle connection (True: it served before) or a new one (False)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _give_back(self, conn: _Connection) -> None:
        with self._lock:
            if len(self._idle) < self.IDLE:
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
        fields = {"host": self.authority, "accept-encoding": "identity"}
        fields.update({name.lower(): value for name, value in (headers or {}).items()})
        lines = [f"{method} {target} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in fields.items()]
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError(f"a request line or header holds a line break: {line!r}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        pieces = [memoryview(part).cast("B") for part in body] if body is not None else []
        for attempt in (1, 2):
            conn, reused = self._take()
            try:
                conn.sock.settimeout(timeout if timeout is not None else self.timeout)
                conn.send([memoryview(head), *pieces])
                return BulkResponse(self, conn, method)
            except _STALE:
                conn.close()
                if reused and attempt == 1:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")
