"""The ``ray`` simulation engine: virtual agents as Ray tasks on a cluster, or a local Ray.

Each task trains a chunk of agents with one agent's resources (``num_cpus=cpus_per_agent``,
``num_gpus=gpus_per_agent``), so ``gpus_per_agent=0.25`` runs four agents at a time on each
GPU. The round's global model goes into Ray's object store once and every task reads it from
there. Ray is optional: ``pip install 'ray[default]'``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fedloop.errors import ConfigError, FedloopError
from fedloop.protocol import codec
from fedloop.sim.core import AgentResult, EngineSpec, ModelBytes, initial_model, train_agent
from fedloop.sim.local import chunk_size

log = logging.getLogger("fedloop.sim")


def import_ray() -> Any:
    """Return the ``ray`` module, or raise a ConfigError saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ConfigError(
            "the ray engine needs Ray: `pip install 'ray[default]'` (or use --engine local)"
        ) from exc


def _train_chunk(
    spec: EngineSpec, global_data: bytes, config: Mapping[str, Any], indices: list[int]
) -> list[AgentResult]:
    weights = codec.decode(global_data)
    try:
        return [train_agent(spec, i, weights, config) for i in indices]
    finally:
        _release_gpu_cache()


def _release_gpu_cache() -> None:
    """Give the GPU memory PyTorch keeps cached back, so an idle reused worker holds little.

    The worker keeps its CUDA context (the start-up it saves); other frameworks' caches are
    theirs to manage.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _initial(spec: EngineSpec) -> bytes | None:
    return initial_model(spec)


def _unwrap(exc: BaseException) -> FedloopError:
    """Return the fedloop error inside a Ray task error, or one that names the Ray error."""
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the task's own exception
    if isinstance(cause, FedloopError):
        return cause
    if isinstance(exc, FedloopError):
        return exc
    return FedloopError(f"a Ray task failed: {type(exc).__name__}: {exc}")


class RayBackend:
    """Runs agents as Ray tasks on the cluster at ``address``, or on a Ray it starts here."""

    def __init__(
        self,
        address: str | None = None,
        cpus_per_agent: float = 1.0,
        gpus_per_agent: float = 0.0,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        reuse_workers: bool = True,
    ) -> None:
        if cpus_per_agent < 0 or gpus_per_agent < 0 or (cpus_per_agent == 0 == gpus_per_agent):
            raise ConfigError(
                f"--cpus-per-agent ({cpus_per_agent}) and --gpus-per-agent ({gpus_per_agent}) "
                "must be >= 0 and not both 0"
            )
        self.address = address
        self.cpus_per_agent = cpus_per_agent
        self.gpus_per_agent = gpus_per_agent
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.reuse_workers = reuse_workers
        self._ray: Any = None
        self._started_here = False
        self._spec_ref: Any = None
        self._train: Any = None
        self._initial: Any = None
        self._slots = 1

    def describe(self) -> str:
        where = f"cluster at {self.address}" if self.address else "local Ray"
        gpus = f", {self.gpus_per_agent:g} GPU" if self.gpus_per_agent else ""
        return f"ray, {where}, {self.cpus_per_agent:g} CPU{gpus} per agent"

    async def start(self, spec: EngineSpec) -> None:
        ray = self._ray = import_ray()
        await asyncio.to_thread(self._connect, ray)
        resources = ray.cluster_resources()
        slots = []
        if self.cpus_per_agent:
            slots.append(resources.get("CPU", 0.0) / self.cpus_per_agent)
        if self.gpus_per_agent:
            slots.append(resources.get("GPU", 0.0) / self.gpus_per_agent)
        if min(slots) < 1:
            raise ConfigError(
                f"the Ray cluster has {resources.get('CPU', 0):g} CPUs and "
                f"{resources.get('GPU', 0):g} GPUs: not enough for one agent with "
                f"--cpus-per-agent {self.cpus_per_agent:g} --gpus-per-agent "
                f"{self.gpus_per_agent:g}; lower them or add nodes"
            )
        self._slots = int(min(slots))
        options: dict[str, Any] = {
            "num_cpus": self.cpus_per_agent,
            "num_gpus": self.gpus_per_agent,
        }
        if self.gpus_per_agent and self.reuse_workers:
            # Ray's default for a GPU task is a fresh worker process per task (max_calls=1):
            # each chunk of agents would pay the process start, the framework import and a
            # CUDA context again. Workers stay; each frees its framework's cached GPU memory
            # after a chunk (`_release_gpu_cache`).
            options["max_calls"] = 0
        # A failed agent is a bug in the engine, not a lost node: retrying would repeat it.
        self._train = ray.remote(max_retries=0, **options)(_train_chunk)
        self._initial = ray.remote(max_retries=0, **options)(_initial)
        self._spec_ref = ray.put(spec)

    def _connect(self, ray: Any) -> None:
        if ray.is_initialized():
            return  # the caller's own Ray session: use it, and leave it running
        kwargs: dict[str, Any] = {
            "logging_level": logging.WARNING,
            "log_to_driver": True,
        }
        if self.address:
            kwargs["address"] = self.address
        else:
            kwargs.update(
                num_cpus=self.num_cpus or os.cpu_count() or 1,
                num_gpus=self.num_gpus,
                include_dashboard=False,
            )
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise ConfigError(
                f"cannot connect to the Ray cluster at {self.address}: {exc}; check "
                "--ray-address (e.g. ray://head:10001, or auto on a cluster node)"
            ) from exc
        self._started_here = True

    async def initial_model(self) -> bytes | None:
        ref = self._initial.remote(self._spec_ref)
        try:
            result: bytes | None = await asyncio.wrap_future(ref.future())
        except Exception as exc:
            raise _unwrap(exc) from None
        return result

    async def train(
        self,
        round_number: int,
        model: ModelBytes,
        config: Mapping[str, Any],
        indices: Sequence[int],
    ) -> AsyncIterator[AgentResult]:
        ray = self._ray
        size = chunk_size(len(indices), self._slots, model.nbytes)
        # Ray's object store takes one buffer; workers may be on other machines.
        data_ref = ray.put(model.joined())
        config = dict(config)
        refs = [
            self._train.remote(self._spec_ref, data_ref, config, list(indices[i : i + size]))
            for i in range(0, len(indices), size)
        ]
        futures = [asyncio.wrap_future(ref.future()) for ref in refs]
        finished = False
        try:
            for next_done in asyncio.as_completed(futures):
                try:
                    results: list[AgentResult] = await next_done
                except Exception as exc:
                    raise _unwrap(exc) from None
                for result in results:
                    yield result
            finished = True
        finally:
            if not finished:  # an agent failed or the run was interrupted
                for ref in refs:
                    try:
                        ray.cancel(ref)
                    except Exception:  # already finished
                        log.debug("could not cancel a Ray task", exc_info=True)

    async def stop(self) -> None:
        if self._ray is not None and self._started_here:
            await asyncio.to_thread(self._ray.shutdown)
            self._started_here = False
