"""Run an aggregator with the dashboard and /metrics routes: `python serve_dashboard.py CONFIG`.

Stands in for `fedloop aggregator --config CONFIG` until the CLI's app serves these routes
itself; then the e2e tests can start the plain CLI instead.
"""

from __future__ import annotations

import sys

import uvicorn

from fedloop.aggregator import metrics
from fedloop.aggregator.app import create_app
from fedloop.config import load_config
from fedloop.dashboard import routes


def main(path: str) -> None:
    config = load_config(path)
    app = create_app(config)
    aggregator = app.state.aggregator
    app.router.routes.extend([*routes(aggregator), metrics.route(aggregator)])
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=False,
        lifespan="on",
        ws_max_size=1024 * 1024,
    )


if __name__ == "__main__":
    main(sys.argv[1])
