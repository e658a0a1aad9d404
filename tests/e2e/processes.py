"""A real aggregator process with the dashboard's routes, and real agent processes.

The agents run `engines:ShiftEngine` from tests/integration (put on their PYTHONPATH).
tests/e2e is a package so that its conftest does not shadow tests/integration's `conftest`
module, which the integration tests import by that name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fedloop.demo import free_port, wait_until_up, write_config

HERE = Path(__file__).parent
ENGINES = HERE.parent / "integration"


def env() -> dict[str, str]:
    path = os.pathsep.join([str(ENGINES), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@dataclass
class Server:
    root: Path
    settings: dict[str, Any]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        config = write_config(
            self.root / "aggregator.toml",
            self.port,
            self.root / "aggregator",
            **dict(self.settings),
        )
        log = open(self.root / "aggregator.log", "ab")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedloop", "aggregator", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env(),
        )
        wait_until_up(self.url, self.process)
        return self

    def start_agent(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedloop",
                "agent",
                "engines:ShiftEngine",
                "--url",
                self.url,
                "--name",
                name,
                "--workdir",
                str(self.root / name),
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env(),
        )
        self.agents.append(process)
        return process

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.get("/v1/status").json()
            if predicate(status):
                return status
            time.sleep(0.05)
        raise AssertionError(f"timed out; last status {status}; log:\n{self.log()[-3000:]}")

    def log(self) -> str:
        path = self.root / "aggregator.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for process in [*self.agents, self.process]:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
