"""`fedloop demo`: an aggregator and agents as real processes on loopback, on the digits data."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from fedloop.errors import FedloopError


def free_port() -> int:
    """Return a TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _last_line(log: Path) -> str:
    """Return the last non-empty line of a process's log (its error sentence, when the fedloop
    CLI stopped on one), without an ``error:`` prefix; "" if there is none."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    text = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return text.removeprefix("error:").strip()


def wait_until_up(
    url: str,
    process: subprocess.Popen[bytes],
    timeout: float = 60.0,
    verify: bool | ssl.SSLContext = True,
    log: Path | None = None,
) -> None:
    """Block until the aggregator at `url` answers its health check.

    ``log``: where the process writes its output; if it exits, the error says its last line
    (the reason) and where the rest is.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            reason = _last_line(log) if log is not None else ""
            raise FedloopError(
                f"the aggregator exited with code {process.returncode} at start"
                + (f": {reason}" if reason else "")
                + (f" (its log: {log})" if log is not None else "")
            )
        try:
            if httpx.get(f"{url}/v1/health", timeout=1.0, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise FedloopError(f"the aggregator at {url} did not come up within {timeout:.0f} s")


def write_config(path: Path, port: int, data_dir: Path, **settings: Any) -> Path:
    """Write an aggregator TOML config: flat keys, and a [table] for every dict value."""
    tables = {k: settings.pop(k) for k in list(settings) if isinstance(settings[k], dict)}
    lines = [f"port = {port}", f"data_dir = {json.dumps(str(data_dir))}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    for table, values in tables.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            if isinstance(value, dict):
                inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {inner} }}")
            else:
                lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _env() -> dict[str, str]:
    # Agents share the machine's cores: one thread each keeps them from fighting.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class LocalFederation:
    """An aggregator and agent processes on loopback, each logging to ``logs/NAME.log``.

    Use as a context manager: leaving it terminates (then kills) whatever still runs.
    """

    def __init__(self, config: Path, url: str, logs: Path) -> None:
        self.config = config
        self.url = url
        self.logs = logs
        self.server: subprocess.Popen[bytes] | None = None
        self.agents: list[subprocess.Popen[bytes]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "fedloop", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(),
            )

    def start_aggregator(self) -> subprocess.Popen[bytes]:
        """Start ``fedloop aggregator --config CONFIG`` and wait until it answers."""
        self.server = self._spawn("aggregator", ["aggregator", "--config", str(self.config)])
        wait_until_up(self.url, self.server, log=self.logs / "aggregator.log")
        return self.server

    def start_agent(
        self,
        name: str,
        engine: str,
        workdir: Path,
        sets: dict[str, Any],
        give_up_after: float | None = None,
        extra: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        """Start ``fedloop agent ENGINE`` named `name`, with ``--set key=<json value>`` each
        and the `extra` arguments (``--mode poll``, ``--ca-file F``, …)."""
        args = ["agent", engine, "--url", self.url, "--name", name, "--workdir", str(workdir)]
        if give_up_after is not None:
            args += ["--give-up-after", f"{give_up_after:g}"]
        for key, value in sets.items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        args += extra
        agent = self._spawn(name, args)
        self.agents.append(agent)
        return agent

    def check_server(self) -> None:
        """Raise if the aggregator has stopped."""
        if self.server is not None and self.server.poll() is not None:
            reason = _last_line(self.logs / "aggregator.log")
            raise FedloopError(
                f"the aggregator stopped (code {self.server.returncode})"
                + (f": {reason}" if reason else "")
                + f"; see {self.logs}"
            )

    def wait_agents(self, deadline: float) -> None:
        """Wait (until the monotonic `deadline`) for every agent to exit, and check it succeeded."""
        for agent in self.agents:
            while agent.poll() is None:
                if time.monotonic() > deadline:
                    raise FedloopError(f"the run did not finish in time; see {self.logs}")
                self.check_server()
                time.sleep(0.2)
            if agent.returncode != 0:
                raise FedloopError(f"an agent failed (code {agent.returncode}); see {self.logs}")

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        processes = [p for p in (self.server, *self.agents) if p is not None]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def run_demo(
    directory: Path | None = None,
    rounds: int = 5,
    agents: int = 3,
    echo: Callable[[str], None] = print,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Run the demo and return its summary (rounds, final_accuracy, seconds, per-round rows)."""
    try:
        import sklearn  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise FedloopError(
            f"the demo needs PyTorch and scikit-learn ({exc.name} is missing); run `make demo` "
            "or pip install 'fedloop[torch,sklearn]'"
        ) from exc
    started = time.monotonic()
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="fedloop-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(
        root / "aggregator.toml",
        port,
        root / "aggregator",
        rounds=rounds,
        min_agents=agents,
        aggregation_threshold=1.0,
        evaluate={
            "engine": "fedloop.ml.engines:digits_engine",
            "params": {"agent_index": 0, "num_agents": 1},
        },
    )
    echo(f"fedloop demo: {agents} agents, {rounds} rounds, files in {root}")
    logs = root / "logs"
    rows: list[dict[str, Any]] = []
    with LocalFederation(config, url, logs) as federation:
        federation.start_aggregator()
        for index in range(agents):
            federation.start_agent(
                f"agent-{index}",
                "fedloop.ml.engines:digits_engine",
                root / f"agent-{index}",
                {"agent_index": index, "num_agents": agents},
                give_up_after=30,
            )
        echo(f"{'round':>5}  {'global acc':>10}  {'mean local acc':>14}  {'seconds':>7}")
        shown = 0
        deadline = time.monotonic() + timeout
        while shown < rounds:
            if time.monotonic() > deadline:
                raise FedloopError(f"the demo did not finish within {timeout:.0f} s; see {logs}")
            federation.check_server()
            history = httpx.get(f"{url}/v1/history", timeout=10).json()["rounds"]
            for row in history:
                if row["round"] > shown:
                    shown = row["round"]
                    rows.append(row)
                    echo(
                        f"{row['round']:>5}"
                        f"  {row['global_metrics'].get('accuracy', float('nan')):>10.4f}"
                        f"  {row['local_metrics_mean'].get('accuracy', float('nan')):>14.4f}"
                        f"  {row['seconds']:>7.2f}"
                    )
            time.sleep(0.1)
        federation.wait_agents(time.monotonic() + 60)
    seconds = time.monotonic() - started
    final = rows[-1]["global_metrics"].get("accuracy") if rows else None
    echo(
        f"done in {seconds:.1f} s; final global test accuracy {final:.4f}; "
        f"`fedloop history --data-dir {root / 'aggregator'}` shows the records"
    )
    return {
        "rounds": len(rows),
        "final_accuracy": final,
        "seconds": round(seconds, 2),
        "agents": agents,
        "directory": str(root),
        "per_round": [
            {
                "round": r["round"],
                "global_accuracy": r["global_metrics"].get("accuracy"),
                "mean_local_accuracy": r["local_metrics_mean"].get("accuracy"),
                "seconds": r["seconds"],
            }
            for r in rows
        ],
    }
