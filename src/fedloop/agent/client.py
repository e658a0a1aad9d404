"""The agent's connection to the aggregator: typed calls over HTTP, pushes over a WebSocket."""

from __future__ import annotations

import http.client
import json
import mmap
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np

from fedloop.agent.bulk import BulkConnection
from fedloop.agent.bulk import usable as bulk_usable
from fedloop.errors import ConnectionFailed, FedloopError, ProtocolError
from fedloop.protocol import codec
from fedloop.protocol.messages import (
    GlobalModelInfo,
    Message,
    MetricsReport,
    PushMessage,
    RegisterRequest,
    RegisterResponse,
    StatusResponse,
    UploadRequest,
    UploadResponse,
    parse_message,
)
from fedloop.protocol.version import MESSAGE_HEADER
from fedloop.store.blobs import BodyPool, HashedBody
from fedloop.types import Weights

T = TypeVar("T")


_CHUNK = 1024 * 1024


# A model body: safetensors bytes, or its pieces as `codec.encode_parts` returns them (views of
# the tensors: sent and written without joining them into one more copy of the model).
ModelBody = codec.Bytes | Sequence[codec.Bytes]


def body_parts(data: ModelBody) -> Sequence[codec.Bytes]:
    """Return a model body as a sequence of buffers."""
    return [data] if isinstance(data, bytes | bytearray | memoryview | mmap.mmap) else data


def body_size(data: ModelBody) -> int:
    """Return a model body's length in bytes."""
    return sum(memoryview(part).nbytes for part in body_parts(data))


def chunks(data: ModelBody) -> Iterator[memoryview]:
    """Yield `data` in views of at most 1 MiB: httpx streams them without another copy of the
    model (h11 joins each chunk with its framing: a whole model as one chunk would be copied)."""
    for part in body_parts(data):
        view = memoryview(part).cast("B")
        for start in range(0, len(view), _CHUNK):
            yield view[start : start + _CHUNK]


class BodyBuffer:
    """A response body of announced size, filled chunk by chunk into one preallocated buffer.

    `response.content` would hold httpx's chunks and their join: two copies of a model at once.
    A body longer or shorter than announced is a connection problem (ConnectionFailed: retried).
    """

    def __init__(self, size: int, pool: BodyPool[HashedBody] | None = None) -> None:
        # From the pool: last round's buffer again, once nothing views it (no zero-fill, no
        # page faults for a model of 100s of MB).
        self.body: bytearray = pool.acquire(size) if pool is not None else bytearray(size)
        self.view = memoryview(self.body)
        self.filled = 0

    @staticmethod
    def announced(response: httpx.Response) -> int | None:
        """Return the body's size if the response announces it (and is not compressed)."""
        declared = response.headers.get("content-length")
        if declared is None or response.headers.get("content-encoding"):
            return None
        return int(declared)

    def add(self, chunk: bytes) -> None:
        end = self.filled + len(chunk)
        if end > len(self.body):
            self.view.release()
            raise ConnectionFailed("the model body is longer than its Content-Length")
        self.view[self.filled : end] = chunk
        self.filled = end

    def done(self) -> bytearray:
        self.view.release()
        if self.filled != len(self.body):
            raise ConnectionFailed("the model body is shorter than its Content-Length")
        return self.body


def _read_into_buffer(
    response: httpx.Response, pool: BodyPool[HashedBody] | None = None
) -> bytearray | bytes:
    """Return a streamed response's body, in one preallocated buffer when its size is known."""
    size = BodyBuffer.announced(response)
    if size is None:
        return response.read()
    buffer = BodyBuffer(size, pool)
    for chunk in response.iter_raw():
        buffer.add(chunk)
    return buffer.done()


# What agents that upload in the clear say when the aggregator runs secure aggregation.
NO_SECAGG = (
    "the aggregator runs secure aggregation ([secagg] enabled), which {agent} does not speak: "
    "its uploads would be refused; use `fedloop agent` (fedloop.agent.runner.Agent)"
)
# What agents that pass no side tensors say when the strategy exchanges them (SCAFFOLD, …).
NO_SIDE = (
    "the aggregator's strategy {strategy!r} exchanges side tensors with agents, which {agent} "
    "does not pass: its uploads would be refused; use `fedloop agent` "
    "(fedloop.agent.runner.Agent)"
)


class Refused(ProtocolError):
    """The aggregator answered with a 4xx error; `code` says which."""


