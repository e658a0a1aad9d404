"""The simulation loop: N virtual agents driven through the real `Aggregator`, round by round.

The aggregator object is the one a deployment runs (same registration, validation, strategy,
store and evaluation), driven in-process without HTTP. Each round samples ``ceil(C·N)``
agents with a seeded generator, the backend (``local`` processes/threads, or Ray) builds each
sampled agent's engine, trains it on the global model and discards it, and every local model
is uploaded as safetensors bytes, exactly as an agent would send it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import mmap
import os
import resource
import shutil
import sys
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import ValidationError

from fedloop._loading import import_object
from fedloop.config import AggregatorConfig, EvaluateConfig, StrategyConfig
from fedloop.errors import ConfigError, FedloopError, ProtocolError, path_error
from fedloop.protocol import codec
from fedloop.protocol.messages import RegisterRequest, UploadRequest
from fedloop.store.blobs import MappedBody, map_file, new_hasher
from fedloop.types import Weights

__all__ = [
    "AgentFailed",
    "AgentResult",
    "Backend",
    "EngineSpec",
    "ModelBytes",
    "Observer",
    "ResultFiles",
    "RoundSummary",
    "SimResult",
    "SimSettings",
    "agent_name",
    "agents_per_round",
    "build_engine",
    "peak_rss_mb",
    "run_simulation",
    "sample_agents",
    "train_agent",
]

log = logging.getLogger("fedloop.sim")

# A worker's chunk of agents returns its local models together; keep such a chunk this small.
CHUNK_BYTES = 64 * 1024 * 1024
# Local models at least this large go back to the driver as files, not through the pipe.
FILE_BYTES = 1024 * 1024
# The round config's key for a strategy with side tensors (JSON: what `GlobalModelInfo.side`
# says, the file of the shipped tensors, the directory of the agents' kept tensors). Taken
# out before the config reaches an engine.
SIDE_KEY = "fedloop.side"


class AgentFailed(FedloopError):
    """A virtual agent's engine raised; the message names the agent, ``details`` the traceback."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message, details)  # both in args, so the exception survives pickling

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def details(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else ""


def peak_rss_mb() -> float:
    """Return this process's peak resident set size in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def agent_name(index: int) -> str:
    """Return the name virtual agent ``index`` registers under."""
    return f"sim-{index:06d}"


def agents_per_round(num_agents: int, fraction: float) -> int:
    """Return ceil(fraction × num_agents), at least 1: how many agents each round samples."""
    if num_agents < 1:
        raise ConfigError(f"--agents must be at least 1, got {num_agents}")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--fraction must be in (0, 1], got {fraction}")
    # The epsilon keeps 0.1 × 30 = 3.0000000000000004 from sampling 4.
    return max(1, math.ceil(fraction * num_agents - 1e-9))


def _check_seed(seed: int) -> None:
    if seed < 0:  # NumPy's seeds are non-negative; a traceback from deep inside said so
        raise ConfigError(f"--seed must be 0 or more, got {seed}")


def sample_agents(num_agents: int, fraction: float, round_number: int, seed: int) -> list[int]:
    """Return the sorted agent indices that train in ``round_number``: the same for a seed."""
    _check_seed(seed)
    k = agents_per_round(num_agents, fraction)
    if k == num_agents:
        return list(range(num_agents))
    rng = np.random.default_rng([seed, round_number])
    return sorted(int(i) for i in rng.choice(num_agents, size=k, replace=False))


# --- building and training one agent --------------------------------------------------------
@dataclass(frozen=True)
class EngineSpec:
    """How to build any agent's engine: ``factory(agent_index=i, num_agents=N, **params)``."""

    factory: str
    num_agents: int
    params: Mapping[str, Any] = field(default_factory=dict)

    def kwargs(self, agent_index: int) -> dict[str, Any]:
        """Return the keyword arguments the factory gets for agent ``agent_index``."""
        target = import_object(self.factory)
        out = dict(self.params)
        try:
            parameters = inspect.signature(target).parameters
        except (TypeError, ValueError):  # a builtin without a signature: pass everything
            parameters = None
        open_kwargs = parameters is None or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        )
        # A factory that does not take them (e.g. NoopEngine) is the same for every agent.
        if open_kwargs or (parameters is not None and "agent_index" in parameters):
            out["agent_index"] = agent_index
        if open_kwargs or (parameters is not None and "num_agents" in parameters):
            out["num_agents"] = self.num_agents
        return out


