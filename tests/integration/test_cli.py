"""The command line: a user's mistake is one sentence, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from harness import env


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedloop", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
    )


def assert_one_sentence(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr + result.stdout
    assert fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_version() -> None:
    result = run("version")
    assert result.returncode == 0 and result.stdout.startswith("fedloop ")


def test_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("aggregation_threshold = 3\n")
    assert_one_sentence(run("aggregator", "--config", str(path)), "aggregation_threshold")
    assert_one_sentence(
        run("aggregator", "--config", str(tmp_path / "missing.toml")), "does not exist"
    )


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("aggregator", "--port", str(port), "--data-dir", str(tmp_path))
    assert_one_sentence(result, "already in use")


def test_unreachable_aggregator(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = run(
        "agent",
        "engines:ShiftEngine",
        "--url",
        f"http://127.0.0.1:{port}",
        "--name",
        "x",
        "--workdir",
        str(tmp_path / "x"),
        "--give-up-after",
        "1",
    )
    assert result.returncode == 2 and "cannot reach the aggregator" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_engine(tmp_path: Path) -> None:
    result = run("agent", "no_such_module:thing", "--workdir", str(tmp_path / "x"))
    assert_one_sentence(result, "cannot import module")


def test_history_without_a_run(tmp_path: Path) -> None:
    assert_one_sentence(run("history", "--data-dir", str(tmp_path)), "no fedloop database")


def test_invalid_aggregator_urls_are_refused_at_once(tmp_path: Path) -> None:
    # Neither can ever work: retrying them (without --give-up-after, for ever) hides the typo.
    for url in ("127.0.0.1:8765", "http://127.0.0.1:99999", "ftp://127.0.0.1:8765"):
        result = run("agent", "engines:ShiftEngine", "--url", url, "--workdir", str(tmp_path))
        assert_one_sentence(result, f"the aggregator URL {url!r} is not valid")


def test_a_file_where_a_directory_should_be(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("hi\n")
    result = run(
        "simulate", "fedloop.sim.engines:logreg_engine", "-n", "2", "--rounds", "1",
        "--no-progress", "--data-dir", str(afile),
    )  # fmt: skip
    assert_one_sentence(result, f"cannot make the data directory {afile}: a file is where")
    result = run("partition", "iid", "--agents", "3", "--plot", str(afile / "x.png"))
    assert_one_sentence(result, f"cannot write the plot to {afile / 'x.png'}: a file is where")
    assert afile.read_text() == "hi\n"
