"""The book's minimal example with the imperative API, and `fedloop demo`."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import Server, env

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "minimal"))

from minimal import main as minimal_main  # noqa: E402


def test_minimal_example_is_checkable_by_hand(make_server: Any) -> None:
    server: Server = make_server(min_agents=2, rounds=1)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(
            minimal_main, ["--url", server.url, "--name", "a1", "--value", "1", "--samples", "1"]
        )
        second = pool.submit(
            minimal_main, ["--url", server.url, "--name", "a2", "--value", "3", "--samples", "3"]
        )
        results = [first.result(timeout=60), second.result(timeout=60)]
    for model in results:
        np.testing.assert_allclose(model["model1"], np.full((2, 3), 2.5))
        np.testing.assert_allclose(model["model2"], np.full((3, 2), 2.5))


def test_a_round_whose_agents_all_report_no_samples_keeps_the_initial_model(
    make_server: Any,
) -> None:
    """docs/decisions/0014: the round closes with the global model it started from, and the
    agents (real processes) get it, instead of the aggregation failing and being retried for
    ever while they wait."""
    server: Server = make_server(min_agents=2, rounds=1)
    script = ROOT / "examples" / "minimal" / "minimal.py"

    def start(name: str, value: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(script), "--url", server.url, "--name", name, "--value", value,
             "--samples", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
        )  # fmt: skip

    agents = [start("a1", "1"), start("a2", "3")]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=60)[0])
            assert agent.returncode == 0, outputs[-1][-3000:]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait(timeout=10)
    for output in outputs:  # minimal.py's initial model: zeros
        assert "model1 = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]" in output, output
    rounds = server.history()
    assert [(r["round"], r["agents"], r["samples"]) for r in rounds] == [(0, 0, 0), (1, 2, 0)]
    assert "round 1: every local model reports num_samples=0" in server.log()
    assert "aggregation of round 1 failed" not in server.log()


def test_demo_reaches_090_on_digits(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    result = subprocess.run(
        [sys.executable, "-m", "fedloop", "demo", "--json", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["rounds"] == 5
    assert summary["final_accuracy"] >= 0.90, summary
    assert len([line for line in lines if line.strip()[:1].isdigit()]) == 5  # a row per round
    history = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedloop",
            "history",
            "--data-dir",
            str(tmp_path / "demo" / "aggregator"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert history.returncode == 0 and "accuracy" in history.stdout