def tls_context(
    ca_file: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> ssl.SSLContext:
    """Return a client TLS context trusting `ca_file` (or the system CAs), with an optional
    client certificate for mutual TLS."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if cert:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def auth_header(token: str | None) -> dict[str, str]:
    """Return the `Authorization: Bearer` header for `token`, or no header."""
    return {"authorization": f"Bearer {token}"} if token else {}


def checked_url(url: str) -> str:
    """Return the aggregator's base URL without a trailing slash; a FedloopError if it cannot
    work (retrying it would only hide the mistake)."""
    hint = "give it as http://HOST:PORT or https://HOST:PORT"
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when out of range or not a number
    except ValueError as exc:
        raise FedloopError(f"the aggregator URL {url!r} is not valid ({exc}); {hint}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FedloopError(f"the aggregator URL {url!r} is not valid; {hint}")
    if port == 0:
        raise FedloopError(f"the aggregator URL {url!r} has port 0; {hint}")
    return url.rstrip("/")


class AggregatorClient:
    """Synchronous client of one aggregator (one HTTP connection pool).

    `token` goes along as `Authorization: Bearer` on every request: the agent's enrollment token
    until it registers, its credential after that (an aggregator with auth on needs them).
    """

    def __init__(
        self,
        url: str,
        timeout: float = 120.0,
        verify: bool | ssl.SSLContext = True,
        token: str | None = None,
    ) -> None:
        self.url = checked_url(url)
        self.token = token
        # Download buffers, reused while the model's size stays the same; a model over
        # 256 MiB is not kept between rounds (an agent's memory between rounds stays low).
        self.bodies = BodyPool(HashedBody, keep_bytes=256 * 1024 * 1024)
        self.http = httpx.Client(
            base_url=self.url, timeout=httpx.Timeout(timeout, connect=5.0), verify=verify
        )
        # Model bodies go over http.client (3-4× less CPU, see fedloop.agent.bulk), unless a
        # proxy applies to the URL: then over httpx, which knows proxies.
        self.bulk = BulkConnection(self.url, verify, timeout) if bulk_usable(self.url) else None

    def close(self) -> None:
        self.http.close()
        if self.bulk is not None:
            self.bulk.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self.token:
            kwargs["headers"] = {**kwargs.get("headers", {}), **auth_header(self.token)}
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        self._check(response)
        return response

    def _unreachable(self, exc: Exception) -> ConnectionFailed:
        return ConnectionFailed(
            f"cannot reach the aggregator at {self.url} ({type(exc).__name__}: {exc}); "
            "check that it is running and that the address is right"
        )

    def _check(self, response: httpx.Response) -> None:
        """Raise ConnectionFailed for a 5xx answer, Refused for a 4xx one (read responses only)."""
        if response.status_code >= 400:
            self._raise_for(response.status_code, response.text, response.headers)

    def _raise_for(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> None:
        """Raise ConnectionFailed for a 5xx status (with the wait its `Retry-After` asks for),
        Refused (with the error code) for a 4xx."""
        if status < 400:
            return
        try:
            body = json.loads(text)
            code, detail = str(body["error"]), str(body["detail"])
        except (ValueError, KeyError, TypeError):
            code, detail = "", ""
        if status >= 500:
            # A restarting aggregator behind a load balancer answers 502/503/504, a 500 is the
            # server's fault, and a 507 its full disk: all are worth another try, like a
            # refused connection.
            said = f"{code}: {detail}" if code else f"{text[:200].strip()!r}; it may be restarting"
            raise ConnectionFailed(
                f"the aggregator at {self.url} answered {status} ({said})",
                retry_after=retry_after(headers),
            )
        raise Refused(detail or text[:500], status, code or "http_error")

    def _download(
        self,
        path: str,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        pooled: bool = True,
    ) -> tuple[httpx.Headers, bytearray | bytes] | None:
        """GET a model body streamed into one buffer preallocated from its Content-Length.

        `response.content` would hold httpx's chunks and their join: two copies of the model at
        once. Returns None for a 204 ("not yet"); errors as `_send`. ``pooled``: the buffer
        comes from `bodies`, the pool of global models' buffers.
        """
        headers = auth_header(self.token)
        pool = self.bodies if pooled else None
        if self.bulk is not None:
            return self._download_bulk(self.bulk, path, params, headers, timeout, pool)
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            with self.http.stream("GET", path, params=params, headers=headers, **extra) as response:
                if response.status_code == 204:
                    return None
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                return response.headers, _read_into_buffer(response, pool)
        except httpx.TransportError as exc:  # also a connection lost mid-body
            raise self._unreachable(exc) from exc

    def _download_bulk(
        self,
        bulk: BulkConnection,
        path: str,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str],
        timeout: float | None,
        pool: BodyPool[HashedBody] | None,
    ) -> tuple[httpx.Headers, bytearray | bytes] | None:
        """`_download` over http.client: the socket reads straight into the body's buffer."""
        try:
            with bulk.request("GET", path, params, headers, timeout=timeout) as response:
                if response.status == 204:
                    return None
                if response.status >= 400:
                    self._raise_for(response.status, response.text(), response.headers)
                declared = response.headers.get("content-length")
                if declared is None or response.headers.get("content-encoding"):
                    raise ConnectionFailed("the model body came without a plain Content-Length")
                buffer = BodyBuffer(int(declared), pool)
                while buffer.filled < len(buffer.body):
                    got = response.readinto(buffer.view[buffer.filled :])
                    if not got:
                        break  # done() says the body is short
                    buffer.filled += got
                return httpx.Headers(list(response.headers.items())), buffer.done()
        except (OSError, http.client.HTTPException) as exc:  # also a connection lost mid-body
            raise self._unreachable(exc) from exc

    def register(
        self, name: str, weights: Mapping[str, np.ndarray] | None = None
    ) -> RegisterResponse:
        message = RegisterRequest(agent_name=name)
        # Streamed from views of the tensors: no encoded copy of the initial model.
        body = codec.encode_parts(weights) if weights is not None else []
        response = self._send(
            "POST",
            "/v1/register",
            content=chunks(body),
            headers={
                MESSAGE_HEADER: message.model_dump_json(),
                "content-length": str(body_size(body)),
            },
        )
        return RegisterResponse.model_validate(response.json())

    def upload(
        self,
        agent_id: str,
        round_number: int,
        data: ModelBody,
        num_samples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> UploadResponse:
        message = UploadRequest(
            agent_id=agent_id,
            round=round_number,
            num_samples=num_samples,
            metrics={k: float(v) for k, v in (metrics or {}).items()},
        )
        headers = {
            MESSAGE_HEADER: message.model_dump_json(),
            "content-length": str(body_size(data)),
        }
        if self.bulk is not None:
            try:
                with self.bulk.request(
                    "POST", "/v1/updates", headers={**headers, **auth_header(self.token)},
                    body=chunks(data),
                ) as answer:  # fmt: skip
                    status, text, head = answer.status, answer.text(), answer.headers
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc) from exc
            self._raise_for(status, text, head)
            return UploadResponse.model_validate_json(text)
        response = self._send("POST", "/v1/updates", content=chunks(data), headers=headers)
        return UploadResponse.model_validate(response.json())

    def latest_global(
        self, after: int, wait: float = 0.0, agent_id: str | None = None
    ) -> tuple[GlobalModelInfo, bytearray | bytes] | None:
        """Return the newest global model if its round is above `after`, else None ("not yet").

        The body comes in one buffer (a `bytearray` when the size was announced). `agent_id`:
        the agent asking, which the aggregator then does not send the model's WebSocket
        announcement while the request waits."""
        params: dict[str, Any] = {"after": after, "wait": wait}
        if agent_id is not None:
            params["agent_id"] = agent_id
        result = self._download("/v1/models/global/latest", params=params, timeout=wait + 60.0)
        if result is None:
            return None
        headers, body = result
        return parse_message(GlobalModelInfo, headers.get(MESSAGE_HEADER)), body

    def global_model(self, round_number: int) -> Weights:
        result = self._download(f"/v1/models/global/{round_number}")
        if result is None:
            raise ProtocolError(f"the aggregator sent no body for global model {round_number}")
        return codec.decode(memoryview(result[1]).toreadonly())

    def strategy_state(self, round_number: int) -> Weights:
        """Return the tensors the strategy shipped with global model `round_number` (SCAFFOLD's
        c, FedCurv's sums: `GlobalModelInfo.side.state`), in a buffer of their own."""
        result = self._download(f"/v1/models/global/{round_number}/state", pooled=False)
        if result is None:
            raise ProtocolError(f"the aggregator sent no body for the state of {round_number}")
        return codec.decode(memoryview(result[1]).toreadonly())

    def report(self, agent_id: str, round_number: int, metrics: Mapping[str, float]) -> None:
        message = MetricsReport(
            agent_id=agent_id, round=round_number, metrics={k: float(v) for k, v in metrics.items()}
        )
        self._send("POST", "/v1/evaluations", content=message.model_dump_json())

    def status(self) -> StatusResponse:
        return StatusResponse.model_validate(self._send("GET", "/v1/status").json())

    def history(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._send("GET", "/v1/history").json()["rounds"]
        return rows

    # --- secure aggregation (fedloop.agent.secure) ----------------------------------------
    def secagg_post(self, round_number: int, step: str, message: Message) -> dict[str, Any]:
        """POST one JSON message of round `round_number`'s secure aggregation; return the reply."""
        response = self._send(
            "POST",
            f"/v1/secagg/{round_number}/{step}",
            content=message.model_dump_json(),
            headers={"content-type": "application/json"},
        )
        reply: dict[str, Any] = response.json()
        return reply

    def secagg_masked(self, round_number: int, message: Message, data: bytes) -> dict[str, Any]:
        """POST the masked input (little-endian unsigned ints) with its header message."""
        response = self._send(
            "POST",
            f"/v1/secagg/{round_number}/masked",
            content=chunks(data),
            headers={MESSAGE_HEADER: message.model_dump_json(), "content-length": str(len(data))},
        )
        reply: dict[str, Any] = response.json()
        return reply

    def secagg_poll(
        self, round_number: int, step: str, agent_id: str, attempt: int, wait: float
    ) -> dict[str, Any] | None:
        """GET what a closed phase hands this agent; None while the phase is open."""
        response = self._send(
            "GET",
            f"/v1/secagg/{round_number}/{step}",
            params={"agent_id": agent_id, "attempt": attempt, "wait": wait},
            timeout=wait + 60.0,
        )
        if response.status_code == 204:
            return None
        reply: dict[str, Any] = response.json()
        return reply


# The longest `Retry-After` an agent honours, in seconds: a typo on the server's side must not
# park its agents for a day.
RETRY_AFTER_MAX = 300.0

# Seconds from the start of one request for the next global model to the start of the next,
# at least, when the first came back without one. A long poll waits on the aggregator and
# never comes back that soon; a short `poll_wait` (0 asks and returns at once), or a proxy
# that answers early, would otherwise have an agent ask as fast as the network answers.
POLL_GAP = 0.5


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Return the seconds of a response's `Retry-After` (capped at RETRY_AFTER_MAX), or None
    when it has none or gives a date (fedloop's aggregator gives seconds)."""
    value = (headers or {}).get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX) if seconds == seconds else None


def retry(
    action: Callable[[], T],
    stop: threading.Event | None = None,
    backoff_max: float = 5.0,
    give_up_after: float | None = None,
    on_retry: Callable[[Exception, float], None] | None = None,
) -> T:
    """Return `action()`, retrying with exponential backoff while the aggregator is unreachable.

    An answer that asked for a longer wait (`ConnectionFailed.retry_after`, from `Retry-After`)
    gets it: an aggregator whose disk is full would otherwise receive every agent's whole model
    again every `backoff_max` seconds.
    """
    delay, started = 0.1, time.monotonic()
    while True:
        try:
            return action()
        except ConnectionFailed as exc:
            if give_up_after is not None and time.monotonic() - started > give_up_after:
                raise
            wait = max(delay, exc.retry_after or 0.0)
            if on_retry is not None:
                on_retry(exc, wait)
            if stop is not None and stop.wait(wait):
                raise
            if stop is None:
                time.sleep(wait)
            delay = min(delay * 2, backoff_max)


class PushListener:
    """Keeps a WebSocket open to the aggregator (reconnecting) and records announced rounds.

    The connection is the agent's own outbound one: the aggregator never connects to an agent.
    An agent waits for a global model with a long poll either way (`Agent._wait_for_global`);
    the announcements tell a training agent that a newer global model overtook its round, and
    the open connection counts it as connected (`/metrics`, the dashboard).
    """

    def __init__(
        self,
        url: str,
        agent_id: str,
        backoff_max: float = 5.0,
        tls: ssl.SSLContext | None = None,
        token: str | None = None,
    ) -> None:
        self.tls = tls
        self.token = token  # the agent's credential, sent on the handshake
        base = url.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        self.ws_url = f"{base}/v1/ws?agent_id={agent_id}"
        self.backoff_max = backoff_max
        self.announced = -1
        self.finished = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedloop-push", daemon=True)

    def start(self) -> PushListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        delay = 0.1
        while not self._stop.is_set():
            try:
                secure = self.ws_url.startswith("wss://")
                with connect(
                    self.ws_url,
                    open_timeout=5,
                    close_timeout=1,
                    ssl=(self.tls or ssl.create_default_context()) if secure else None,
                    additional_headers=auth_header(self.token),
                    compression=None,  # tiny JSON messages: no zlib state per connection
                ) as ws:
                    delay = 0.1
                    while not self._stop.is_set():
                        try:
                            raw = ws.recv(timeout=0.5)
                        except TimeoutError:
                            continue
                        push = PushMessage.model_validate(json.loads(raw))
                        self.announced = max(self.announced, push.round)
                        self.finished = push.finished
            except (OSError, WebSocketException, ValueError):
                pass
            self._stop.wait(delay)
            delay = min(delay * 2, self.backoff_max)
