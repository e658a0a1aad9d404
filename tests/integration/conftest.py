"""Real aggregator and agent processes on loopback ports, with real SQLite files."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedloop.demo import free_port, wait_until_up, write_config

HERE = Path(__file__).parent


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    return {
        **os.environ,
        "PYTHONPATH": path,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


@dataclass
class Server:
    """An aggregator process that can be killed and started again on the same files."""

    root: Path
    settings: dict[str, Any]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    tls: ssl.SSLContext | None = None  # client context when the aggregator serves TLS

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "aggregator"

    def start(self) -> Server:
        config = write_config(
            self.root / "aggregator.toml", self.port, self.data_dir, **dict(self.settings)
        )
        log = open(self.root / "aggregator.log", "ab")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedloop", "aggregator", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env(),
        )
        wait_until_up(self.url, self.process, verify=self.tls or True)
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, verify=self.tls or True, **kwargs)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/v1/status").json()
        return result

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.05)
        raise AssertionError(f"timed out; last status {status}; log:\n{self.log()[-3000:]}")

    def log(self) -> str:
        path = self.root / "aggregator.log"
        return path.read_text(errors="replace") if path.exists() else ""


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
    servers: list[Server] = []

    def make(**settings: Any) -> Server:
        server = Server(tmp_path, settings)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def agents() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
