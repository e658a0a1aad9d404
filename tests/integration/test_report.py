"""`fedloop report` on a real run: the image-classification example, then the CLI."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness import Server, env, start_agent

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "image_classification" / "run.py"


def _fedloop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedloop", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
    )


def _check_self_contained(page: str) -> None:
    # Nothing the browser would fetch from a network: no http(s) src/href/url(), no @import.
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?https?://""", page)
    assert "@import" not in page


def test_report_of_a_real_aggregator_run(make_server: Any, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    server: Server = make_server(min_agents=2, rounds=3)
    agents = [start_agent(server, f"site-{i}", "engines:ShiftEngine") for i in range(2)]
    for agent in agents:
        assert agent.wait(timeout=120) == 0, server.log()[-3000:]
    server.stop()

    out = tmp_path / "report"
    result = _fedloop("report", "--data-dir", str(server.data_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    written = {Path(line).name for line in result.stdout.split()}
    assert {"report.html", "rounds.csv", "local_models.csv", "rounds.png"} <= written
    assert {"metric_accuracy.png", "metric_loss.png", "metric_mean.png"} <= written
    assert all((out / name).is_file() for name in written)
    with (out / "rounds.csv").open() as handle:
        rounds = list(csv.DictReader(handle))
    assert [r["round"] for r in rounds] == ["0", "1", "2", "3"]
    assert [r["agents"] for r in rounds] == ["0", "2", "2", "2"]
    assert all(int(r["bytes_up"]) > 0 for r in rounds[1:])
    assert int(rounds[0]["downloads_est"]) == 2
    with (out / "local_models.csv").open() as handle:
        local = list(csv.DictReader(handle))
    assert len(local) == 6 and {r["agent"] for r in local} == {"site-0", "site-1"}
    assert all(r["local_accuracy"] == "0.5" and r["global_mean"] for r in local)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list(out.glob("*.png"))) == 4
    _check_self_contained(page)


def test_example_with_a_bad_data_dir_says_why_the_aggregator_stopped(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    empty = tmp_path / "empty"
    empty.mkdir()
    example = subprocess.run(
        [sys.executable, str(EXAMPLE), "--data-dir", str(empty), "--rounds", "1",
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env=env(),
    )  # fmt: skip
    assert example.returncode == 1
    # The aggregator's own sentence, not only its exit code; and where its log is.
    log = tmp_path / "run" / "logs" / "aggregator.log"
    assert example.stderr.strip() == (
        "error: the aggregator exited with code 2 at start: file not found: "
        f"{empty / 'train-images-idx3-ubyte.gz'} (or uncompressed train-images-idx3-ubyte) "
        f"(its log: {log})"
    )


@pytest.mark.slow
def test_example_run_then_report(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "run"
    example = subprocess.run(
        [
            *(sys.executable, str(EXAMPLE), "--agents", "2", "--rounds", "2", "--epochs", "1"),
            *("--out", str(run_dir), "--timeout", "120"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env(),
    )
    assert example.returncode == 0, example.stdout[-2000:] + example.stderr[-3000:]
    assert (run_dir / "report" / "report.html").is_file()  # the example writes one too

    out = tmp_path / "report"
    result = _fedloop("report", "--data-dir", str(run_dir / "aggregator"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ["report.html", "rounds.csv", "local_models.csv", "rounds.png"]:
        assert (out / name).is_file(), name
    assert (out / "metric_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    with (out / "rounds.csv").open() as handle:
        rounds = list(csv.DictReader(handle))
    assert [r["round"] for r in rounds] == ["0", "1", "2"]
    assert [r["agents"] for r in rounds] == ["0", "2", "2"]
    assert float(rounds[2]["global_accuracy"]) > 0.1
    assert int(rounds[1]["bytes_up"]) > 0 and int(rounds[1]["bytes_down_est"]) > 0
    with (out / "local_models.csv").open() as handle:
        local = list(csv.DictReader(handle))
    assert sorted((r["round"], r["agent"]) for r in local) == [
        ("1", "agent-0"),
        ("1", "agent-1"),
        ("2", "agent-0"),
        ("2", "agent-1"),
    ]
    assert all(r["local_accuracy"] and r["global_accuracy"] for r in local)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list(out.glob("*.png")))
    _check_self_contained(page)


def test_report_without_database_prints_one_sentence(tmp_path: Path) -> None:
    result = _fedloop("report", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: no fedloop database at")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "fedloop.db").exists()
