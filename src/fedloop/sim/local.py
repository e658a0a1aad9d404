"""The ``local`` simulation engine: virtual agents train in a pool of processes (or threads).

Processes are the default: most engines hold Python's GIL for much of a small model's
training step, so threads serialise (see docs/simulation.md for the measurement). Workers are
started with ``spawn`` (never ``fork`` from a process running an event loop and SQLite), each
builds the engine spec once, and reads the round's global model once from a file the driver
writes — a task carries only agent indices. Local models of `FILE_BYTES` or more come back the
same way: the worker writes each to a file (in /dev/shm when there is one: memory, no disk)
with its content address, and only the path travels through the pool's pipe, instead of 100s of MB
pickled, copied through the pipe and unpickled, then hashed again by the driver. Agents go to
workers in chunks, small enough that a chunk's local models stay under `CHUNK_BYTES`, so
thousands of tiny agents do not pay one inter-process round trip each.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Literal

from fedloop._loading import import_object
from fedloop.errors import ConfigError, FedloopError
from fedloop.protocol import codec
from fedloop.sim.core import (
    CHUNK_BYTES,
    FILE_BYTES,
    AgentResult,
    EngineSpec,
    ModelBytes,
    ResultFiles,
    initial_model,
    train_agent,
)
from fedloop.store.blobs import map_file
from fedloop.types import Weights

Pool = Literal["process", "thread"]
__all__ = ["FILE_BYTES", "LocalBackend", "chunk_size"]

# Per worker process: the engine spec and the global model of the round it last trained.
_worker_spec: EngineSpec | None = None
_worker_global: tuple[str, Weights] | None = None


def _init_worker(spec: EngineSpec, started: Any = None) -> None:
    global _worker_spec, _worker_started
    _worker_spec, _worker_started = spec, started


# A barrier of all the pool's workers, for `_worker_ready` (None in a replaced worker).
_worker_started: Any = None


def _worker_ready() -> int:
    """Wait until every worker of the pool runs one of these, then import the engine's module.

    Each of the pool's processes is started and has its imports done before round 1: a pool
    spawns its processes on demand, and one starting during the first rounds took a core from
    them (simulation 2 × 4 MB: the first ~14 rounds 13–30 ms instead of 9).
    """
    assert _worker_spec is not None, "worker started without _init_worker"
    if _worker_started is not None:  # a worker that did not come up: round 1 will say why
        with contextlib.suppress(threading.BrokenBarrierError):
            _worker_started.wait(timeout=120)
    import_object(_worker_spec.factory)
    return os.getpid()


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
    assert _worker_spec is not None, "worker started without _init_worker"
    weights = _worker_weights(path)
    directory = Path(results_dir)
    return [
        train_agent(_worker_spec, i, weights, config, to_dir=directory, to_file=file)
        for i, file in jobs
    ]


def _worker_initial() -> bytes | None:
    assert _worker_spec is not None, "worker started without _init_worker"
    return initial_model(_worker_spec)


def _threads_train(
    spec: EngineSpec, weights: Weights, config: Mapping[str, Any], indices: list[int]
) -> list[AgentResult]:
    return [train_agent(spec, i, weights, config) for i in indices]


def _broken(exc: BrokenProcessPool) -> FedloopError:
    return FedloopError(
        f"a simulation worker process died ({exc}): out of memory, a crash in native code, or a "
        "script without `if __name__ == '__main__':` around the run (workers are spawned and "
        "import the main module); fix that, or try --pool thread"
    )


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
        self._executor: Executor | None = None
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
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="fedloop-sim")
        else:
            self._tmp = Path(tempfile.mkdtemp(prefix="fedloop-sim-", dir=_scratch_root()))
            self._files = ResultFiles(self._tmp)
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(spec, context.Barrier(self.workers)),
            )
            # One task per worker, each waiting for all: every submit spawns a process.
            loop = asyncio.get_running_loop()
            ready = [
                loop.run_in_executor(self._executor, _worker_ready) for _ in range(self.workers)
            ]
            try:
                self.pids = set(await asyncio.gather(*ready))
            except BrokenProcessPool as exc:
                raise _broken(exc) from None

    async def initial_model(self) -> bytes | None:
        assert self._executor is not None and self._spec is not None, "start() first"
        loop = asyncio.get_running_loop()
        if self.pool == "thread":
            return await loop.run_in_executor(self._executor, initial_model, self._spec)
        try:
            return await loop.run_in_executor(self._executor, _worker_initial)
        except BrokenProcessPool as exc:
            raise _broken(exc) from None

    async def train(
        self,
        round_number: int,
        model: ModelBytes,
        config: Mapping[str, Any],
        indices: Sequence[int],
    ) -> AsyncIterator[AgentResult]:
        assert self._executor is not None and self._spec is not None, "start() first"
        loop = asyncio.get_running_loop()
        size = chunk_size(len(indices), self.workers, model.nbytes)
        chunks = [list(indices[i : i + size]) for i in range(0, len(indices), size)]
        config = dict(config)
        written: Path | None = None  # a copy of the global model this round wrote itself
        kept: dict[int, str] = {}  # agent index → the kept result file it writes into
        if self.pool == "thread":
            weights = model.weights()
            futures = [
                loop.run_in_executor(self._executor, _threads_train, self._spec, weights, config, c)
                for c in chunks
            ]
        else:
            assert self._tmp is not None and self._files is not None
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
            futures = [
                loop.run_in_executor(
                    self._executor, _worker_train, str(path), str(self._tmp), config, j
                )
                for j in jobs
            ]
        try:
            for next_done in asyncio.as_completed(futures):
                try:
                    results = await next_done
                except BrokenProcessPool as exc:
                    raise _broken(exc) from None
                for result in results:
                    if self._files is not None:
                        self._hand_over(result, kept)
                    yield result
        finally:
            for future in futures:
                future.cancel()
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
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = self._files = None
