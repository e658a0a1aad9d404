"""A real `fedloop aggregator` process on a loopback port: the one harness every process test uses.

tests/integration, tests/e2e and tests/faults (and bench/faults.py) build on `AggregatorProcess`;
each puts its own directory of engines and strategies on the processes' PYTHONPATH.
"""

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
from typing import Any, TypeVar

import httpx

from fedloop.demo import free_port, wait_until_up, write_config


def process_env(pythonpath: Path | None, **extra: str) -> dict[str, str]:
    """The environment of a test process: `pythonpath` importable, unbuffered, one thread."""
    parts = [str(pythonpath)] if pythonpath else []
    path = os.pathsep.join(p for p in [*parts, os.environ.get("PYTHONPATH", "")] if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


@dataclass
class AggregatorProcess:
    """An aggregator process that can be killed and started again on the same files."""

    root: Path
    settings: dict[str, Any]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    tls: ssl.SSLContext | None = None  # client context when the aggregator serves TLS
    pythonpath: Path | None = None  # where the processes find test engines and strategies
    open_files: int | None = None  # the process's open-file limit (RLIMIT_NOFILE), if set
    kills: int = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "aggregator"

    @property
    def db_file(self) -> Path:
        return self.data_dir / "fedloop.db"

    def start(self) -> AggregatorProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        config = write_config(
            self.root / "aggregator.toml", self.port, self.data_dir, **dict(self.settings)
        )
        with open(self.root / "aggregator.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fedloop", "aggregator", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=process_env(self.pythonpath),
                preexec_fn=None if self.open_files is None else self._limit_open_files,
            )
        wait_until_up(self.url, self.process, verify=self.tls or True)
        return self

    def _limit_open_files(self) -> None:
        import resource

        assert self.open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed, sockets die with the process."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.kills += 1

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def restart(self) -> None:
        """Stop cleanly and start again: start-up is when orphaned blobs are collected."""
        self.stop()
        self.start()

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, verify=self.tls or True, **kwargs)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/v1/status").json()
        return result

    def history(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.get("/v1/history").json()["rounds"]
        return rows

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.05)
        raise AssertionError(f"timed out; last status {status}; log:\n{self.log()[-3000:]}")

    def log(self) -> str:
        path = self.root / "aggregator.log"
        return path.read_text(errors="replace") if path.exists() else ""


P = TypeVar("P", bound=AggregatorProcess)


def started_servers(kind: type[P], root: Path) -> Iterator[Callable[..., P]]:
    """A `make_server` fixture's body: yield `make(**settings)`, which starts an aggregator of
    `kind` in `root`; every one started is stopped afterwards."""
    servers: list[P] = []

    def make(**settings: Any) -> P:
        server = kind(root, settings)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()
