"""The agent's connection to the aggregator: typed calls over HTTP, pushes over a WebSocket."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from fedloop.errors import ConnectionFailed, ProtocolError
from fedloop.protocol import codec
from fedloop.protocol.messages import (
    GlobalModelInfo,
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
from fedloop.types import Weights

T = TypeVar("T")


_CHUNK = 1024 * 1024


def _chunks(data: bytes) -> Iterator[memoryview]:
    """Yield `data` in 1 MiB views: httpx streams them without another copy of the model."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


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
        self.url = url.rstrip("/")
        self.token = token
        self.http = httpx.Client(
            base_url=self.url, timeout=httpx.Timeout(timeout, connect=5.0), verify=verify
        )

    def close(self) -> None:
        self.http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self.token:
            kwargs["headers"] = {**kwargs.get("headers", {}), **auth_header(self.token)}
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ConnectionFailed(
                f"cannot reach the aggregator at {self.url} ({type(exc).__name__}: {exc}); "
                "check that it is running and that the address is right"
            ) from exc
        if response.status_code >= 500:
            # A restarting aggregator behind a load balancer answers 502/503/504, and a 500 is
            # the server's fault: all are worth another try, like a refused connection.
            raise ConnectionFailed(
                f"the aggregator at {self.url} answered {response.status_code} "
                f"({response.text[:200].strip()!r}); it may be restarting"
            )
        if response.status_code >= 400:
            try:
                body = response.json()
                code, detail = str(body["error"]), str(body["detail"])
            except (ValueError, KeyError, TypeError):
                code, detail = "http_error", response.text[:500]
            raise Refused(detail, response.status_code, code)
        return response

    def register(
        self, name: str, weights: Mapping[str, np.ndarray] | None = None
    ) -> RegisterResponse:
        message = RegisterRequest(agent_name=name)
        body = codec.encode(weights) if weights is not None else b""
        response = self._send(
            "POST",
            "/v1/register",
            content=body,
            headers={MESSAGE_HEADER: message.model_dump_json()},
        )
        return RegisterResponse.model_validate(response.json())

    def upload(
        self,
        agent_id: str,
        round_number: int,
        data: bytes,
        num_samples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> UploadResponse:
        message = UploadRequest(
            agent_id=agent_id,
            round=round_number,
            num_samples=num_samples,
            metrics={k: float(v) for k, v in (metrics or {}).items()},
        )
        response = self._send(
            "POST",
            "/v1/updates",
            content=_chunks(data),
            headers={MESSAGE_HEADER: message.model_dump_json(), "content-length": str(len(data))},
        )
        return UploadResponse.model_validate(response.json())

    def latest_global(self, after: int, wait: float = 0.0) -> tuple[GlobalModelInfo, bytes] | None:
        """Return the newest global model if its round is above `after`, else None ("not yet")."""
        response = self._send(
            "GET",
            "/v1/models/global/latest",
            params={"after": after, "wait": wait},
            timeout=wait + 60.0,
        )
        if response.status_code == 204:
            return None
        info = parse_message(GlobalModelInfo, response.headers.get(MESSAGE_HEADER))
        return info, response.content

    def global_model(self, round_number: int) -> Weights:
        return codec.decode(self._send("GET", f"/v1/models/global/{round_number}").content)

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


def retry(
    action: Callable[[], T],
    stop: threading.Event | None = None,
    backoff_max: float = 5.0,
    give_up_after: float | None = None,
    on_retry: Callable[[Exception, float], None] | None = None,
) -> T:
    """Return `action()`, retrying with exponential backoff while the aggregator is unreachable."""
    delay, started = 0.1, time.monotonic()
    while True:
        try:
            return action()
        except ConnectionFailed as exc:
            if give_up_after is not None and time.monotonic() - started > give_up_after:
                raise
            if on_retry is not None:
                on_retry(exc, delay)
            if stop is not None and stop.wait(delay):
                raise
            if stop is None:
                time.sleep(delay)
            delay = min(delay * 2, backoff_max)


class PushListener:
    """Keeps a WebSocket open to the aggregator (reconnecting) and records announced rounds.

    The connection is the agent's own outbound one: the aggregator never connects to an agent.
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
        self.connected = False
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedloop-push", daemon=True)

    def start(self) -> PushListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()

    def wait_beyond(self, round_number: int, timeout: float) -> bool:
        """Block until a round above `round_number` is announced; False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self.announced > round_number or self._stop.is_set(), timeout
            )

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
                ) as ws:
                    self.connected, delay = True, 0.1
                    while not self._stop.is_set():
                        try:
                            raw = ws.recv(timeout=0.5)
                        except TimeoutError:
                            continue
                        push = PushMessage.model_validate(json.loads(raw))
                        with self._changed:
                            self.announced = max(self.announced, push.round)
                            self.finished = push.finished
                            self._changed.notify_all()
            except (OSError, WebSocketException, ValueError):
                pass
            self.connected = False
            self._stop.wait(delay)
            delay = min(delay * 2, self.backoff_max)