def build_engine(spec: EngineSpec, agent_index: int) -> Any:
    """Return agent ``agent_index``'s ML engine, or raise a ConfigError saying what is wrong."""
    target = import_object(spec.factory)
    if not callable(target) or (not inspect.isclass(target) and hasattr(target, "train")):
        engine = target  # an engine object: every virtual agent shares it
    else:
        kwargs = spec.kwargs(agent_index)
        try:
            inspect.signature(target).bind(**kwargs)
        except TypeError as exc:
            raise ConfigError(
                f"{spec.factory} does not take the arguments {sorted(kwargs)}: {exc}; "
                "check the --set names against the factory's parameters"
            ) from exc
        except ValueError:  # no signature to check against
            pass
        try:
            engine = target(**kwargs)
        except FedloopError:
            raise
        except Exception as exc:
            raise _failed(agent_index, f"{spec.factory}(…)", exc) from None
    if not hasattr(engine, "train"):
        raise ConfigError(f"{spec.factory!r} did not give an ML engine: it has no train() method")
    return engine


@dataclass
class AgentResult:
    """One virtual agent's round: its local model as safetensors bytes, samples and metrics.

    A worker process may leave the bytes in a file instead (``path``, ``data`` empty, with
    their content address in ``digest``), so 100s of MB do not travel through a socket;
    `body()` returns them either way (the file memory-mapped: no copy).
    """

    index: int
    data: bytes
    num_samples: int
    metrics: dict[str, float]
    seconds: float
    worker_rss_mb: float
    path: str | None = None
    digest: str | None = None
    nbytes: int = 0  # the local model's size, in `data` or in the file
    finite: bool = False  # the worker found every floating value of the file finite
    # Set by the driver (never pickled): the backend's kept result files the path is one of.
    files: ResultFiles | None = field(default=None, repr=False, compare=False)

    def body(self) -> bytes | MappedBody:
        """Return the local model's bytes: the worker's file mapped, no copy.

        A file of the backend's `ResultFiles` comes back through its kept map (no page
        faults); another one is mapped and unlinked (the map keeps its pages until its last
        view is gone).
        """
        if self.path is None:
            return self.data
        if self.files is not None and self.files.holds(self.path):
            return self.files.open(self.path, self.nbytes, self.digest, self.finite)
        path = Path(self.path)
        body = map_file(path, self.digest)
        if isinstance(body, MappedBody):
            body.finite = self.finite
        path.unlink(missing_ok=True)
        self.path = None
        return body


