"""Loopback benchmark of candidate transports for fedloop (see docs/decisions/0001-transport.md).

Every (transport, case) pair gets a fresh server in a subprocess on a free 127.0.0.1 port, so the
server's peak RSS (VmHWM) belongs to that case alone. The client runs in this process.
One JSON line is printed per case.

Cases
  upload       client POSTs one ``--size-mb`` body in 1 MiB slices (Content-Length set); the
               server streams it into one preallocated bytearray.
  upload_whole same, but the client hands the whole body to its HTTP library in one call.
  download     server streams a stored body in 1 MiB slices; the client reads all of it.
  download_whole  same, but the server hands the whole body to the framework in one call
               (Starlette ``Response(bytes)`` / aiohttp ``Response(body=bytes)``).
  small        ``--clients`` concurrent clients, each one POST of 64 KiB and one GET of 64 KiB;
               every client has its own client object and connection, as separate agent
               processes would (the objects are made before the clock starts).
  small_shared ``--shared-clients`` (default 100) concurrent POST+GET pairs through ONE client
               object (httpx pool / aiohttp session / one gRPC channel): what an in-process
               simulation of many agents would do.
  ws_broadcast ``--clients`` WebSockets held open; one small JSON message broadcast to all;
               time from the trigger until the last client has it.

Transports
  starlette-uvicorn-h11        Starlette on uvicorn, h11 parser, asyncio loop; httpx / websockets
                               client. Needs only fedloop's core dependencies.
  starlette-uvicorn-httptools  same with the httptools parser (``uvicorn[standard]``).
  starlette-uvicorn-httptools-uvloop  same with uvloop on server and client.
  aiohttp                      aiohttp web server and aiohttp client (HTTP and WebSocket).
  starlette-uvicorn-httptools+aiohttp-client  the httptools server driven by the aiohttp
                               client, to tell server-side limits from httpx-client limits.
  grpc                         grpc.aio, raw-bytes methods (no codegen): client-streaming upload
                               and server-streaming download in 1 MiB messages; unary calls for
                               ``small`` (one channel per client); server-streaming subscription
                               for ``ws_broadcast``.

Transports whose packages are not importable are skipped with a note (a JSON line with
``"skipped"``). Usage:

    python bench/transport.py            # 100 MB body, 5 reps, 500 clients
    python bench/transport.py --quick    # 20 MB body, 3 reps, 100 clients
    python bench/transport.py --transports aiohttp,grpc --cases upload,download
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import importlib.util
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

CHUNK = 1 << 20  # 1 MiB: slice size for streamed bodies and gRPC messages
SMALL = 64 * 1024
BROADCAST_MSG = json.dumps({"type": "round_open", "round": 7, "model": "/v1/models/global/7"})

TRANSPORTS: dict[str, list[str]] = {
    "starlette-uvicorn-h11": ["starlette", "uvicorn", "h11", "httpx", "websockets"],
    "starlette-uvicorn-httptools": ["starlette", "uvicorn", "httptools", "httpx", "websockets"],
    "starlette-uvicorn-httptools-uvloop": [
        "starlette",
        "uvicorn",
        "httptools",
        "uvloop",
        "httpx",
        "websockets",
    ],
    "aiohttp": ["aiohttp"],
    "grpc": ["grpc"],
    # cross-check: which side limits the Starlette numbers, uvicorn or the httpx client?
    "starlette-uvicorn-httptools+aiohttp-client": [
        "starlette",
        "uvicorn",
        "httptools",
        "aiohttp",
        "websockets",
    ],
}
CASES = [
    "upload",
    "upload_whole",
    "download",
    "download_whole",
    "small",
    "small_shared",
    "ws_broadcast",
]


def _missing(mods: list[str]) -> list[str]:
    return [m for m in mods if importlib.util.find_spec(m) is None]


def _rss_mb() -> dict[str, float]:
    """Current and peak RSS of this process. VmHWM, not ru_maxrss: on Linux ru_maxrss survives
    execve, so a server started from a client that holds a 100 MB body would inherit its peak."""
    vals = {"VmRSS": 0.0, "VmHWM": 0.0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in vals:
                    vals[k] = int(v.split()[0]) / 1024  # kB
    except OSError:  # not Linux: fall back to ru_maxrss (KiB on Linux, bytes on macOS)
        vals["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mb": round(vals["VmHWM"], 1), "rss_mb": round(vals["VmRSS"], 1)}


def _make_blob(n: int) -> bytes:
    import numpy as np

    return np.random.default_rng(0).bytes(n)


# --------------------------------------------------------------------------------------------
# Servers (run in the subprocess)
# --------------------------------------------------------------------------------------------


def serve_starlette(port: int, size: int, http: str, loop: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    blob = _make_blob(size) if size else b""
    small_blob = _make_blob(SMALL)
    base = _rss_mb()
    clients: set[WebSocket] = set()

    async def upload(request: Request) -> Response:
        n = int(request.headers.get("content-length", "0"))
        buf = bytearray()
        if n:
            buf = bytearray(n)  # one preallocated copy; chunks land in place
        view = memoryview(buf)
        got = 0
        async for chunk in request.stream():
            if got + len(chunk) > len(buf):
                view.release()
                buf.extend(b"\0" * (got + len(chunk) - len(buf)))
                view = memoryview(buf)
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        view.release()
        return JSONResponse({"received": got})

    async def download(request: Request) -> Response:
        mv = memoryview(blob)

        async def gen():
            for i in range(0, len(mv), CHUNK):
                yield mv[i : i + CHUNK]

        return StreamingResponse(
            gen(), media_type="application/octet-stream", headers={"content-length": str(len(blob))}
        )

    async def download_whole(request: Request) -> Response:
        return Response(blob, media_type="application/octet-stream")

    async def small_get(request: Request) -> Response:
        return Response(small_blob, media_type="application/octet-stream")

    async def small_post(request: Request) -> Response:
        body = await request.body()
        return JSONResponse({"received": len(body)})

    async def stats(request: Request) -> Response:
        return JSONResponse({"base": base, "now": _rss_mb(), "ws_clients": len(clients)})

    async def ws_endpoint(ws: WebSocket) -> None:
        await ws.accept()
        clients.add(ws)
        try:
            while True:
                await ws.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            clients.discard(ws)

    async def broadcast(request: Request) -> Response:
        targets = list(clients)
        await asyncio.gather(*(c.send_text(BROADCAST_MSG) for c in targets), return_exceptions=True)
        return JSONResponse({"sent": len(targets)})

    app = Starlette(
        routes=[
            Route("/upload", upload, methods=["POST"]),
            Route("/download", download),
            Route("/download_whole", download_whole),
            Route("/small", small_get),
            Route("/small", small_post, methods=["POST"]),
            Route("/stats", stats),
            Route("/broadcast", broadcast, methods=["POST"]),
            WebSocketRoute("/ws", ws_endpoint),
        ]
    )
    print("READY", flush=True)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        http=http,
        loop=loop,
        log_level="warning",
        access_log=False,
        backlog=2048,
        lifespan="off",
        ws="auto",
    )


def serve_aiohttp(port: int, size: int) -> None:
    from aiohttp import WSMsgType, web

    blob = _make_blob(size) if size else b""
    small_blob = _make_blob(SMALL)
    base = _rss_mb()
    clients: set[web.WebSocketResponse] = set()

    async def upload(request: web.Request) -> web.Response:
        n = request.content_length or 0
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        async for chunk in request.content.iter_any():
            if got + len(chunk) > len(buf):
                view.release()
                buf.extend(b"\0" * (got + len(chunk) - len(buf)))
                view = memoryview(buf)
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        view.release()
        return web.json_response({"received": got})

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(blob)
        await resp.prepare(request)
        mv = memoryview(blob)
        for i in range(0, len(mv), CHUNK):
            await resp.write(mv[i : i + CHUNK])
        await resp.write_eof()
        return resp

    async def download_whole(request: web.Request) -> web.Response:
        return web.Response(body=blob, content_type="application/octet-stream")

    async def small_get(request: web.Request) -> web.Response:
        return web.Response(body=small_blob, content_type="application/octet-stream")

    async def small_post(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"received": len(body)})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"base": base, "now": _rss_mb(), "ws_clients": len(clients)})

    async def ws_endpoint(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        clients.add(ws)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            clients.discard(ws)
        return ws

    async def broadcast(request: web.Request) -> web.Response:
        targets = list(clients)
        await asyncio.gather(*(c.send_str(BROADCAST_MSG) for c in targets), return_exceptions=True)
        return web.json_response({"sent": len(targets)})

    # client_max_size only limits request.read()/post(); the 64 KiB POST fits the 1 MiB default.
    app = web.Application()
    app.add_routes(
        [
            web.post("/upload", upload),
            web.get("/download", download),
            web.get("/download_whole", download_whole),
            web.get("/small", small_get),
            web.post("/small", small_post),
            web.get("/stats", stats),
            web.post("/broadcast", broadcast),
            web.get("/ws", ws_endpoint),
        ]
    )
    print("READY", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, backlog=2048, print=None, access_log=None)


GRPC_OPTS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def serve_grpc(port: int, size: int) -> None:
    import grpc

    blob = _make_blob(size) if size else b""
    small_blob = _make_blob(SMALL)
    base = _rss_mb()
    queues: set[asyncio.Queue] = set()

    async def upload(req_iter, ctx):
        buf = bytearray()
        async for chunk in req_iter:
            buf += chunk
        return json.dumps({"received": len(buf)}).encode()

    async def download(req, ctx):
        for i in range(0, len(blob), CHUNK):
            yield blob[i : i + CHUNK]

    async def small_get(req, ctx):
        return small_blob

    async def small_post(req, ctx):
        return json.dumps({"received": len(req)}).encode()

    async def stats(req, ctx):
        return json.dumps({"base": base, "now": _rss_mb(), "ws_clients": len(queues)}).encode()

    async def subscribe(req, ctx):
        q: asyncio.Queue = asyncio.Queue()
        queues.add(q)
        await ctx.send_initial_metadata(())  # lets the client's wait_for_connection() return
        try:
            while True:
                yield await q.get()
        finally:
            queues.discard(q)

    async def broadcast(req, ctx):
        msg = BROADCAST_MSG.encode()
        for q in list(queues):
            q.put_nowait(msg)
        return json.dumps({"sent": len(queues)}).encode()

    handlers = grpc.method_handlers_generic_handler(
        "fedloop.Bench",
        {
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
            "Download": grpc.unary_stream_rpc_method_handler(download),
            "SmallGet": grpc.unary_unary_rpc_method_handler(small_get),
            "SmallPost": grpc.unary_unary_rpc_method_handler(small_post),
            "Stats": grpc.unary_unary_rpc_method_handler(stats),
            "Subscribe": grpc.unary_stream_rpc_method_handler(subscribe),
            "Broadcast": grpc.unary_unary_rpc_method_handler(broadcast),
        },
    )

    async def main() -> None:
        server = grpc.aio.server(options=GRPC_OPTS)
        server.add_generic_rpc_handlers((handlers,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("READY", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def run_server(name: str, port: int, size: int) -> None:
    name = name.split("+")[0]
    if name == "starlette-uvicorn-h11":
        serve_starlette(port, size, "h11", "asyncio")
    elif name == "starlette-uvicorn-httptools":
        serve_starlette(port, size, "httptools", "asyncio")
    elif name == "starlette-uvicorn-httptools-uvloop":
        serve_starlette(port, size, "httptools", "uvloop")
    elif name == "aiohttp":
        serve_aiohttp(port, size)
    elif name == "grpc":
        serve_grpc(port, size)
    else:
        raise SystemExit(f"unknown transport {name}")


# --------------------------------------------------------------------------------------------
# Clients (run in this process)
# --------------------------------------------------------------------------------------------


class HttpxClient:
    def __init__(self, base: str, conns: int) -> None:
        import httpx

        self.base = base
        self.ws_base = base.replace("http://", "ws://")
        self.c = httpx.AsyncClient(
            base_url=base,
            timeout=120.0,
            limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns),
        )

    async def close(self) -> None:
        await self.c.aclose()

    async def upload(self, body: bytes, whole: bool = False) -> int:
        # Streamed: 1 MiB memoryview slices with an explicit Content-Length (httpx then sends
        # them as they come, not chunked). Whole: one bytes object handed to the transport.
        content = body if whole else _aslices(body)
        r = await self.c.post(
            "/upload",
            content=content,
            headers={"content-type": "application/octet-stream", "content-length": str(len(body))},
        )
        r.raise_for_status()
        return r.json()["received"]

    async def download(self, path: str) -> int:
        async with self.c.stream("GET", path) as r:
            r.raise_for_status()
            n = 0
            async for chunk in r.aiter_raw():
                n += len(chunk)
        return n

    async def agent(self):
        """A client of its own, as a separate agent process would have (one connection)."""
        import ssl

        import httpx

        if not hasattr(self, "_ssl"):
            self._ssl = ssl.create_default_context()  # share it: building one costs ~ms
        return httpx.AsyncClient(
            base_url=self.base,
            timeout=120.0,
            verify=self._ssl,
            limits=httpx.Limits(max_connections=1),
        )

    @staticmethod
    async def close_agent(agent) -> None:
        await agent.aclose()

    async def small_pair(self, body: bytes, agent=None) -> None:
        c = agent or self.c
        r = await c.post("/small", content=body)
        r.raise_for_status()
        r = await c.get("/small")
        r.raise_for_status()
        assert len(r.content) == SMALL

    async def stats(self) -> dict:
        return (await self.c.get("/stats")).json()

    async def broadcast(self) -> int:
        return (await self.c.post("/broadcast")).json()["sent"]

    async def ws_connect(self):
        from websockets.asyncio.client import connect

        return await connect(self.ws_base + "/ws", open_timeout=60, max_queue=4)

    @staticmethod
    async def ws_recv(ws) -> str:
        return await ws.recv()

    @staticmethod
    async def ws_close(ws) -> None:
        await ws.close()


class AiohttpClient:
    def __init__(self, base: str, conns: int) -> None:
        import aiohttp

        self.base = base
        self.s = aiohttp.ClientSession(
            base, connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
        )

    async def close(self) -> None:
        await self.s.close()

    async def upload(self, body: bytes, whole: bool = False) -> int:
        data = body if whole else _aslices(body)
        async with self.s.post(
            "/upload",
            data=data,
            headers={"Content-Length": str(len(body)), "Content-Type": "application/octet-stream"},
        ) as r:
            r.raise_for_status()
            return (await r.json())["received"]

    async def download(self, path: str) -> int:
        async with self.s.get(path) as r:
            r.raise_for_status()
            n = 0
            async for chunk in r.content.iter_any():
                n += len(chunk)
        return n

    async def agent(self):
        import aiohttp

        return aiohttp.ClientSession(self.base, timeout=aiohttp.ClientTimeout(total=120))

    @staticmethod
    async def close_agent(agent) -> None:
        await agent.close()

    async def small_pair(self, body: bytes, agent=None) -> None:
        s = agent or self.s
        async with s.post("/small", data=body) as r:
            r.raise_for_status()
            await r.read()
        async with s.get("/small") as r:
            r.raise_for_status()
            assert len(await r.read()) == SMALL

    async def stats(self) -> dict:
        async with self.s.get("/stats") as r:
            return await r.json()

    async def broadcast(self) -> int:
        async with self.s.post("/broadcast") as r:
            return (await r.json())["sent"]

    async def ws_connect(self):
        return await self.s.ws_connect("/ws")

    @staticmethod
    async def ws_recv(ws) -> str:
        return await ws.receive_str()

    @staticmethod
    async def ws_close(ws) -> None:
        await ws.close()


class GrpcClient:
    def __init__(self, base: str, conns: int) -> None:
        import grpc

        self.grpc = grpc
        self.target = base.replace("http://", "")
        self.ch = self._channel()
        self._extra: list = []

    def _channel(self):
        # local_subchannel_pool: give each channel its own TCP connection
        return self.grpc.aio.insecure_channel(
            self.target, options=[*GRPC_OPTS, ("grpc.use_local_subchannel_pool", 1)]
        )

    def _m(self, ch, kind: str, name: str):
        return getattr(ch, kind)(f"/fedloop.Bench/{name}")

    async def close(self) -> None:
        for ch in self._extra:
            await ch.close()
        await self.ch.close()

    async def upload(self, body: bytes, whole: bool = False) -> int:
        mv = memoryview(body)

        async def chunks():
            for i in range(0, len(mv), CHUNK):
                yield bytes(mv[i : i + CHUNK])

        r = await self._m(self.ch, "stream_unary", "Upload")(chunks())
        return json.loads(r)["received"]

    async def download(self, path: str) -> int:
        n = 0
        async for chunk in self._m(self.ch, "unary_stream", "Download")(b""):
            n += len(chunk)
        return n

    async def agent(self):
        return self._channel()  # one channel (one TCP connection) per agent

    @staticmethod
    async def close_agent(agent) -> None:
        await agent.close()

    async def small_pair(self, body: bytes, agent=None) -> None:
        ch = agent or self.ch  # the shared channel multiplexes everything on one HTTP/2 conn
        await self._m(ch, "unary_unary", "SmallPost")(body)
        r = await self._m(ch, "unary_unary", "SmallGet")(b"")
        assert len(r) == SMALL

    async def stats(self) -> dict:
        return json.loads(await self._m(self.ch, "unary_unary", "Stats")(b""))

    async def broadcast(self) -> int:
        return json.loads(await self._m(self.ch, "unary_unary", "Broadcast")(b""))["sent"]

    async def ws_connect(self):
        ch = self._channel()
        self._extra.append(ch)
        call = self._m(ch, "unary_stream", "Subscribe")(b"")
        await call.wait_for_connection()
        return (ch, call)

    @staticmethod
    async def ws_recv(ws) -> str:
        return (await ws[1].read()).decode()

    @staticmethod
    async def ws_close(ws) -> None:
        ws[1].cancel()


async def _aslices(body: bytes):
    mv = memoryview(body)
    for i in range(0, len(mv), CHUNK):
        yield mv[i : i + CHUNK]


def client_for(name: str, base: str, conns: int):
    if name.endswith("+aiohttp-client"):
        return AiohttpClient(base, conns)
    if name.startswith("starlette"):
        return HttpxClient(base, conns)
    if name == "aiohttp":
        return AiohttpClient(base, conns)
    return GrpcClient(base, conns)


async def run_case(name: str, case: str, base: str, args: argparse.Namespace) -> dict[str, Any]:
    size = int(args.size_mb * 1e6)
    conns = max(args.clients, 10)
    cl = client_for(name, base, conns)
    out: dict[str, Any] = {}
    try:
        if case in ("upload", "upload_whole"):
            if name == "grpc" and case == "upload_whole":
                return {
                    "skipped": "gRPC messages are capped; a whole-body message is not a "
                    "meaningful mode (Flower raises the cap to 512 MB)"
                }
            body = _make_blob(size)
            await cl.upload(body[:SMALL])  # warm the connection
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                got = await cl.upload(body, whole=case == "upload_whole")
                times.append(time.perf_counter() - t)
                assert got == size, (got, size)
            out = _throughput(size, times)
        elif case in ("download", "download_whole"):
            if name == "grpc" and case == "download_whole":
                return {
                    "skipped": "gRPC messages are capped; a whole-body message is not a "
                    "meaningful mode (Flower raises the cap to 512 MB)"
                }
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                got = await cl.download("/" + case)
                times.append(time.perf_counter() - t)
                assert got == size, (got, size)
            out = _throughput(size, times)
        elif case in ("small", "small_shared"):
            body = _make_blob(SMALL)
            n = args.clients if case == "small" else args.shared_clients
            agents = [await cl.agent() for _ in range(n)] if case == "small" else [None] * n
            t = time.perf_counter()
            res = await asyncio.gather(
                *(cl.small_pair(body, a) for a in agents), return_exceptions=True
            )
            dt = time.perf_counter() - t
            errs = [r for r in res if isinstance(r, BaseException)]
            out = {
                "clients": n,
                "requests": 2 * n,
                "seconds": round(dt, 3),
                "requests_per_s": round(2 * n / dt, 1),
                "errors": len(errs),
            }
            if errs:
                out["first_error"] = repr(errs[0])[:200]
            if case == "small":
                await asyncio.gather(*(cl.close_agent(a) for a in agents), return_exceptions=True)
        elif case == "ws_broadcast":
            t = time.perf_counter()
            socks = []
            for i in range(0, args.clients, 50):  # connect in waves of 50
                socks += await asyncio.gather(
                    *(cl.ws_connect() for _ in range(min(50, args.clients - i)))
                )
            t_conn = time.perf_counter() - t
            for _ in range(100):  # wait until the server has registered every socket
                if (await cl.stats())["ws_clients"] >= len(socks):
                    break
                await asyncio.sleep(0.05)
            done_at: list[float] = []

            async def recv(ws) -> None:
                msg = await cl.ws_recv(ws)
                done_at.append(time.perf_counter())
                assert json.loads(msg)["round"] == 7

            tasks = [asyncio.create_task(recv(ws)) for ws in socks]
            await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            sent = await cl.broadcast()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            dt = max(done_at) - t0
            out = {
                "clients": len(socks),
                "sent": sent,
                "connect_seconds": round(t_conn, 3),
                "seconds": round(dt, 4),
                "received": len(done_at),
            }
            await asyncio.gather(*(cl.ws_close(ws) for ws in socks), return_exceptions=True)
        st = await cl.stats()
        out["server_base_rss_mb"] = st["base"]["rss_mb"]
        out["server_peak_rss_mb"] = st["now"]["peak_rss_mb"]
    finally:
        await cl.close()
    return out


def _throughput(size: int, times: list[float]) -> dict[str, Any]:
    med = statistics.median(times)
    return {
        "mb": round(size / 1e6, 1),
        "reps": len(times),
        "mb_per_s": round(size / 1e6 / med, 1),
        "mb_per_s_all": [round(size / 1e6 / t, 1) for t in times],
    }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(name: str, size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    p = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--serve",
            name,
            "--port",
            str(port),
            "--serve-size",
            str(size),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline()
    if "READY" not in line:
        p.kill()
        raise RuntimeError(f"server {name} failed to start: {line!r}")
    deadline = time.time() + 30
    while time.time() < deadline:  # READY is printed just before bind; wait for the port
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    return p, f"http://127.0.0.1:{port}"


def stop_server(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 MB body, 3 reps, 100 clients")
    ap.add_argument("--size-mb", type=float, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--shared-clients", type=int, default=100)
    ap.add_argument("--case-timeout", type=float, default=240.0)
    ap.add_argument("--transports", default=",".join(TRANSPORTS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument(
        "--uvloop-client",
        action="store_true",
        help="run the client on uvloop too (default: asyncio)",
    )
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-size", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.serve:
        run_server(args.serve, args.port, args.serve_size)
        return

    args.size_mb = args.size_mb or (20 if args.quick else 100)
    args.reps = args.reps or (3 if args.quick else 5)
    args.clients = args.clients or (100 if args.quick else 500)
    size = int(args.size_mb * 1e6)

    print(
        json.dumps(
            {
                "env": {
                    "date": _dt.date.today().isoformat(),
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "machine": platform.machine(),
                    "size_mb": args.size_mb,
                    "reps": args.reps,
                    "clients": args.clients,
                    "shared_clients": args.shared_clients,
                    "versions": _versions(),
                }
            }
        ),
        flush=True,
    )

    for name in args.transports.split(","):
        miss = _missing(TRANSPORTS[name])
        if miss:
            print(
                json.dumps({"transport": name, "skipped": f"not importable: {', '.join(miss)}"}),
                flush=True,
            )
            continue
        for case in args.cases.split(","):
            srv_size = size if case.startswith("download") else 0
            p, base = start_server(name, srv_size)
            try:
                loop_factory = None
                if args.uvloop_client or name.endswith("-uvloop"):
                    import uvloop

                    loop_factory = uvloop.new_event_loop
                with asyncio.Runner(loop_factory=loop_factory) as r:
                    res = r.run(
                        asyncio.wait_for(run_case(name, case, base, args), args.case_timeout)
                    )
            except Exception as e:  # report and go on with the next case
                res = {"error": repr(e)[:300]}
            finally:
                stop_server(p)
            print(json.dumps({"transport": name, "case": case, **res}), flush=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in [
        "starlette",
        "uvicorn",
        "h11",
        "httptools",
        "uvloop",
        "httpx",
        "websockets",
        "aiohttp",
        "grpcio",
        "numpy",
    ]:
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


if __name__ == "__main__":
    main()
