"""`AsyncAgent`: the agent protocol on asyncio, for running hundreds of agents in one process.

It speaks exactly the protocol of `fedloop.agent.runner.Agent` (register with the initial
model, wait for each global model with a long poll, with a WebSocket open in push mode that
tells it when a newer model overtakes its round, train, upload), but keeps no state on disk:
a killed `AsyncAgent` does not resume. It is meant for benchmarks and many-agent tests
(`bench/many_agents.py`), where one thread per agent and one process per agent cost more than
the work.

Following docs/decisions/0001-transport.md, every agent has its own `httpx.AsyncClient` (one
client shared by hundreds of concurrent requests collapses in httpcore's pool), model bytes are
uploaded in 1 MiB slices with a Content-Length, and a global model is read into one buffer
preallocated from its Content-Length (httpx's `response.content` would hold the chunks and their
join: two copies of the model at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np

from fedloop.agent.client import (
    NO_SECAGG,
    NO_SIDE,
    POLL_GAP,
    BodyBuffer,
    ModelBody,
    body_size,
    checked_url,
    chunks,
    retry_after,
)
from fedloop.errors import ConnectionFailed, FedloopError
from fedloop.protocol import codec
from fedloop.protocol.messages import (
    GlobalModelInfo,
    MetricsReport,
    PushMessage,
    RegisterRequest,
    RegisterResponse,
    UploadRequest,
    UploadResponse,
    parse_message,
)
from fedloop.protocol.version import MESSAGE_HEADER
from fedloop.types import Weights

log = logging.getLogger("fedloop.agent")

# Refusals after which a trained model is dropped: a newer global model overtook it.
_OVERTAKEN = {"round_closed", "round_not_open", "duplicate_upload", "run_finished"}


class AsyncRefused(FedloopError):
    """The aggregator answered with a 4xx error; ``code`` says which."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


async def _slices(data: ModelBody) -> AsyncIterator[memoryview]:
    for view in chunks(data):  # httpx's async client needs an async iterable
        yield view


@dataclass
class AsyncAgentResult:
    """What an `AsyncAgent.run` did: its id, rounds trained, the last global model it saw."""

    agent_id: str
    rounds_trained: int = 0
    global_round: int = -1
    finished: bool = False
    round_seconds: list[float] = field(default_factory=list)