def _default_keep_bytes() -> int:
    """1/16 of this machine's memory, at most 2 GiB: 1.5 GiB on the 24 GiB VM of the bench."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        memory = 8 << 30
    return min(2 << 30, memory // 16)


class ResultFiles:
    """Files that worker processes write local models into, kept and reused round after round.

    A new file per local model costs its pages' allocation in /dev/shm, the driver's page
    faults when it maps them, and unmapping and freeing them after the fold. Here the file
    and the driver's map of it are kept: the worker overwrites the same pages and the driver
    reads them through the map it already has (4 MB: 1.47 → 0.62 ms to write, map and check a
    model; 100 MB: 56 → 38 ms). A file goes to a task again only when nothing views its map
    any more (an upload kept for the aggregation, a global model that is one upload's
    tensors, …). At most `keep_bytes` of files are kept (default: 1/16 of the machine's
    memory, at most 2 GiB); agents past that in a round get a new file each, unlinked once
    mapped, as before. Workers keep a map of each kept file too and copy local models into it
    (`_fill_kept`). The kept files are memory (/dev/shm) and count in the RSS of the driver and
    of each worker that touched them, though their pages exist once.
    """

    def __init__(self, directory: Path, keep_bytes: int | None = None) -> None:
        self.directory = directory
        self.keep_bytes = _default_keep_bytes() if keep_bytes is None else keep_bytes
        self._maps: dict[str, MappedBody | None] = {}  # every kept file: its map once opened
        self._sizes: dict[str, int] = {}  # what each file last held
        self._out: set[str] = set()  # handed to a task, its result not opened yet
        self._made = 0

    def holds(self, path: str) -> bool:
        return path in self._maps

    def _free(self, path: str) -> bool:
        if path in self._out:
            return False
        body = self._maps[path]
        # When nothing else views the map: the dict's reference, `body` and getrefcount's own.
        return body is None or sys.getrefcount(body) <= 3

    def take(self, count: int, nbytes: int) -> list[str | None]:
        """Return a file for each of `count` local models of about `nbytes`; None past the cap."""
        free = iter([p for p in self._maps if self._free(p)])
        held = sum(self._sizes[p] for p in self._maps)
        out: list[str | None] = []
        for _ in range(count):
            path = next(free, None)
            if path is None and held + nbytes <= self.keep_bytes:  # a new file, under the cap
                path = str(self.directory / f"result-{self._made}.safetensors")
                self._made += 1
                self._maps[path], self._sizes[path] = None, nbytes
                held += nbytes
            if path is not None:
                self._out.add(path)
            out.append(path)
        return out

    def give_back(self, path: str) -> None:
        """Take back a file whose task wrote nothing into it (a model under FILE_BYTES)."""
        self._out.discard(path)

    def open(self, path: str, nbytes: int, digest: str | None, finite: bool) -> MappedBody:
        """Return the map of a file a worker wrote `nbytes` into, with their content address
        and whether the worker found every value finite."""
        self._out.discard(path)
        body = self._maps[path]
        if body is None or len(body) != nbytes:  # first use, or another size: map it again
            mapped = map_file(path)
            assert isinstance(mapped, MappedBody), "a result file under FILE_BYTES"
            body = self._maps[path] = mapped
            self._sizes[path] = nbytes
        body.digest, body.finite = digest, finite
        return body


def _failed(index: int, where: str, exc: BaseException) -> AgentFailed:
    details = "".join(traceback.format_exception(exc))
    return AgentFailed(
        f"virtual agent {index} failed in {where}: {type(exc).__name__}: {exc}", details
    )


def train_agent(
    spec: EngineSpec,
    index: int,
    weights: Weights,
    config: Mapping[str, Any],
    to_dir: Path | None = None,
    to_file: str | None = None,
) -> AgentResult:
    """Build agent ``index``'s engine, train it on ``weights``, encode the result, drop the engine.

    Nothing of the agent outlives the call, so memory does not grow with the number of agents.
    With ``to_dir``, a local model of `FILE_BYTES` or more is written to a new file there
    (hashed on the way, one copy) instead of being returned as bytes; with ``to_file``, over
    that file (one of the driver's `ResultFiles`).
    """
    started = time.perf_counter()
    engine = build_engine(spec, index)
    path = digest = None
    finite = False
    side: Any = None
    if SIDE_KEY in config:
        config, side = _side_config(config, index)
    try:
        new, num_samples, metrics = engine.train(weights, dict(config))
        if side is not None:
            model, extras = side.split(new, weights.keys(), engine)
            # Kept now: a virtual agent's upload is accepted, or the run stops.
            side.accepted(extras, int(config["round"]))
            new = {**model, **extras}
        parts = codec.encode_parts(new)
        nbytes = sum(len(p) for p in parts)
        if (to_file is not None or to_dir is not None) and nbytes >= FILE_BYTES:
            # Checked here, slice by slice as it is written, not by the busy driver.
            if to_file is not None:
                path, (digest, finite) = to_file, _fill_kept(to_file, parts, nbytes)
            else:
                assert to_dir is not None
                path = str(to_dir / f"local-{os.getpid()}-{index}-{time.monotonic_ns()}.st")
                digest, finite = _write_parts(path, parts)
            data = b""
        else:
            data = b"".join(parts)
        values = {str(k): float(v) for k, v in dict(metrics).items()}
    except FedloopError:
        raise
    except Exception as exc:
        raise _failed(index, "train()", exc) from None
    del engine, new, parts
    return AgentResult(
        index,
        data,
        int(num_samples),
        values,
        time.perf_counter() - started,
        peak_rss_mb(),
        path=path,
        digest=digest,
        nbytes=nbytes,
        finite=finite,
    )


# Per process: the shipped tensors of the round it last trained in, by file.
_shipped: tuple[str, Weights] | None = None


def _side_config(config: Mapping[str, Any], index: int) -> tuple[dict[str, Any], Any]:
    """Return virtual agent `index`'s config with its strategy's side tensors (instead of
    `SIDE_KEY`), and its `fedloop.agent.side.StrategySide`."""
    global _shipped
    from fedloop.agent.side import KeptTensors, StrategySide, kept_file
    from fedloop.protocol.messages import SideTensors

    job = config[SIDE_KEY]
    info = SideTensors.model_validate(job["info"])
    side = StrategySide(
        info, KeptTensors(kept_file(Path(job["kept"]), info.strategy, agent_name(index)))
    )
    shipped: Weights = {}
    if job["shipped"] is not None:
        if _shipped is None or _shipped[0] != job["shipped"]:
            _shipped = None  # the last round's first
            _shipped = (job["shipped"], codec.decode(map_file(Path(job["shipped"]))))
        shipped = _shipped[1]
    plain = {k: v for k, v in config.items() if k != SIDE_KEY}
    return side.engine_config(plain, shipped, int(config["round"]) - 1), side


# Bytes of a tensor written, hashed and checked at a time: they stay in cache for all three.
# Tensors under `_SLICE_FROM` go whole: with a 4 MB model of 1 MB tensors, slices made the
# simulation slower (10 × 4 MB: 0.0276, 0.0280 → 0.0299, 0.0290 s/round).
_SLICE = 1 << 18
_SLICE_FROM = 8 << 20


def _store_parts(sink: Callable[[memoryview], object], parts: Sequence[Any]) -> tuple[str, bool]:
    """Hand the pieces to `sink` in order; return their content address and whether every
    floating-point value in them is finite.

    A large tensor's piece (`codec.encode_parts` views its array) goes in slices of `_SLICE`
    bytes, each stored, hashed and checked while in cache: the model is read from memory once,
    not three times (measured here, overwriting a file in /dev/shm: 100 MB in four tensors
    52.5 → 44.4 ms).
    """
    hasher = new_hasher()
    finite = True
    for part in parts:
        array = getattr(part, "obj", None)
        if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
            view = memoryview(part).cast("B")
            sink(view)
            hasher.update(view)
            continue
        flat = array.reshape(-1)
        step = max(1, _SLICE // flat.itemsize) if flat.nbytes >= _SLICE_FROM else flat.size
        ok = np.empty(min(step, flat.size), dtype=bool)
        for at in range(0, flat.size, step):
            block = flat[at : at + step]
            view = block.data.cast("B")
            sink(view)
            hasher.update(view)
            if finite:
                mask = ok[: block.size]
                np.isfinite(block, out=mask)
                finite = bool(mask.all())
    return hasher.hexdigest(), finite


def _write_parts(target: str, parts: Sequence[Any]) -> tuple[str, bool]:
    """Write the pieces to the new file `target`: `_store_parts` into a file."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return _store_parts(lambda view: _write_all(fd, view), parts)
    finally:
        os.close(fd)


# Per worker process: its maps of the driver's kept result files (`ResultFiles`), by path.
_kept_maps: dict[str, mmap.mmap] = {}


def _fill_kept(target: str, parts: Sequence[Any], nbytes: int) -> tuple[str, bool]:
    """Copy the pieces into the kept result file `target` through this worker's map of it.

    The driver hands the same files out round after round. Kept mapped here too, they are
    overwritten by plain memory copies into pages already mapped: 100 MB in 15–18 ms, where
    `write` took 27 ms (in the kernel, page by page) and a fresh map 49 ms (its page faults).
    A file of another size is cut to `nbytes` and mapped again.
    """
    mapped = _kept_maps.get(target)
    if mapped is None or len(mapped) != nbytes:
        if mapped is not None:
            mapped.close()
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mapped = _kept_maps[target] = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
    at = 0

    def sink(view: memoryview) -> None:
        nonlocal at
        mapped[at : at + len(view)] = view
        at += len(view)

    return _store_parts(sink, parts)


def _write_all(fd: int, view: memoryview) -> int:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def initial_model(spec: EngineSpec) -> bytes | None:
    """Return agent 0's ``initial_weights()`` as safetensors bytes, or None if it has none."""
    engine = build_engine(spec, 0)
    make = getattr(engine, "initial_weights", None)
    if not callable(make):
        return None
    try:
        return codec.encode(make())
    except Exception as exc:
        raise _failed(0, "initial_weights()", exc) from None


# --- the pieces a simulation is made of ---------------------------------------------------
@dataclass(frozen=True)
class ModelBytes:
    """A round's global model as a backend gets it: safetensors bytes in pieces, no joined copy.

    ``path`` is the aggregator's stored file of those bytes, when it has one: workers on this
    machine map it (the page cache, shared) instead of being handed a copy.
    """

    parts: tuple[bytes | bytearray | memoryview, ...]
    path: Path | None = None

    @classmethod
    def of(cls, data: bytes) -> ModelBytes:
        return cls((data,))

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.parts)

    def joined(self) -> bytes:
        """Return the bytes as one object (a copy unless they are one `bytes` already)."""
        if len(self.parts) == 1 and isinstance(self.parts[0], bytes):
            return self.parts[0]
        return b"".join(self.parts)

    def weights(self) -> Weights:
        """Return the decoded model: views of the mapped file, or of the joined bytes."""
        return codec.decode(map_file(self.path) if self.path is not None else self.joined())


