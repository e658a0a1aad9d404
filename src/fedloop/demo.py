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
from collections.abc import Callable
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


def wait_until_up(
    url: str,
    process: subprocess.Popen[bytes],
    timeout: float = 60.0,
    verify: bool | ssl.SSLContext = True,
) -> None:
    """Block until the aggregator at `url` answers its health check."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FedloopError(f"the aggregator exited with code {process.returncode} at start")
        try:
            if httpx.get(f"{url}/v1/health", timeout=1.0, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise FedloopError(f"the aggregator at {url} did not come up within {timeout:.0f} s")


def write_config(path: Path, port: int, data_dir: Path, **settings: Any) -> Path:
    """Write an aggregator TOML config (flat keys plus optional [strategy]/[evaluate] tables)."""
    tables = {k: settings.pop(k) for k in ("strategy", "evaluate") if k in settings}
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
    logs.mkdir(exist_ok=True)
    fedloop = [sys.executable, "-m", "fedloop"]
    processes: list[subprocess.Popen[bytes]] = []
    rows: list[dict[str, Any]] = []
    try:
        with open(logs / "aggregator.log", "wb") as log:
            server = subprocess.Popen(
                [*fedloop, "aggregator", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(),
            )
        processes.append(server)
        wait_until_up(url, server)
        for index in range(agents):
            with open(logs / f"agent-{index}.log", "wb") as log:
                processes.append(
                    subprocess.Popen(
                        [
                            *fedloop,
                            "agent",
                            "fedloop.ml.engines:digits_engine",
                            "--url",
                            url,
                            "--name",
                            f"agent-{index}",
                            "--workdir",
                            str(root / f"agent-{index}"),
                            "--set",
                            f"agent_index={index}",
                            "--set",
                            f"num_agents={agents}",
                            "--give-up-after",
                            "30",
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=_env(),
                    )
                )
        echo(f"{'round':>5}  {'global acc':>10}  {'mean local acc':>14}  {'seconds':>7}")
        shown = 0
        deadline = time.monotonic() + timeout
        while shown < rounds:
            if time.monotonic() > deadline:
                raise FedloopError(f"the demo did not finish within {timeout:.0f} s; see {logs}")
            if server.poll() is not None:
                raise FedloopError(f"the aggregator stopped (code {server.returncode}); see {logs}")
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
        for agent in processes[1:]:
            agent.wait(timeout=60)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
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
