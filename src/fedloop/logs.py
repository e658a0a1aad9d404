"""Logging set-up shared by the command-line entry points.

Every line carries the round and the agent it concerns: the aggregator registers where the
current round comes from (`set_round_source`) and sets `current_agent` while it handles an
agent's request; an agent process names itself once (`setup_logging(agent=…)`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from contextvars import ContextVar

current_agent: ContextVar[str | None] = ContextVar("fedloop_agent", default=None)
_round_source: Callable[[], int | None] | None = None
_process_agent: str | None = None


def set_round_source(source: Callable[[], int | None] | None) -> None:
    """Make every log line report `source()` as its round."""
    global _round_source
    _round_source = source


class ContextFilter(logging.Filter):
    """Adds `round` and `agent` to every record (None where they do not apply)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "round", None) is None:
            record.round = _round_source() if _round_source is not None else None
        if getattr(record, "agent", None) is None:
            record.agent = current_agent.get() or _process_agent
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = []
        if getattr(record, "round", None) is not None:
            context.append(f"round={getattr(record, 'round')}")  # noqa: B009
        if getattr(record, "agent", None):
            context.append(f"agent={getattr(record, 'agent')}")  # noqa: B009
        record.context = f" [{' '.join(context)}]" if context else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "round": getattr(record, "round", None),
            "agent": getattr(record, "agent", None),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", fmt: str = "text", agent: str | None = None) -> None:
    global _process_agent
    _process_agent = agent
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # One line per HTTP request drowns the round log; failures still surface as our errors.
    logging.getLogger("httpx").setLevel(logging.WARNING)