class Backend(Protocol):
    """Where agents train: `fedloop.sim.local.LocalBackend` or `fedloop.sim.ray.RayBackend`."""

    def describe(self) -> str:
        """Return a few words for the user: engine, workers, resources."""
        ...

    async def start(self, spec: EngineSpec) -> None: ...

    async def initial_model(self) -> bytes | None:
        """Return agent 0's initial model (safetensors bytes), built where agents run."""
        ...

    def train(
        self,
        round_number: int,
        model: ModelBytes,
        config: Mapping[str, Any],
        indices: Sequence[int],
    ) -> AsyncIterator[AgentResult]:
        """Yield each of the agents' results as soon as it is ready."""
        ...

    async def stop(self) -> None: ...


@dataclass
class RoundSummary:
    """What one round did: agents, global metrics (if evaluated), mean local metrics, time."""

    round: int
    agents: int
    seconds: float
    global_metrics: dict[str, float]
    local_metrics_mean: dict[str, float]


class Observer:
    """Receives a simulation's progress; override what you need (the CLI draws it with rich)."""

    def on_start(self, settings: SimSettings, backend: str, per_round: int) -> None:
        pass

    def on_phase(self, text: str) -> None:
        pass

    def on_round_start(self, round_number: int, agents: int) -> None:
        pass

    def on_agent_done(self, round_number: int, result: AgentResult, done: int, total: int) -> None:
        pass

    def on_round_end(self, summary: RoundSummary) -> None:
        pass


