"""Import a user's object from a `module:attribute` string."""

from __future__ import annotations

import importlib
import inspect
import json
from typing import Any

from fedloop.errors import ConfigError


def import_object(spec: str) -> Any:
    """Return the attribute `spec` names (`package.module:attr`), or raise a ConfigError."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"{spec!r} is not of the form 'module:object'; write e.g. 'mypkg.train:engine'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r} ({exc}); "
            "check the name and that it is on PYTHONPATH"
        ) from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    return target


def load_engine(spec: str, **kwargs: Any) -> Any:
    """Return an ML engine: the object `spec` names, called first if it is a class or factory."""
    target = import_object(spec)
    if inspect.isclass(target) or (
        callable(target) and not hasattr(target, "train") and not hasattr(target, "evaluate")
    ):
        target = target(**kwargs)
    if not hasattr(target, "train") and not hasattr(target, "evaluate"):
        raise ConfigError(f"{spec!r} is not an ML engine: it has neither train() nor evaluate()")
    return target


def parse_sets(values: list[str], flag: str = "--set") -> dict[str, Any]:
    """Return ``key=value`` items as a dict; values are JSON where they parse, else strings."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r} is not key=value; write e.g. {flag} lr=0.1")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out
