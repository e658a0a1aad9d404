"""Real aggregator and agent processes for the integration tests (their engines on PYTHONPATH).

A module of its own, not conftest.py: test modules import it by a name no other test folder
uses (several folders have a conftest.py, and which one `import conftest` finds depends on the
order pytest loaded them). The fixtures below are re-exported by the conftest.py of every suite
that uses them (tests/integration, tests/postgres).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from procs import AggregatorProcess, process_env, started_servers

HERE = Path(__file__).parent


def env(**extra: str) -> dict[str, str]:
    return process_env(HERE, **extra)


@dataclass
class Server(AggregatorProcess):
    """An aggregator process whose PYTHONPATH holds this directory's engines."""

    pythonpath: Path | None = HERE


def start_agent(
    server: Server,
    name: str,
    engine: str = "engines:ShiftEngine",
    *args: str,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    workdir = server.root / name
    log = open(server.root / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedloop",
            "agent",
            engine,
            "--url",
            server.url,
            "--name",
            name,
            "--workdir",
            str(workdir),
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env(**(extra_env or {})),
    )


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    yield from started_servers(Server, tmp_path)


@pytest.fixture
def agents() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