@dataclass
class SimSettings:
    """One simulation: the engine factory, the agents, the rounds, the strategy, where to store."""

    factory: str
    num_agents: int
    rounds: int = 10
    fraction: float = 1.0
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    data_dir: Path = Path("fedloop-sim")
    strategy: str = "fedavg"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    evaluate: bool = True  # measure every global model with agent 0's engine's evaluate()
    overwrite: bool = False  # replace an earlier run's database in data_dir
    concurrent_uploads: int = 2  # batches of local models in the aggregator's hands at once
    # Store every local model's bytes too (their rows, with metrics and content address, are
    # always kept): off by default, as 1,000 agents × one model per round fill a disk.
    keep_local_models: bool = False

    @property
    def per_round(self) -> int:
        return agents_per_round(self.num_agents, self.fraction)

    def spec(self) -> EngineSpec:
        return EngineSpec(self.factory, self.num_agents, dict(self.params))


@dataclass
class SimResult:
    """What a finished simulation leaves: where its database is, and how long it took."""

    data_dir: Path
    database: Path
    rounds: list[RoundSummary]
    seconds: float  # the whole run, start-up and registration included
    setup_seconds: float  # start-up and registration of every agent
    driver_peak_rss_mb: float
    worker_peak_rss_mb: float

    @property
    def seconds_per_round(self) -> float:
        return sum(r.seconds for r in self.rounds) / max(1, len(self.rounds))


