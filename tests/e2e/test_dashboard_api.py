"""The dashboard's routes on a real aggregator process with real agents: page, files, JSON."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from e2e.processes import Server

ROUNDS = 3


def test_dashboard_routes_serve_the_page_files_and_the_run(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(
        rounds=ROUNDS,
        min_agents=2,
        aggregation_threshold=1.0,
        evaluate={"engine": "engines:ShiftEngine"},
    )
    server.start_agent("site-a", "--set", "offset=1")
    server.start_agent("site-b", "--set", "offset=3")
    server.wait_for(lambda s: s["finished"])

    page = server.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'type="module" src="dashboard/static/dashboard.js"' in page.text

    for name, kind in [
        ("dashboard.js", "javascript"),
        ("chart.js", "javascript"),
        ("dashboard.css", "text/css"),
    ]:
        static = server.get(f"/dashboard/static/{name}")
        assert static.status_code == 200, name
        assert kind in static.headers["content-type"], name
    # Only the static folder is served, not the package around it.
    assert server.get("/dashboard/static/../view.py").status_code == 404
    assert server.get("/dashboard/static/%2e%2e/view.py").status_code == 404

    data: dict[str, Any] = server.get("/v1/dashboard").json()
    assert data["status"]["finished"] is True
    assert data["status"]["global_round"] == ROUNDS
    assert data["agents_total"] == 2
    assert [a["name"] for a in data["agents"]] == ["site-a", "site-b"]
    for agent in data["agents"]:
        assert "id" not in agent  # an id is an agent's upload credential until tokens exist
        assert agent["status"] in {"connected", "idle"}
        assert agent["last_seen"] is not None and agent["last_seen_ago"] >= 0
    rounds = data["rounds"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
    # ShiftEngine: round r's global model is r × the mean offset (2); "mean" is its mean weight.
    for r in rounds:
        assert r["global_metrics"]["mean"] == 2.0 * r["round"]
    for r in rounds[1:]:
        assert r["agents"] == 2 and r["samples"] == 20
        assert sorted(r["local_metrics"]) == ["site-a", "site-b"]
        assert r["local_metrics"]["site-a"]["loss"] == 1.0 / (1 + r["round"])
        assert r["local_metrics_mean"]["accuracy"] == 0.5
        assert r["seconds"] >= 0
    assert rounds[0]["local_metrics"] == {}

    # Only the rounds after `since`: what the page asks for once it holds the older ones.
    later = server.get(f"/v1/dashboard?since={ROUNDS - 1}").json()
    assert [r["round"] for r in later["rounds"]] == [ROUNDS]
    assert server.get(f"/v1/dashboard?since={ROUNDS}").json()["rounds"] == []
    refused = server.get("/v1/dashboard?since=two")
    assert refused.status_code == 400
    assert "since" in refused.json()["detail"]


def test_metrics_endpoint_reports_the_run(make_server: Callable[..., Server]) -> None:
    server = make_server(rounds=2, min_agents=1)
    server.start_agent("site-a")
    server.wait_for(lambda s: s["finished"])
    server.get("/v1/models/global/99")  # refused: no such round

    response = server.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in response.text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["fedloop_global_round"] == 2
    assert values["fedloop_rounds_completed_total"] == 2
    assert values["fedloop_agents_registered"] == 1
    assert values["fedloop_uploads_total"] == 2
    assert values["fedloop_finished"] == 1
    assert values["fedloop_round_duration_seconds_count"] == 2
    assert values["fedloop_received_bytes_total"] > 0
    assert values["fedloop_sent_bytes_total"] > 0
    rejected = sum(v for k, v in values.items() if k.startswith("fedloop_rejected_requests_total"))
    assert rejected >= 1
