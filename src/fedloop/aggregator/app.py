"""The aggregator's HTTP and WebSocket API: a thin Starlette layer over `Aggregator`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from fedloop.aggregator import metrics, openapi
from fedloop.aggregator.direct import EXTENSION, DirectBody
from fedloop.aggregator.secure import routes as secure_routes
from fedloop.aggregator.service import Aggregator, Principal
from fedloop.config import AggregatorConfig
from fedloop.dashboard import routes as dashboard_routes
from fedloop.errors import ProtocolError
from fedloop.protocol.messages import (
    ErrorResponse,
    MetricsReport,
    RegisterRequest,
    UploadRequest,
    parse_message,
)
from fedloop.protocol.version import MESSAGE_HEADER, PROTOCOL_VERSION
from fedloop.store.blobs import BodyPool, HashedBody, PooledBody, new_hasher

log = logging.getLogger("fedloop.aggregator")

MAX_JSON_BYTES = 1024 * 1024
LONG_POLL_MAX = 60.0


def _error(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        ErrorResponse(error=code, detail=detail).model_dump(), status_code=status, headers=headers
    )


def _error_headers(exc: ProtocolError) -> dict[str, str] | None:
    """The headers a refusal carries: `WWW-Authenticate` on a 401 (RFC 6750), `Retry-After`
    (whole seconds) when the refusal says when to try again."""
    headers: dict[str, str] = {}
    if exc.status == 401:
        challenge = f'Bearer realm="fedloop", error="invalid_token", code="{exc.code}"'
        headers["www-authenticate"] = challenge
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(0, math.ceil(exc.retry_after)))
    return headers or None


SEND_CHUNK = 1024 * 1024  # bytes per ASGI body message when a model is sent


class ModelResponse(Response):
    """A model's safetensors bytes, sent from the pieces it is held in (`GlobalModel.parts`).

    Sent as 1 MiB memoryview slices with a Content-Length: no joined copy of the model, and the
    server's write buffer never holds more than a slice or two (it waits for the socket to
    drain between them), where a whole-body `Response` made the transport copy all of it.
    """

    media_type = "application/octet-stream"

    def __init__(
        self,
        parts: Sequence[bytes | bytearray | memoryview],
        headers: dict[str, str],
        size: int | None = None,
    ) -> None:
        self.parts = parts
        self.size = sum(len(part) for part in parts) if size is None else size
        super().__init__(headers={**headers, "content-length": str(self.size)})

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        for part in self.parts:
            view = memoryview(part).cast("B")
            for start in range(0, len(view), SEND_CHUNK):
                yield view[start : start + SEND_CHUNK]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        if scope.get("method") != "HEAD":
            async for chunk in self.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class BlobResponse(ModelResponse):
    """A stored model's file, read and sent 1 MiB at a time (never whole in memory)."""

    def __init__(self, path: Path, headers: dict[str, str]) -> None:
        self.path = path
        super().__init__([], headers, size=path.stat().st_size)

    async def chunks(self) -> AsyncIterator[bytes | memoryview]:
        with self.path.open("rb", buffering=0) as handle:
            while chunk := await asyncio.to_thread(handle.read, SEND_CHUNK):
                yield chunk


async def read_body(
    request: Request, limit: int, pool: BodyPool[PooledBody] | None = None
) -> HashedBody | PooledBody:
    """Return the request body, refusing it as soon as it passes `limit` bytes.

    The body is a `HashedBody`, except that with a `pool` a non-empty body of known size goes
    into a reused `PooledBody` (no zero-fill, no page faults; page-aligned, so the blob store
    writes it to the disk directly). A large one is read by the socket straight into it where
    the server offers that (`direct.DirectBody`), and left unhashed (``digest`` None): its
    taker hashes it on a worker thread. Others are hashed chunk by chunk as they stream in.
    """
    hasher = new_hasher()
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise ProtocolError("Content-Length is not a number", 400, "bad_request") from exc
        if size > limit:
            raise ProtocolError(
                f"body of {size} bytes exceeds the limit of {limit} bytes (max_model_bytes)",
                413,
                "too_large",
            )
        # Known size: one allocation, filled in place (no regrowth copies of a large model).
        # (An empty body cannot be a memory map.)
        body = pool.acquire(size) if pool is not None and size else HashedBody(size)
        direct = request.scope.get("extensions", {}).get(EXTENSION)
        if isinstance(direct, DirectBody) and direct.size == size:
            # Not hashed here: the event loop's thread only moves the bytes, and whoever
            # takes the body hashes it on a worker thread (`Aggregator._check_and_store`, in
            # the pass that checks the values; `BlobStore.put`).
            with memoryview(body) as view:
                await direct.read_into(view)
            return body
        view, filled = memoryview(body), 0
        async for chunk in request.stream():
            end = filled + len(chunk)
            if end > size:
                raise ProtocolError("body is longer than its Content-Length", 400, "bad_request")
            view[filled:end] = chunk
            hasher.update(chunk)
            filled = end
        view.release()
        if filled != size:
            raise ProtocolError("body is shorter than its Content-Length", 400, "bad_request")
        body.digest = hasher.hexdigest()
        return body
    body = HashedBody()
    async for chunk in request.stream():
        body += chunk
        hasher.update(chunk)
        if len(body) > limit:
            raise ProtocolError(
                f"body exceeds the limit of {limit} bytes (max_model_bytes)", 413, "too_large"
            )
    body.digest = hasher.hexdigest()
    return body


