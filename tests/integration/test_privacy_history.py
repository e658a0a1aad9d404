"""A real dp_fedavg run (killed and restarted once): `fedloop history` and `fedloop report`
show the ε spent up to each round, the accountant's value for the run's parameters."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Server, env, start_agent

from fedloop.privacy import dp_epsilon

SIGMA, N, M, DELTA = 1.1, 10, 2, 1e-5  # δ: the default min(1e-5, N^-1.1)


def _fedloop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedloop", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
    )


def test_history_and_report_show_the_epsilon_spent_per_round(
    make_server: Any, agents: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    strategy = {
        "name": "dp_fedavg",
        "clip_norm": 1.0,
        "noise_multiplier": SIGMA,
        "num_agents": N,
        "agents_per_round": M,
        "seed": 3,
    }
    server: Server = make_server(min_agents=M, rounds=3, strategy=strategy)
    for i in range(M):
        agents.append(start_agent(server, f"a{i}", "engines:ShiftEngine", "--set", "delay=0.3"))
    # A restart between rounds must carry the accountant on, not start it again at 0.
    server.wait_for(lambda s: s["round"] == 2, timeout=60)
    server.kill()
    time.sleep(0.3)
    server.start()
    server.wait_for(lambda s: s["finished"], timeout=90)
    for process in agents:
        assert process.wait(timeout=30) == 0, server.log()[-3000:]
    server.stop()

    expected = [dp_epsilon(M / N, SIGMA, r, DELTA) for r in (1, 2, 3)]
    assert expected == sorted(expected) and expected[0] < expected[-1]

    lines = _fedloop("history", "--data-dir", str(server.data_dir), "--json")
    assert lines.returncode == 0, lines.stderr
    rows = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["dp_epsilon"] is None
    assert [r["dp_epsilon"] for r in rows[1:]] == pytest.approx(expected, rel=1e-9)
    assert [r["dp_delta"] for r in rows[1:]] == [DELTA] * 3

    table = _fedloop("history", "--data-dir", str(server.data_dir))
    assert table.returncode == 0, table.stderr
    assert "ε (δ=1e-05)" in table.stdout
    by_round = {
        cells[0]: cells
        for line in table.stdout.splitlines()
        if len(cells := [c.strip() for c in line.replace("┃", "│").split("│")[1:-1]]) > 1
    }
    column = by_round["round"].index("ε (δ=1e-05)")
    assert [by_round[str(r)][column] for r in (1, 2, 3)] == [f"{e:.4g}" for e in expected]

    out = tmp_path / "report"
    report = _fedloop("report", "--data-dir", str(server.data_dir), "--out", str(out))
    assert report.returncode == 0, report.stderr[-3000:]
    assert (out / "privacy.png").is_file()
    with (out / "rounds.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert csv_rows[0]["dp_epsilon"] == ""
    assert [float(r["dp_epsilon"]) for r in csv_rows[1:]] == pytest.approx(expected, rel=1e-9)
    page = (out / "report.html").read_text()
    assert f"ε = {expected[-1]:.4g}, δ = 1e-05" in page
    assert f"<td>{expected[-1]:.4g}</td>" in page
