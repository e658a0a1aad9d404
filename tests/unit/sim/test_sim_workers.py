"""The local engine's worker processes: requests and answers over their sockets, errors with
their types, a worker that dies, and a caller that stops waiting. Real spawned processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fedloop.errors import ConfigError, FedloopError
from fedloop.sim import workers
from fedloop.sim.core import AgentFailed
from fedloop.sim.workers import WorkerDied, WorkerPool


def _handle(op: str, request: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
    if op == "square":
        x = int(request["x"])
        return {"value": x * x, "pid": os.getpid()}, b"\x00\xff" * x
    if op == "sleep":
        time.sleep(float(request["seconds"]))
        return {"slept": request["seconds"], "tag": request.get("tag")}, b""
    if op == "config":
        raise ConfigError("the engine wants --set lr=…")
    if op == "agent":
        raise AgentFailed("virtual agent 3 failed in train()", "Traceback: …")
    raise ValueError(f"no such op {op}")


def _serve(sock: socket.socket, fail_at_start: bool) -> None:
    def ready() -> None:
        if fail_at_start:
            raise ConfigError("cannot import the engine's module")

    workers.serve(sock, _handle, ready)


def _pool(count: int = 2, fail_at_start: bool = False) -> WorkerPool:
    return WorkerPool(count, _serve, (fail_at_start,), errors={"AgentFailed": AgentFailed})


@contextlib.asynccontextmanager
async def _started(count: int = 2) -> AsyncIterator[WorkerPool]:
    pool = _pool(count)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.stop()


def test_workers_answer_with_json_headers_and_raw_bytes() -> None:
    async def go() -> None:
        async with _started() as pool:
            assert len(pool.pids) == 2 and os.getpid() not in pool.pids
            header, payload = await pool.call({"op": "square", "x": 3})
            assert header["value"] == 9 and payload == b"\x00\xff" * 3
            answers = [h async for h, _ in pool.map([{"op": "square", "x": x} for x in range(6)])]
            assert sorted(h["value"] for h in answers) == [0, 1, 4, 9, 16, 25]
            assert {h["pid"] for h in answers} <= pool.pids

    asyncio.run(go())


def test_a_workers_error_comes_back_with_its_type_and_details() -> None:
    async def go() -> None:
        async with _started(1) as pool:
            with pytest.raises(ConfigError, match="--set lr"):
                await pool.call({"op": "config"})
            with pytest.raises(AgentFailed, match="agent 3") as failed:
                await pool.call({"op": "agent"})
            assert failed.value.details == "Traceback: …"
            with pytest.raises(FedloopError, match="ValueError: no such op nope") as other:
                await pool.call({"op": "nope"})
            assert "Traceback" in str(other.value)
            # The worker is still there after each error.
            assert (await pool.call({"op": "square", "x": 2}))[0]["value"] == 4

    asyncio.run(go())


def test_a_worker_that_cannot_start_says_why() -> None:
    async def go() -> None:
        pool = _pool(2, fail_at_start=True)
        try:
            with pytest.raises(ConfigError, match="cannot import"):
                await pool.start()
        finally:
            await pool.stop()

    asyncio.run(go())


def test_a_worker_killed_mid_request_is_reported_as_died() -> None:
    async def go() -> None:
        async with _started(1) as pool:
            (pid,) = pool.pids
            asyncio.get_running_loop().call_later(0.3, os.kill, pid, signal.SIGKILL)
            with pytest.raises(WorkerDied, match=r"died \(exit code -9\).*--pool thread"):
                await pool.call({"op": "sleep", "seconds": 30})
            with pytest.raises(WorkerDied):  # the pool stays broken: the run stops
                await pool.call({"op": "square", "x": 1})

    asyncio.run(go())


def test_answers_nobody_waits_for_any_more_do_not_reach_the_next_request() -> None:
    async def go() -> None:
        async with _started(2) as pool:
            requests = [{"op": "sleep", "seconds": 0.2 * (i + 1), "tag": i} for i in range(4)]
            answers = pool.map(requests)
            async for header, _ in answers:
                assert header["tag"] == 0
                break
            await answers.aclose()
            # Worker 2 is still sleeping on tag 1; its answer must not be taken for these.
            for x in range(4):
                header, payload = await pool.call({"op": "square", "x": x})
                assert header["value"] == x * x and len(payload) == 2 * x

    asyncio.run(go())


def test_stop_ends_every_worker_process() -> None:
    async def go() -> list[Any]:
        pool = _pool(2)
        await pool.start()
        processes = [w.process for w in pool._workers]
        await pool.stop()
        return processes

    processes = asyncio.run(go())
    assert all(not p.is_alive() and p.exitcode == 0 for p in processes)


def test_a_worker_whose_driver_hung_up_before_the_answer_ends_quietly() -> None:
    """Ctrl-C: the driver hangs up while a worker still computes; its answer has nowhere to go,
    and the worker ends without a traceback (the driver's terminal shows the worker's stderr)."""
    import threading

    driver, worker = socket.socketpair()
    driver.settimeout(10)

    def hang_up_mid_request() -> None:
        with driver:
            raw = driver.recv(workers._LENGTH.size)  # the worker's "ready"
            driver.recv(workers._LENGTH.unpack(raw)[0])
            driver.sendall(workers._frame({"op": "sleep", "seconds": 0.3}))
            driver.shutdown(socket.SHUT_RDWR)  # before the answer

    handler = signal.getsignal(signal.SIGINT)
    hanging_up = threading.Thread(target=hang_up_mid_request)
    hanging_up.start()
    try:
        workers.serve(worker, _handle, lambda: None)  # on the main thread, as in a worker
    finally:
        signal.signal(signal.SIGINT, handler)  # serve() ignores Ctrl-C for its process
        hanging_up.join(10)
