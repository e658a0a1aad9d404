"""Processes to kill and an auditor to read what they left: the fault tests' and bench's harness.

Everything is real: the aggregator and agents are `fedloop` processes on loopback ports, the
database is their SQLite file, the blobs are their files. `audit()` reads the store the way an
auditor would and counts what the guarantees in docs/faults.md say must never happen.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from procs import AggregatorProcess, process_env

from fedloop.protocol import codec
from fedloop.protocol.messages import UploadRequest
from fedloop.protocol.version import MESSAGE_HEADER
from fedloop.store.blobs import BlobStore, blob_id
from fedloop.store.db import Store, database_url

HERE = Path(__file__).resolve().parent


def env(**extra: str) -> dict[str, str]:
    """The environment of the processes: this directory importable (engines, strategies)."""
    return process_env(HERE, **extra)


def wait_until(
    predicate: Callable[[], Any], timeout: float = 60.0, what: str = "", poll: float = 0.02
) -> Any:
    """Return predicate()'s first truthy value; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(poll)


@dataclass
class Server(AggregatorProcess):
    """An aggregator process that can be killed and started again on the same files."""

    pythonpath: Path | None = HERE

    @contextlib.contextmanager
    def write_locked(self) -> Iterator[None]:
        """Hold SQLite's write lock: the aggregator's next commit waits (busy_timeout)."""
        connection = sqlite3.connect(self.db_file, isolation_level=None, timeout=10)
        try:
            connection.execute("BEGIN IMMEDIATE")
            yield
        finally:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            connection.close()


@dataclass
class AgentProcess:
    """A `fedloop agent` process with its own working directory, restartable."""

    root: Path
    name: str
    url: str
    sets: dict[str, Any]
    args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def workdir(self) -> Path:
        return self.root / self.name

    @property
    def marker(self) -> Path:
        return self.root / f"{self.name}.training"

    def start(self) -> AgentProcess:
        sets = [item for k, v in self.sets.items() for item in ("--set", f"{k}={v}")]
        log = open(self.root / f"{self.name}.log", "ab")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedloop",
                "agent",
                "fault_engines:FaultEngine",
                "--url",
                self.url,
                "--name",
                self.name,
                "--workdir",
                str(self.workdir),
                "--set",
                f"marker={self.marker}",
                *sets,
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env(),
        )
        log.close()
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def trained(self) -> list[int]:
        """The rounds whose training started, in order (one line per start)."""
        if not self.marker.exists():
            return []
        return [int(line) for line in self.marker.read_text().split()]

    def log(self) -> str:
        path = self.root / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def state(self) -> dict[str, Any]:
        import json

        path = self.workdir / "state.json"
        for _ in range(3):  # the agent writes it in place: a read may meet a write midway
            try:
                return json.loads(path.read_text()) if path.exists() else {}
            except ValueError:
                time.sleep(0.01)
        return json.loads(path.read_text())

    def wait(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"agent {self.name} still running; log:\n{self.log()[-3000:]}"
            ) from exc


class NoSmallDisk(RuntimeError):
    """This machine cannot mount a small filesystem for the test (it needs root)."""


