"""The aggregator's dashboard: one page at `/` that shows the run live, served from the package.

`routes(aggregator)` gives the Starlette routes to add to the aggregator's app: the page, its
static files under `/dashboard/static/`, and `/v1/dashboard`, the JSON the page polls.
"""

from __future__ import annotations

from fedloop.dashboard.view import routes, snapshot

__all__ = ["routes", "snapshot"]