class _ErrorTrap(logging.Handler):
    """Keeps the aggregator's ERROR records: a failed aggregation leaves its round open."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _prepare_dir(settings: SimSettings) -> None:
    directory = settings.data_dir
    db = directory / "fedloop.db"
    if db.exists():
        if not settings.overwrite:
            raise ConfigError(
                f"{directory} already holds a run ({db}); pass another --data-dir, or "
                "--overwrite to replace it"
            )
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(directory / "blobs", ignore_errors=True)
        shutil.rmtree(directory / "side", ignore_errors=True)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise path_error(
            exc, directory, "make the data directory", "pass --data-dir a directory you can write"
        ) from exc


def _evaluate_config(settings: SimSettings) -> EvaluateConfig | None:
    """The aggregator's `[evaluate]`: agent 0's engine, if it can evaluate."""
    if not settings.evaluate:
        return None
    spec = settings.spec()
    if not hasattr(build_engine(spec, 0), "evaluate"):
        return None
    return EvaluateConfig(engine=settings.factory, params=spec.kwargs(0))


def aggregator_config(settings: SimSettings) -> AggregatorConfig:
    """Return the config of the simulation's aggregator: a round closes with the sampled agents."""
    k = settings.per_round
    if settings.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {settings.rounds}")
    _check_seed(settings.seed)  # before any worker starts, not in round 1's sampling
    from fedloop.strategies import load as load_strategy

    least = load_strategy(settings.strategy, **settings.strategy_params).min_updates
    if least > k:
        # A round would wait for ever: only the k sampled agents train in it.
        raise ConfigError(
            f"strategy {settings.strategy!r} aggregates no fewer than {least} local models, "
            f"and each round samples {k} agents: raise --agents or --fraction, or change its "
            "parameters"
        )
    return AggregatorConfig.model_validate(
        {
            "data_dir": settings.data_dir,
            "aggregation_threshold": k / settings.num_agents,
            "min_agents": k,
            "rounds": settings.rounds,
            "max_agents": max(settings.num_agents, 1),
            "strategy": StrategyConfig(name=settings.strategy, **settings.strategy_params),
            "evaluate": _evaluate_config(settings),
            # A simulation does not resume after a crash: no fsync per stored model.
            "fsync_models": False,
            "keep_local_models": settings.keep_local_models,
        }
    )


