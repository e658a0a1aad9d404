"""Aggregation strategies by name: create("fedavg"), load("my.module:MyStrategy"), available(),
and agent_side("scaffold"), the agent's half of a method with side tensors."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from fedloop.errors import ConfigError
from fedloop.strategies.async_ import FedAsync, FedBuff
from fedloop.strategies.base import AgentSide, RunningMean, Strategy, Update
from fedloop.strategies.dp import DPFedAvg
from fedloop.strategies.fedavg import FedAvg, FedProx, fedavg
from fedloop.strategies.fedcurv import FedCurv
from fedloop.strategies.fednova import FedNova
from fedloop.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedloop.strategies.robust import (
    Bulyan,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
)
from fedloop.strategies.scaffold import Scaffold

_REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedProx,
        FedAvgM,
        FedAdagrad,
        FedAdam,
        FedYogi,
        Scaffold,
        FedNova,
        FedCurv,
        Median,
        TrimmedMean,
        Krum,
        MultiKrum,
        Bulyan,
        GeometricMedian,
        FedAsync,
        FedBuff,
        DPFedAvg,
    )
}


def available() -> list[str]:
    """Return the registry names create() accepts, sorted."""
    return sorted(_REGISTRY)


def agent_side(name: str) -> AgentSide:
    """Return the agent's half of the registered strategy `name` (`AgentSide`): for a name not
    registered here (a `module:Class` strategy's), the default, which hands the engine the
    shipped tensors as they are and keeps nothing."""
    cls = _REGISTRY.get(name)
    side = cls.agent_side if cls is not None else None
    return side if side is not None else AgentSide()


def create(name: str, **params: Any) -> Strategy:
    """Return a new strategy of the registered name, built with the given parameters.

    Raises ConfigError for an unknown name or an unknown, mistyped or out-of-range parameter.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown strategy {name!r}; use one of {', '.join(available())}, "
            "or 'module:Class' for your own Strategy subclass"
        )
    return _instantiate(cls, repr(name), params)


def load(spec: str, **params: Any) -> Strategy:
    """Return a strategy from a registry name or a "module:Class" Strategy subclass spec.

    Raises ConfigError when the module cannot be imported, has no such class, the class is not
    a Strategy subclass, or the parameters do not fit it.
    """
    if ":" not in spec:
        return create(spec, **params)
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"strategy spec {spec!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r} for strategy {spec!r} ({exc}); "
            "check the name and that it is on the Python path"
        ) from exc
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ConfigError(
            f"{spec!r} does not name a fedloop Strategy subclass; define "
            f"'class {class_name}(fedloop.strategies.Strategy)' in {module_name}"
        )
    if inspect.isabstract(cls):
        raise ConfigError(f"{spec!r} is abstract; implement aggregate() in {class_name}")
    return _instantiate(cls, repr(spec), params)


def _instantiate(cls: type[Strategy], label: str, params: dict[str, Any]) -> Strategy:
    accepted: list[str] = []
    open_ended = False
    for parameter in inspect.signature(cls).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            open_ended = True
        elif parameter.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            accepted.append(parameter.name)
    unknown = sorted(set(params) - set(accepted))
    if unknown and not open_ended:
        valid = ", ".join(accepted) if accepted else "none"
        raise ConfigError(
            f"strategy {label} has no parameter {', '.join(unknown)}; its parameters are: {valid}"
        )
    try:
        return cls(**params)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy {label} rejected its parameters: {exc}") from exc


__all__ = [
    "AgentSide",
    "Bulyan",
    "DPFedAvg",
    "FedAdagrad",
    "FedAdam",
    "FedAsync",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedCurv",
    "FedNova",
    "FedProx",
    "FedYogi",
    "GeometricMedian",
    "Krum",
    "Median",
    "MultiKrum",
    "RunningMean",
    "Scaffold",
    "Strategy",
    "TrimmedMean",
    "Update",
    "agent_side",
    "available",
    "create",
    "fedavg",
    "load",
]
