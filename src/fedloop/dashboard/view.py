"""The dashboard's routes: the page, its static files, and the JSON it polls (`/v1/dashboard`)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from fedloop.errors import ProtocolError
from fedloop.protocol.version import PROTOCOL_VERSION

if TYPE_CHECKING:
    from fedloop.aggregator.service import Aggregator
    from fedloop.store.db import GlobalModelRow, LocalModelRow

STATIC_URL = "/dashboard/static"
MAX_AGENTS_SHOWN = 500  # a table row each; beyond that the page shows the count only
# Per-agent lines in a chart: more than a handful is a tangle, and the mean is still drawn.
MAX_AGENT_SERIES = 20
# Rounds missing from the cache above this many are read with two whole-table queries
# instead of two queries per round.
BULK_READ_ROUNDS = 20

# The page's own script and styles only; agent names are shown as text, never as markup.
CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)


def _summary(
    model: GlobalModelRow, locals_: list[LocalModelRow], names: dict[str, str]
) -> dict[str, Any]:
    per_agent: dict[str, dict[str, float]] = {}
    for row in locals_:
        per_agent[names.get(row.agent_id, row.agent_id)] = dict(row.metrics)
    means: dict[str, float] = {}
    for key in sorted({k for m in per_agent.values() for k in m}):
        values = [m[key] for m in per_agent.values() if key in m]
        means[key] = sum(values) / len(values)
    return {
        "round": model.round,
        "agents": len(model.contributors),
        "samples": model.total_samples,
        "seconds": round(model.seconds, 4),
        "created_at": model.created_at,
        "global_metrics": dict(model.metrics),
        "local_metrics_mean": means,
        "local_metrics": per_agent,
    }


class RoundCache:
    """Per-round summaries of committed global models, which never change once written."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, Any]] = {}

    def fill(self, aggregator: Aggregator, up_to: int) -> None:
        """Read the summaries of rounds up to `up_to` that are not cached yet (blocking)."""
        store = aggregator.store
        missing = [n for n in range(up_to + 1) if n not in self.rounds]
        if not missing:
            return
        names = dict(aggregator.agents)
        if len(missing) > BULK_READ_ROUNDS:
            wanted = set(missing)
            by_round: dict[int, list[LocalModelRow]] = defaultdict(list)
            for row in store.local_models():
                if row.round in wanted:
                    by_round[row.round].append(row)
            for model in store.global_models():
                if model.round in wanted:
                    self.rounds[model.round] = _summary(model, by_round[model.round], names)
            return
        for number in missing:
            found = store.global_model(number)
            if found is not None:
                self.rounds[number] = _summary(found, store.local_models(number), names)

    def since(self, after: int, up_to: int) -> list[dict[str, Any]]:
        # Over the cached keys, not range(after, up_to): a huge negative `after` from a query
        # string must not become a loop of billions on the event loop.
        return [self.rounds[n] for n in sorted(self.rounds) if after < n <= up_to]


def agent_rows(aggregator: Aggregator, now: float) -> list[dict[str, Any]]:
    """Return the agents the page lists: connection status, last contact, upload this round."""
    connected = set(aggregator.connected)
    uploaded = set(aggregator.pending)
    rows = []
    for agent_id, name in sorted(aggregator.agents.items(), key=lambda item: item[1]):
        seen = aggregator.last_seen.get(agent_id)
        # No agent ids: until uploads need a token, an id is all it takes to upload as an agent.
        rows.append(
            {
                "name": name,
                "status": "connected" if agent_id in connected else "idle",
                "uploaded": agent_id in uploaded,
                "last_seen": seen,
                "last_seen_ago": None if seen is None else round(max(0.0, now - seen), 3),
            }
        )
        if len(rows) >= MAX_AGENTS_SHOWN:
            break
    return rows


async def snapshot(aggregator: Aggregator, cache: RoundCache, since: int) -> dict[str, Any]:
    """Return what the page shows: status, agents, counters, and the rounds after `since`."""
    global_round = aggregator.global_round
    if global_round > since:
        await asyncio.to_thread(cache.fill, aggregator, global_round)
    now = time.time()
    status = aggregator.status().model_dump()
    return {
        "protocol": PROTOCOL_VERSION,
        "now": now,
        "status": status,
        "round_started": aggregator.round_started or None,
        "round_timeout": aggregator.config.round_timeout or None,
        "rounds_planned": aggregator.config.rounds or None,
        "agents": agent_rows(aggregator, now),
        "agents_total": len(aggregator.agents),
        "agents_connected": len(aggregator.connected),
        "stats": dict(aggregator.stats),
        "max_agent_series": MAX_AGENT_SERIES,
        "rounds": cache.since(since, global_round),
    }


def _page() -> str:
    return resources.files("fedloop.dashboard").joinpath("static", "index.html").read_text("utf-8")


def routes(aggregator: Aggregator) -> list[BaseRoute]:
    """Return the dashboard's routes: `/` (the page), its static files, and `/v1/dashboard`."""
    cache = RoundCache()
    page = _page()

    async def index(request: Request) -> Response:
        return HTMLResponse(
            page,
            headers={
                "content-security-policy": CSP,
                "x-content-type-options": "nosniff",
                "cache-control": "no-cache",
            },
        )

    async def data(request: Request) -> Response:
        # Agent names and every metric: with auth on, for admin tokens only (the page itself
        # and its static files hold no data and stay open).
        aggregator.require_admin(
            await aggregator.authenticate(request.headers.get("authorization"))
        )
        try:
            since = int(request.query_params.get("since", "-1"))
        except ValueError as exc:
            raise ProtocolError("'since' must be an integer (a round number)", 400) from exc
        body = await snapshot(aggregator, cache, since)
        return JSONResponse(body, headers={"cache-control": "no-store"})

    return [
        Route("/", index),
        Route("/v1/dashboard", data),
        Mount(
            STATIC_URL,
            app=StaticFiles(packages=[("fedloop.dashboard", "static")]),
            name="dashboard-static",
        ),
    ]