class _RoundUploads:
    """One round's uploads, handed to the aggregator in batches of the results that are ready.

    Up to `concurrency` batches are in flight (one is checked and stored while another's rows
    are filed); each takes the results that arrived meanwhile, so 1,000 small agents do not
    pay a thread hop and a transaction each, up to `CHUNK_BYTES` of models or `MAX_BATCH`
    results: the driver maps only the models of the batches in hand (100 × 100 MB models
    waiting at once must not all be mapped at once).
    """

    MAX_BATCH = 256

    def __init__(
        self,
        agg: Any,
        ids: list[str],
        round_number: int,
        total: int,
        observer: Observer,
        concurrency: int,
    ) -> None:
        self.agg, self.ids, self.round, self.total = agg, ids, round_number, total
        self.observer = observer
        self.concurrency = max(1, concurrency)
        self.waiting: deque[AgentResult] = deque()
        self.draining = 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.done = 0

    def add(self, group: asyncio.TaskGroup, result: AgentResult) -> None:
        self.waiting.append(result)
        if self.draining < self.concurrency:
            self.draining += 1
            group.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self.waiting:
                batch = [self.waiting.popleft()]
                size = batch[0].nbytes
                while self.waiting and len(batch) < self.MAX_BATCH:
                    if size + self.waiting[0].nbytes > CHUNK_BYTES:
                        break
                    size += self.waiting[0].nbytes
                    batch.append(self.waiting.popleft())
                await _upload_batch(self.agg, self.ids, self.round, batch)
                for result in batch:
                    for key, value in result.metrics.items():
                        self.sums[key] = self.sums.get(key, 0.0) + value
                        self.counts[key] = self.counts.get(key, 0) + 1
                    self.done += 1
                    self.observer.on_agent_done(self.round, result, self.done, self.total)
        finally:
            self.draining -= 1

    def local_means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in sorted(self.sums)}


async def run_simulation(
    settings: SimSettings, backend: Backend, observer: Observer | None = None
) -> SimResult:
    """Run the simulation to its last round and return where its records are.

    Raises a FedloopError (ConfigError, AgentFailed, …) with a sentence saying what to do.
    """
    from fedloop.aggregator.service import Aggregator  # the aggregator imports a lot

    observer = observer or Observer()
    started = time.perf_counter()
    k = settings.per_round
    _prepare_dir(settings)
    config = aggregator_config(settings)
    observer.on_start(settings, backend.describe(), k)
    trap = _ErrorTrap()
    agg_log = logging.getLogger("fedloop.aggregator")
    agg_log.addHandler(trap)
    agg: Aggregator | None = None
    started_backend = False
    summaries: list[RoundSummary] = []
    worker_rss = 0.0
    try:
        # Before any worker starts: the aggregator's own checks cost no Ray start; and
        # whatever fails from here on stops what was started (workers, Ray, scratch files).
        agg = Aggregator(config)
        # Local models come from workers on this machine: fold them in groups (see RunningMean).
        agg.running.max_held = 4
        if agg.asynchronous:
            raise ConfigError(
                f"strategy {settings.strategy!r} is asynchronous; `fedloop simulate` runs "
                "synchronous rounds — pick a synchronous strategy (fedavg, fedprox, fedadam, …)"
            )
        observer.on_phase("starting workers")
        started_backend = True  # a start that fails half-way is stopped too
        await backend.start(settings.spec())
        await agg.start()
        observer.on_phase("building agent 0's initial model")
        initial = await backend.initial_model()
        if initial is None:
            raise ConfigError(
                f"agent 0's engine from {settings.factory!r} has no initial_weights(); the "
                "first agent must send the initial model — add initial_weights() to the engine"
            )
        observer.on_phase(f"registering {settings.num_agents} agents")
        ids = [(await agg.register(RegisterRequest(agent_name=agent_name(0)), initial)).agent_id]
        for i in range(1, settings.num_agents):
            reply = await agg.register(RegisterRequest(agent_name=agent_name(i)), b"")
            ids.append(reply.agent_id)
        del initial
        setup_seconds = time.perf_counter() - started
        for r in range(1, settings.rounds + 1):
            round_started = time.perf_counter()
            if r == 1:
                # Round 1 opened when agent 0 registered; registering the others is set-up
                # (setup_seconds), so its stored seconds count from here, as the summary's do.
                agg.round_started = time.time()
            current = await agg.wait_for_global(r - 2, 0)
            if current is None or current.round != r - 1:
                raise FedloopError(
                    f"the aggregator has no global model {r - 1} to start round {r}; "
                    "see its log above"
                )
            info = agg.global_info()
            round_config: dict[str, Any] = {**info.config, "round": r}
            shipped_file: Path | None = None
            if info.side is not None:  # SCAFFOLD, FedCurv: their tensors travel by file
                shipped_file = _write_shipped(settings.data_dir, current)
                round_config[SIDE_KEY] = {
                    "info": info.side.model_dump(),
                    "shipped": None if shipped_file is None else str(shipped_file),
                    "kept": str(settings.data_dir / "side"),
                }
            chosen = sample_agents(settings.num_agents, settings.fraction, r, settings.seed)
            observer.on_round_start(r, len(chosen))
            uploads = _RoundUploads(agg, ids, r, len(chosen), observer, settings.concurrent_uploads)
            model_bytes = ModelBytes(
                current.parts, agg.blobs.path(current.model_id) if current.model_id else None
            )
            try:
                async with asyncio.TaskGroup() as group:
                    async for result in backend.train(r, model_bytes, round_config, chosen):
                        worker_rss = max(worker_rss, result.worker_rss_mb)
                        uploads.add(group, result)
            except BaseExceptionGroup as group_error:
                raise _first(group_error) from None
            finally:
                if shipped_file is not None:
                    shipped_file.unlink(missing_ok=True)
            del current, model_bytes
            model = None
            while model is None:
                model = await agg.wait_for_global(r - 1, 0.5)
                if model is None and trap.records:
                    record = trap.records[0]
                    raise FedloopError(
                        f"the aggregator failed in round {r}: {record.getMessage()}"
                        + (f" ({record.exc_info[1]})" if record.exc_info else "")
                    )
            summary = RoundSummary(
                round=r,
                agents=len(chosen),
                seconds=time.perf_counter() - round_started,
                global_metrics=dict(model.metrics),
                local_metrics_mean=uploads.local_means(),
            )
            summaries.append(summary)
            observer.on_round_end(summary)
    finally:
        agg_log.removeHandler(trap)
        try:
            if agg is not None:
                await agg.stop()
        finally:
            if started_backend:
                await backend.stop()
    return SimResult(
        data_dir=settings.data_dir,
        database=settings.data_dir / "fedloop.db",
        rounds=summaries,
        seconds=time.perf_counter() - started,
        setup_seconds=setup_seconds,
        driver_peak_rss_mb=peak_rss_mb(),
        worker_peak_rss_mb=worker_rss,
    )