def create_app(config: AggregatorConfig, aggregator: Aggregator | None = None) -> Starlette:
    """Return the ASGI application serving the aggregator's API."""
    agg = aggregator or Aggregator(config)
    limit = config.max_model_bytes

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "protocol": PROTOCOL_VERSION})

    async def who(request: Request) -> Principal | None:
        # Before any body is read: a stranger's gigabyte is refused unread.
        return await agg.authenticate(request.headers.get("authorization"))

    async def register(request: Request) -> Response:
        principal = await who(request)
        message = parse_message(RegisterRequest, request.headers.get(MESSAGE_HEADER))
        agg.check_registrant(principal, message.agent_name)
        body = await read_body(request, limit, agg.bodies)
        reply = await agg.register(message, body, principal)
        return JSONResponse(reply.model_dump())

    async def upload(request: Request) -> Response:
        principal = await who(request)
        message = parse_message(UploadRequest, request.headers.get(MESSAGE_HEADER))
        agg.require_agent(principal, message.agent_id)
        # A duplicate or late upload is refused unread, and an agent's uploads go one at a time.
        async with agg.upload_turn(message):
            body = await read_body(request, limit, agg.bodies)
            reply = await agg.upload(message, body)
        return JSONResponse(reply.model_dump())

    async def latest_global(request: Request) -> Response:
        principal = await who(request)
        agg.require_reader(principal)
        try:
            after = int(request.query_params.get("after", "-1"))
            wait = float(request.query_params.get("wait", "0"))
        except ValueError as exc:
            raise ProtocolError("'after' must be an integer and 'wait' a number", 400) from exc
        if not (math.isfinite(wait) and wait >= 0):  # nan passes neither comparison nor min()
            raise ProtocolError(
                f"'wait' must be a number of seconds from 0 to {LONG_POLL_MAX:g} (longer waits "
                f"are cut to {LONG_POLL_MAX:g}), not {request.query_params['wait']!r}",
                400,
            )
        wait = min(wait, LONG_POLL_MAX)
        # An agent that names itself is not sent the WebSocket announcement of the model
        # this request answers with; only the agent itself may ask for that.
        waiter = request.query_params.get("agent_id")
        if waiter is not None:
            agg.require_agent(principal, waiter)
            agg.known_agent(waiter)
        model = await agg.wait_for_global(after, wait, waiter)
        if model is None:
            return Response(status_code=204, headers={"x-fedloop-status": "not-yet"})
        response = ModelResponse(
            model.parts, headers={MESSAGE_HEADER: agg.global_info().model_dump_json()}
        )
        agg.stats["bytes_out"] += response.size
        return response

    async def global_by_round(request: Request) -> Response:
        agg.require_reader(await who(request))
        number = int(request.path_params["round"])
        # Beyond int64 no round can exist, and the database cannot even be asked.
        row = (
            None if number > 2**63 - 1 else await asyncio.to_thread(agg.store.global_model, number)
        )
        if row is None:
            raise ProtocolError(
                f"there is no global model for round {number}", 404, "no_such_round"
            )
        headers = {
            "cache-control": "public, max-age=31536000, immutable",
            "etag": f'"{row.model_id}"',
        }
        model = agg.global_model
        if model is not None and model.round == number:
            # In memory already, as the very bytes of its blob: no read, no copy.
            return ModelResponse(model.parts, headers=headers)
        return BlobResponse(agg.blobs.path(row.model_id), headers=headers)

    async def strategy_state(request: Request) -> Response:
        # What the strategy ships with a global model (SCAFFOLD's c, …): for the same readers
        # as the model itself, immutable once the model is committed.
        agg.require_reader(await who(request))
        parts = await agg.shipped(int(request.path_params["round"]))
        response = ModelResponse(
            parts, headers={"cache-control": "public, max-age=31536000, immutable"}
        )
        agg.stats["bytes_out"] += response.size
        return response

    async def evaluations(request: Request) -> Response:
        principal = await who(request)
        body = await read_body(request, MAX_JSON_BYTES)
        message = parse_message(MetricsReport, bytes(body))
        agg.require_agent(principal, message.agent_id)
        await agg.report(message)
        return JSONResponse({"protocol": PROTOCOL_VERSION, "accepted": True})

    async def status(request: Request) -> Response:
        return JSONResponse(agg.status().model_dump())

    async def history(request: Request) -> Response:
        from fedloop.history import history_rows

        agg.require_admin(await who(request))

        rows = await asyncio.to_thread(history_rows, agg.store)
        return JSONResponse({"protocol": PROTOCOL_VERSION, "rounds": rows})

    async def push(websocket: WebSocket) -> None:
        agent_id = websocket.query_params.get("agent_id", "")
        try:
            principal = await agg.authenticate(websocket.headers.get("authorization"))
            agg.require_agent(principal, agent_id)
        except ProtocolError as exc:
            refusal(websocket, exc)
            try:
                await websocket.send_denial_response(
                    _error(exc.status, exc.code, str(exc), _error_headers(exc))
                )
            except RuntimeError:  # a server without the denial-response extension
                await websocket.close(code=4000 + exc.status, reason=exc.code)
            return
        if agent_id not in agg.agents:
            await websocket.close(code=4404, reason="unknown agent; register first")
            return
        await websocket.accept()
        queue = agg.subscribe(agent_id)

        async def sender() -> None:
            while True:
                message = await queue.get()
                await websocket.send_text(message.model_dump_json())

        async def receiver() -> None:
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    await websocket.receive_text()
                    agg.last_seen[agent_id] = time.time()

        tasks = [asyncio.create_task(sender()), asyncio.create_task(receiver())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            agg.unsubscribe(agent_id, queue)

    def refusal(connection: Request | WebSocket, exc: ProtocolError) -> None:
        agg.stats["rejected"] += 1
        agg.rejected_by_reason[exc.code] = agg.rejected_by_reason.get(exc.code, 0) + 1
        method = connection.method if isinstance(connection, Request) else "WS"
        log.warning("%s %s refused: %s", method, connection.url.path, exc)

    async def protocol_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProtocolError)
        refusal(request, exc)
        return _error(exc.status, exc.code, str(exc), _error_headers(exc))

    async def client_gone(request: Request, exc: Exception) -> Response:
        # The sender went away mid-body (killed, network cut): nothing was stored, as nothing is
        # before a body is complete; one line instead of a traceback. No one reads the answer.
        agg.rejected_by_reason["client_disconnected"] = (
            agg.rejected_by_reason.get("client_disconnected", 0) + 1
        )
        log.info("%s %s: the client disconnected mid-request", request.method, request.url.path)
        return Response(status_code=400)

    scrape = metrics.route(agg)

    async def admin_metrics(request: Request) -> Response:
        agg.require_admin(await who(request))
        response: Response = await scrape.endpoint(request)
        return response

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await agg.start()
        yield
        await agg.stop()

    routes: list[Any] = [
        Route("/v1/health", health),
        Route("/v1/register", register, methods=["POST"]),
        Route("/v1/updates", upload, methods=["POST"]),
        Route("/v1/models/global/latest", latest_global),
        Route("/v1/models/global/{round:int}", global_by_round),
        Route("/v1/models/global/{round:int}/state", strategy_state),
        Route("/v1/evaluations", evaluations, methods=["POST"]),
        Route("/v1/status", status),
        Route("/v1/history", history),
        WebSocketRoute("/v1/ws", push),
        Route(scrape.path, admin_metrics),
        Route("/openapi.json", openapi.endpoint),
        *secure_routes(agg),
        *dashboard_routes(agg),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ProtocolError: protocol_error, ClientDisconnect: client_gone},
    )
    app.state.aggregator = agg
    return app
