"""The ``local`` simulation engine: virtual agents train in a pool of processes (or threads).

Processes are the default: most engines hold Python's GIL for much of a small model's
training step, so threads serialise (see docs/simulation.md for the measurement). Workers are
started with ``spawn`` (never ``fork`` from a process running an event loop and SQLite) and
spoken to in JSON over their own sockets (`fedloop.sim.workers`); each builds the engine spec
once, and reads the round's global model once from a file the driver writes — a task carries
only agent indices. Local models of `FILE_BYTES` or more come back the same way: the worker
writes each to a file (in /dev/shm when there is one: memory, no disk) with its content
address, and only the path travels through the socket, instead of 100s of MB copied through
it, then hashed again by the driver. Agents go to workers in chunks, small enough that a
chunk's local models stay under `CHUNK_BYTES`, so thousands of tiny agents do not pay one
inter-process round trip each.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from fedloop._loading import import_object
from fedloop.errors import ConfigError, FedloopError
from fedloop.protocol import codec
from fedloop.sim import workers
from fedloop.sim.core import (
    CHUNK_BYTES,
    FILE_BYTES,
    AgentFailed,
    AgentResult,
    EngineSpec,
    ModelBytes,
    ResultFiles,
    initial_model,
    train_agent,
)
from fedloop.sim.workers import WorkerPool
from fedloop.store.blobs import map_file
from fedloop.types import Weights

Pool = Literal["process", "thread"]
__all__ = ["FILE_BYTES", "LocalBackend", "chunk_size"]

# Per worker process: the engine spec and the global model of the round it last trained.
_worker_spec: EngineSpec | None = None
_worker_global: tuple[str, Weights] | None = None


def _worker_main(sock: socket.socket, spec: EngineSpec) -> None:
    """A worker process: import the engine's module, then answer the driver's requests."""
    global _worker_spec
    _worker_spec = spec
    workers.serve(sock, _handle, lambda: import_object(spec.factory))


def _handle(op: str, request: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
    assert _worker_spec is not None, "worker started without a spec"
    if op == "initial":
        data = initial_model(_worker_spec)
        return {"initial": data is not None}, data or b""
    if op != "train":
        raise FedloopError(f"a simulation worker got an unknown request {op!r}")
    jobs = [(int(i), file) for i, file in request["jobs"]]
    results = _worker_train(request["path"], request["results_dir"], request["config"], jobs)
    return {"results": [_result_header(r) for r in results]}, b"".join(r.data for r in results)


def _result_header(result: AgentResult) -> dict[str, Any]:
    return {
        "index": result.index,
        "bytes": len(result.data),
        "num_samples": result.num_samples,
        "metrics": result.metrics,
        "seconds": result.seconds,
        "worker_rss_mb": result.worker_rss_mb,
        "path": result.path,
        "digest": result.digest,
        "nbytes": result.nbytes,
        "finite": result.finite,
    }


def _results(header: dict[str, Any], payload: bytes) -> list[AgentResult]:
    """Return the results of a worker's answer to a train request."""
    out, offset = [], 0
    for item in header["results"]:
        size = int(item["bytes"])
        out.append(
            AgentResult(
                index=int(item["index"]),
                data=payload[offset : offset + size] if size else b"",
                num_samples=int(item["num_samples"]),
                metrics={str(k): float(v) for k, v in item["metrics"].items()},
                seconds=float(item["seconds"]),
                worker_rss_mb=float(item["worker_rss_mb"]),
                path=item["path"],
                digest=item["digest"],
                nbytes=int(item["nbytes"]),
                finite=bool(item["finite"]),
            )
        )
        offset += size
    return out


def _worker_weights(path: str) -> Weights:
    global _worker_global
    if _worker_global is None or _worker_global[0] != path:
        _worker_global = None  # drop the last round's model before reading this one
        _worker_global = (path, codec.decode(map_file(path)))
    return _worker_global[1]


def _worker_train(
    path: str, results_dir: str, config: Mapping[str, Any], jobs: list[tuple[int, str | None]]
) -> list[AgentResult]:
    """Train each (agent index, result file) job; a job without a file writes a new one."""
    assert _worker_spec is not None, "worker started without a spec"
    weights = _worker_weights(path)
    directory = Path(results_dir)
    return [
        train_agent(_worker_spec, i, weights, config, to_dir=directory, to_file=file)
        for i, file in jobs
    ]


def _threads_train(
    spec: EngineSpec, weights: Weights, config: Mapping[str, Any], indices: list[int]
) -> list[AgentResult]:
    return [train_agent(spec, i, weights, config) for i in indices]