def _write_shipped(data_dir: Path, model: Any) -> Path | None:
    """Write what the strategy ships with `model` (a `GlobalModel`) for the round's workers
    to read; None when it ships nothing."""
    if model.shipped is None:
        return None
    path = data_dir / "side" / f"shipped-{model.round}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for part in model.shipped:
            handle.write(part)
    return path


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Return the first leaf exception of an exception group (an upload's own error)."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def _upload_batch(
    agg: Any, ids: list[str], round_number: int, results: list[AgentResult]
) -> None:
    """Hand the results to the aggregator in one batch; an AgentFailed names a refused one."""
    requests = []
    for result in results:
        try:
            requests.append(
                UploadRequest(
                    agent_id=ids[result.index],
                    round=round_number,
                    num_samples=result.num_samples,
                    metrics=result.metrics,
                )
            )
        except ValidationError as exc:
            raise AgentFailed(
                f"virtual agent {result.index} returned a bad result in round {round_number}: "
                f"{exc.errors()[0]['msg']} (num_samples={result.num_samples}, "
                f"metrics={result.metrics}); return a count >= 0 and finite metrics"
            ) from None
    outcomes = await agg.upload_many(
        [(request, result.body()) for request, result in zip(requests, results, strict=True)]
    )
    for result, outcome in zip(results, outcomes, strict=True):
        if isinstance(outcome, ProtocolError):
            raise AgentFailed(
                f"the aggregator refused virtual agent {result.index}'s local model of round "
                f"{round_number}: {outcome}"
            )