class SmallDisk:
    """A tmpfs of a few MB mounted at `path` (root only): a real filesystem that fills up.

    `fill(leave)` takes all its free space but `leave` bytes with a filler file (allocated, not
    sparse), `empty()` gives it back.
    """

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        self.size_mb = size_mb
        self.filler = path / "filler"

    def mount(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        command = ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.path)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except OSError as exc:  # no mount(8)
            raise NoSmallDisk(f"cannot mount a tmpfs: {exc}") from exc
        if done.returncode != 0:
            raise NoSmallDisk(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
        return self

    def unmount(self) -> None:
        subprocess.run(["umount", "--lazy", str(self.path)], capture_output=True, timeout=30)

    def free(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Leave only `leave` bytes free (rounded to pages), whatever the filler held before."""
        self.empty()
        size = self.free() - leave
        if size > 0:
            fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)


@contextlib.contextmanager
def small_disk(path: Path, size_mb: int) -> Iterator[SmallDisk]:
    """Mount a `SmallDisk` at `path` for the block; NoSmallDisk where that is not possible."""
    disk = SmallDisk(path, size_mb).mount()
    try:
        yield disk
    finally:
        disk.unmount()


class SlowUpload:
    """A raw-socket upload that sends its headers and `fraction` of the body, then stalls until
    `finish()` or the connection dies: an agent caught mid-upload."""

    def __init__(
        self, url: str, agent_id: str, round_number: int, body: bytes, num_samples: int
    ) -> None:
        port = int(url.rsplit(":", 1)[1])
        message = UploadRequest(agent_id=agent_id, round=round_number, num_samples=num_samples)
        self.body = body
        self.head = (
            "POST /v1/updates HTTP/1.1\r\n"
            f"host: 127.0.0.1:{port}\r\n"
            f"{MESSAGE_HEADER}: {message.model_dump_json()}\r\n"
            f"content-length: {len(body)}\r\n"
            "content-type: application/octet-stream\r\n\r\n"
        ).encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sent = 0

    def send_part(self, fraction: float = 0.5, pause: float = 0.0) -> None:
        """Send the headers and the first `fraction` of the body, in 64 KiB pieces."""
        self.sock.sendall(self.head)
        end = int(len(self.body) * fraction)
        for start in range(0, end, 65536):
            self.sock.sendall(self.body[start : min(end, start + 65536)])
            self.sent = min(end, start + 65536)
            if pause:
                time.sleep(pause)

    def connection_died(self, timeout: float = 5.0) -> bool:
        """True when the aggregator's end is gone (EOF or reset)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        self.sock.close()


def upload_in_thread(client: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Start `client.upload(*args)` in a thread; the list gets its result or exception."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(client.upload(*args))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# --- the auditor ----------------------------------------------------------------------------


def snapshot(data_dir: Path) -> dict[int, str]:
    """Round → blob id of every committed global model (taken before a kill)."""
    store = Store(database_url(data_dir, None))
    try:
        return {g.round: g.model_id for g in store.global_models()}
    finally:
        store.close()


def audit(
    data_dir: Path, before: dict[int, str] | None = None, check_means: bool = True
) -> dict[str, Any]:
    """Count what must never happen after kills and restarts (docs/faults.md).

    - models_lost: a global row whose blob is missing, a round committed before a kill
      (`before`) that is gone or changed after it, a round missing between 0 and the last;
    - rounds_double_counted: two global rows for one round, an agent twice among one global's
      contributors, a contributor without a local model in that round (its model would be
      counted from another round), a global that is not the sample-weighted mean of exactly its
      round's local models;
    - local_models_dropped: an accepted local model of an aggregated round left out of it;
    - stale_local_models: a synchronous round's local model not trained on the previous global;
    - orphaned_blobs / missing_blobs / temp_files: the blob directory against the rows.
    """
    store = Store(database_url(data_dir, None))
    blobs = BlobStore(data_dir / "blobs")
    try:
        globals_ = store.global_models()
        locals_ = store.local_models()
        referenced = store.referenced_blobs()
    finally:
        store.close()
    keys = blobs.keys()
    per_round = Counter(g.round for g in globals_)
    models = {g.round: g for g in globals_}
    last = max(models, default=-1)

    lost = {r for r, g in models.items() if g.model_id not in keys}
    lost |= {r for r, m in (before or {}).items() if r not in models or models[r].model_id != m}
    lost |= set(range(last + 1)) - set(models)

    double = sum(n - 1 for n in per_round.values() if n > 1)
    dropped = stale = bad_means = 0
    by_round: dict[int, dict[str, Any]] = {}
    for row in locals_:
        by_round.setdefault(row.round, {})[row.agent_id] = row
        if row.round in models and row.base_round != row.round - 1:
            stale += 1
    for r, g in models.items():
        if r == 0:
            continue
        rows = by_round.get(r, {})
        contributors = Counter(g.contributors)
        double += sum(n - 1 for n in contributors.values() if n > 1)
        double += sum(1 for a in contributors if a not in rows)
        dropped += sum(1 for a in rows if a not in contributors)
        if check_means and g.model_id in keys and all(a in rows for a in contributors):
            counted = [rows[a] for a in contributors]
            if not _is_weighted_mean(blobs, g.model_id, counted):
                bad_means += 1
    return {
        "rounds": sorted(models),
        "rounds_completed": sum(1 for r in models if r >= 1),
        "models_lost": len(lost),
        "rounds_double_counted": double,
        "bad_aggregates": bad_means,
        "local_models_dropped": dropped,
        "stale_local_models": stale,
        "orphaned_blobs": len(keys - referenced),
        "missing_blobs": len(referenced - keys),
        "temp_files": len(list(blobs.root.glob("*/*/.tmp-*"))),
        "contributors": {r: list(g.contributors) for r, g in sorted(models.items())},
    }


def _is_weighted_mean(blobs: BlobStore, model_id: str, rows: list[Any]) -> bool:
    got = codec.decode(blobs.get(model_id))
    weights = np.array([m.num_samples for m in rows], dtype=np.float64)
    locals_ = [codec.decode(blobs.get(m.model_id)) for m in rows]
    for name, tensor in got.items():
        total = np.zeros(tensor.shape, np.float64)
        for w, local in zip(weights, locals_, strict=True):
            total += local[name].astype(np.float64) * w
        expected = total / weights.sum()
        if not np.allclose(tensor, expected, rtol=1e-6, atol=1e-6):
            return False
    return True


def blob_sha(path: Path) -> str:
    return blob_id(path.read_bytes())


SURVIVAL_KEYS = (
    "models_lost",
    "rounds_double_counted",
    "bad_aggregates",
    "local_models_dropped",
    "stale_local_models",
    "orphaned_blobs",
    "missing_blobs",
    "temp_files",
)


def violations(report: dict[str, Any]) -> dict[str, int]:
    """The counters of an audit that are not 0 (all must be)."""
    return {k: report[k] for k in SURVIVAL_KEYS if report.get(k)}