def _scratch_root() -> str | None:
    """Return /dev/shm when it is a writable directory (files there are memory), else None."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


def chunk_size(agents: int, slots: int, model_bytes: int) -> int:
    """Return how many agents one task trains: ~4 tasks per slot, results under CHUNK_BYTES."""
    by_balance = math.ceil(agents / max(1, slots * 4))
    by_memory = max(1, CHUNK_BYTES // max(1, model_bytes))
    return max(1, min(by_balance, by_memory))


class LocalBackend:
    """Runs agents on this machine in ``workers`` processes (default: one per CPU) or threads."""

    def __init__(self, workers: int | None = None, pool: Pool = "process") -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        if pool not in ("process", "thread"):
            raise ConfigError(f"--pool must be process or thread, not {pool!r}")
        self.workers = workers or os.cpu_count() or 1
        self.pool: Pool = pool
        self._threads: ThreadPoolExecutor | None = None
        self._processes: WorkerPool | None = None
        self._spec: EngineSpec | None = None
        self._tmp: Path | None = None
        self._files: ResultFiles | None = None
        self.pids: set[int] = set()  # the worker processes, once started

    def describe(self) -> str:
        plural = "es" if self.pool == "process" else "s"
        return f"local, {self.workers} {self.pool}{plural if self.workers > 1 else ''}"

    async def start(self, spec: EngineSpec) -> None:
        self._spec = spec
        if self.pool == "thread":
            self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="fedloop-sim")
            return
        self._tmp = Path(tempfile.mkdtemp(prefix="fedloop-sim-", dir=_scratch_root()))
        self._files = ResultFiles(self._tmp)
        # Every worker is started, and has imported the engine's module, before round 1: one
        # starting during the first rounds would take a core from them.
        self._processes = WorkerPool(
            self.workers, _worker_main, (spec,), errors={"AgentFailed": AgentFailed}
        )
        try:
            await self._processes.start()
        except BaseException:
            await self._processes.stop()
            self._processes = None
            raise
        self.pids = set(self._processes.pids)

    async def initial_model(self) -> bytes | None:
        assert self._spec is not None, "start() first"
        if self._threads is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._threads, initial_model, self._spec)
        assert self._processes is not None, "start() first"
        header, payload = await self._processes.call({"op": "initial"})
        return payload if header["initial"] else None

    async def train(
        self,
        round_number: int,
        model: ModelBytes,
        config: Mapping[str, Any],
        indices: Sequence[int],
    ) -> AsyncIterator[AgentResult]:
        assert self._spec is not None, "start() first"
        size = chunk_size(len(indices), self.workers, model.nbytes)
        chunks = [list(indices[i : i + size]) for i in range(0, len(indices), size)]
        if self._threads is not None:
            loop = asyncio.get_running_loop()
            weights = model.weights()
            futures = [
                loop.run_in_executor(self._threads, _threads_train, self._spec, weights, config, c)
                for c in chunks
            ]
            try:
                for next_done in asyncio.as_completed(futures):
                    for result in await next_done:
                        yield result
            finally:
                for future in futures:
                    future.cancel()
            return
        assert self._processes is not None and self._tmp is not None and self._files is not None
        written: Path | None = None  # a copy of the global model this round wrote itself
        path = model.path
        if path is None:  # no stored file to map: write the pieces once
            path = written = self._tmp / f"global-{round_number}.safetensors"
            with path.open("wb") as handle:
                for part in model.parts:
                    handle.write(part)
        # Local models are the global model's size: kept files for those that fit.
        files = iter(
            self._files.take(len(indices), model.nbytes)
            if model.nbytes >= FILE_BYTES
            else [None] * len(indices)
        )
        jobs = [[(i, next(files)) for i in c] for c in chunks]
        kept = {i: file for job in jobs for i, file in job if file is not None}
        requests = [
            {
                "op": "train",
                "path": str(path),
                "results_dir": str(self._tmp),
                "config": dict(config),
                "jobs": job,
            }
            for job in jobs
        ]
        answers = self._processes.map(requests)
        try:
            async for header, payload in answers:
                for result in _results(header, payload):
                    self._hand_over(result, kept)
                    yield result
        finally:
            await answers.aclose()
            if written is not None:
                written.unlink(missing_ok=True)

    def _hand_over(self, result: AgentResult, kept: dict[int, str]) -> None:
        """Let the result open its kept file; take back one its worker did not write into."""
        assert self._files is not None
        result.files = self._files
        file = kept.get(result.index)
        if result.path is None and file is not None:
            self._files.give_back(file)

    async def stop(self) -> None:
        if self._threads is not None:
            threads, self._threads = self._threads, None
            await asyncio.to_thread(threads.shutdown, True, cancel_futures=True)
        if self._processes is not None:
            processes, self._processes = self._processes, None
            await processes.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = self._files = None