class AsyncAgent:
    """An FL client on asyncio: register, wait for the global model, train, upload, repeat."""

    def __init__(
        self,
        engine: Any,
        aggregator_url: str,
        name: str,
        *,
        mode: Literal["push", "poll"] = "push",
        initial_weights: Mapping[str, np.ndarray] | None = None,
        send_initial: bool = True,
        max_rounds: int | None = None,
        evaluate_global: bool = False,
        poll_wait: float = 10.0,
        timeout: float = 120.0,
        backoff_max: float = 5.0,
        give_up_after: float | None = 60.0,
        train_in_thread: bool = False,
        tls: ssl.SSLContext | None = None,
        token: str | None = None,
    ) -> None:
        if not hasattr(engine, "train"):
            raise FedloopError("the ML engine must have a train(weights, config) method")
        self.engine = engine
        self.url = checked_url(aggregator_url)
        self.name = name
        self.mode = mode
        self.initial_weights = initial_weights
        self.send_initial = send_initial
        self.max_rounds = max_rounds
        self.evaluate_global = evaluate_global and hasattr(engine, "evaluate")
        self.poll_wait = poll_wait
        self.timeout = timeout
        self.backoff_max = backoff_max
        self.give_up_after = give_up_after
        self.train_in_thread = train_in_thread
        self.tls = tls
        # Enrollment token until registered, then the credential the aggregator hands out
        # (an aggregator with auth on needs them; see docs/security.md).
        self.token = token
        self.asynchronous = False
        self.announced = -1
        self.push_finished = False
        self._stop = asyncio.Event()

    # --- HTTP -----------------------------------------------------------------------------
    async def _send(
        self,
        http: httpx.AsyncClient,
        method: str,
        path: str,
        model: ModelBody | None = None,
        **kw: Any,
    ) -> Any:
        """Send a request, retrying while the aggregator is unreachable or answers a 5xx (as
        `Agent` does: a restart behind a balancer, a full disk); `model` is streamed in slices,
        from the start again on every try (a generator would be spent after one)."""
        delay = 0.1
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            if model is not None:
                kw["content"] = _slices(model)
            wait = delay
            try:
                response = await http.request(method, path, **kw)
            except httpx.TransportError as exc:
                failure: Exception = ConnectionFailed(
                    f"cannot reach the aggregator at {self.url} ({type(exc).__name__}: "
                    f"{exc}); check that it is running and that the address is right"
                )
                failure.__cause__ = exc
            else:
                if response.status_code < 400:
                    return response
                try:
                    body = response.json()
                    code, detail = str(body["error"]), str(body["detail"])
                except (ValueError, KeyError, TypeError):
                    code, detail = "http_error", response.text[:500]
                if response.status_code < 500:
                    raise AsyncRefused(detail, response.status_code, code)
                failure = ConnectionFailed(
                    f"the aggregator at {self.url} answered {response.status_code} "
                    f"({code}: {detail[:200]})",
                    retry_after=retry_after(response.headers),
                )
                wait = max(delay, failure.retry_after or 0.0)
            if self._stop.is_set() or (
                self.give_up_after is not None and loop.time() - started > self.give_up_after
            ):
                raise failure
            log.info("%s: %s; retrying in %.1f s", self.name, failure, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.backoff_max)

    async def _fetch_global(
        self, http: httpx.AsyncClient, after: int, wait: float, agent_id: str | None = None
    ) -> tuple[GlobalModelInfo, bytes | bytearray] | None:
        """Return the newest global model above `after`, streamed into one buffer, or None."""
        delay = 0.1
        while True:
            params: dict[str, Any] = {"after": after, "wait": wait}
            if agent_id is not None:
                params["agent_id"] = agent_id
            request = http.build_request(
                "GET", "/v1/models/global/latest", params=params, timeout=wait + self.timeout
            )
            try:
                response = await http.send(request, stream=True)
            except httpx.TransportError:
                if self._stop.is_set():
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            if response.status_code >= 500 and not self._stop.is_set():  # an outage: wait
                await response.aclose()
                await asyncio.sleep(max(delay, retry_after(response.headers) or 0.0))
                delay = min(delay * 2, self.backoff_max)
                continue
            try:
                if response.status_code == 204:
                    return None
                if response.status_code >= 400:
                    await response.aread()
                    raise AsyncRefused(response.text[:500], response.status_code, "http_error")
                info = parse_message(GlobalModelInfo, response.headers.get(MESSAGE_HEADER))
                try:
                    return info, await _read_into_buffer(response)
                except (httpx.TransportError, ConnectionFailed):
                    # The link broke mid-body: ask again, as when the request failed.
                    if self._stop.is_set():
                        raise
            finally:
                await response.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    # --- push -----------------------------------------------------------------------------
    async def _listen(self, agent_id: str) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        base = self.url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        ws_url = f"{base}/v1/ws?agent_id={agent_id}"
        delay = 0.1
        while not self._stop.is_set():
            try:
                secure = ws_url.startswith("wss://")
                async with connect(
                    ws_url,
                    open_timeout=30,
                    close_timeout=1,
                    ssl=(self.tls or ssl.create_default_context()) if secure else None,
                    additional_headers=self._auth(),
                    compression=None,  # tiny JSON messages: no zlib state per connection
                ) as ws:
                    delay = 0.1
                    async for raw in ws:
                        push = PushMessage.model_validate(json.loads(raw))
                        self.announced = max(self.announced, push.round)
                        self.push_finished = push.finished
            except (OSError, WebSocketException, ValueError, TimeoutError):
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, self.backoff_max)

    # --- the loop -------------------------------------------------------------------------
    def _initial(self) -> Weights | None:
        if not self.send_initial:
            return None
        if self.initial_weights is not None:
            return dict(self.initial_weights)
        make = getattr(self.engine, "initial_weights", None)
        return make() if callable(make) else None

    def stop(self) -> None:
        self._stop.set()

    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    async def run(self) -> AsyncAgentResult:
        """Run rounds until the aggregator finishes the run, `max_rounds`, or `stop()`."""
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        async with httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(self.timeout, connect=30.0),
            verify=self.tls if self.tls is not None else True,
            limits=limits,
            headers=self._auth(),
        ) as http:
            initial = self._initial()
            # views of the tensors (no encoded copy), sent in slices
            body = codec.encode_parts(initial) if initial is not None else []
            del initial
            response = await self._send(
                http,
                "POST",
                "/v1/register",
                model=body,
                headers={
                    MESSAGE_HEADER: RegisterRequest(agent_name=self.name).model_dump_json(),
                    "content-length": str(body_size(body)),
                },
            )
            del body
            reply = RegisterResponse.model_validate(response.json())
            credential = getattr(reply, "credential", None)
            if isinstance(credential, str) and credential:
                self.token = credential
                http.headers.update(self._auth())
            self.asynchronous = reply.asynchronous
            if reply.secure_aggregation:
                raise FedloopError(NO_SECAGG.format(agent="AsyncAgent"))
            result = AsyncAgentResult(agent_id=reply.agent_id)
            listener = (
                asyncio.create_task(self._listen(reply.agent_id)) if self.mode == "push" else None
            )
            try:
                await self._rounds(http, result)
            finally:
                self._stop.set()
                if listener is not None:
                    listener.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await listener
            return result

    async def _rounds(self, http: httpx.AsyncClient, result: AsyncAgentResult) -> None:
        loop = asyncio.get_running_loop()
        wait_after = -1
        while not self._stop.is_set():
            if result.finished or (
                self.max_rounds is not None and result.rounds_trained >= self.max_rounds
            ):
                return
            held = max(result.global_round, wait_after)
            # As `Agent`: push or poll, the wait is a long poll, and a push-mode agent names
            # itself in it, so that the aggregator does not announce it the model it answers.
            waiter = result.agent_id if self.mode == "push" else None
            asked = loop.time()
            fetched = await self._fetch_global(http, held, self.poll_wait, waiter)
            if fetched is None:  # not yet: ask again, but not at once (`POLL_GAP`)
                with contextlib.suppress(TimeoutError):
                    gap = max(0.0, asked + POLL_GAP - loop.time())
                    await asyncio.wait_for(self._stop.wait(), gap)
                continue
            started = loop.time()
            info, data = fetched
            fetched = None  # else this round's buffer lives on through the next download
            result.global_round, result.finished = info.round, info.finished
            if info.side is not None and not info.finished:
                raise FedloopError(NO_SIDE.format(agent="AsyncAgent", strategy=info.side.strategy))
            weights = codec.decode(data)
            if self.evaluate_global:
                await self._evaluate(http, result.agent_id, info.round, weights, info.config)
            if info.finished:
                return
            config = {**info.config, "round": info.round + 1}
            if self.train_in_thread:
                trained = await asyncio.to_thread(self.engine.train, weights, config)
            else:
                trained = self.engine.train(weights, config)
            new, num_samples, metrics = trained
            local = codec.encode_parts(new)  # views of `new`: uploaded without a copy
            del new, weights, data, trained
            if (
                not self.asynchronous
                and self.mode == "push"
                and self.announced > result.global_round
            ):
                continue  # overtaken by a newer global model while training
            message = UploadRequest(
                agent_id=result.agent_id,
                round=info.round + 1,
                num_samples=int(num_samples),
                metrics={k: float(v) for k, v in dict(metrics).items()},
            )
            try:
                response = await self._send(
                    http,
                    "POST",
                    "/v1/updates",
                    model=local,
                    headers={
                        MESSAGE_HEADER: message.model_dump_json(),
                        "content-length": str(body_size(local)),
                    },
                )
            except AsyncRefused as exc:
                if exc.code not in _OVERTAKEN:
                    raise
                log.info("%s: local model of round %d discarded: %s", self.name, info.round, exc)
                continue
            finally:
                del local
            upload = UploadResponse.model_validate(response.json())
            result.rounds_trained += 1
            result.round_seconds.append(loop.time() - started)
            if self.asynchronous:
                wait_after = max(wait_after, upload.round - 1)

    async def _evaluate(
        self,
        http: httpx.AsyncClient,
        agent_id: str,
        round_number: int,
        weights: Weights,
        config: Mapping[str, Any],
    ) -> None:
        metrics = self.engine.evaluate(weights, dict(config))
        message = MetricsReport(
            agent_id=agent_id,
            round=round_number,
            metrics={k: float(v) for k, v in dict(metrics).items()},
        )
        with contextlib.suppress(AsyncRefused):
            await self._send(http, "POST", "/v1/evaluations", content=message.model_dump_json())


async def _read_into_buffer(response: httpx.Response) -> bytes | bytearray:
    """Return a streamed response's body, in one preallocated buffer when its size is known."""
    size = BodyBuffer.announced(response)
    if size is None:
        return await response.aread()
    buffer = BodyBuffer(size)
    async for chunk in response.aiter_raw():
        buffer.add(chunk)
    return buffer.done()


async def run_agents(agents: list[AsyncAgent]) -> list[AsyncAgentResult]:
    """Run the agents concurrently in this event loop and return their results, in order."""
    return list(await asyncio.gather(*(agent.run() for agent in agents)))
