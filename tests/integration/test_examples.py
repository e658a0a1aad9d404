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
