"""Peak memory with a large model: how many copies of it the aggregator and an agent hold.

    python bench/large_model.py --model-mb 1024                 # the `fedloop agent` process
    python bench/large_model.py --model-mb 1024 --agent aio     # fedloop.agent.aio.AsyncAgent

Starts a real `python -m fedloop aggregator` (max_model_bytes raised to fit the model) and one
agent process on loopback with `fedloop.ml.noop.NoopEngine` (float32, returns the global model
unchanged), runs ROUNDS rounds (register with the initial model, then per round: download the
global model, upload the local model, aggregate), and prints one JSON line: seconds per round,
each process's peak RSS (VmHWM) and idle RSS (VmRSS before the model exists: the aggregator
once it answers, the agent as a bare `python -c "import fedloop.agent..."`), and
`*_copies` = (peak - idle) / model size, the number of model-sized buffers alive at the worst
moment. The agent's count includes the model its engine holds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from fedloop.demo import free_port, wait_until_up, write_config
from fedloop.store.db import Store, database_url

HERE = Path(__file__).resolve().parent


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def idle_agent_mb(kind: str) -> float:
    module = "fedloop.agent.aio" if kind == "aio" else "fedloop.agent.runner, fedloop.cli"
    code = (
        f"import {module}, fedloop.ml.noop, numpy, httpx\n"
        "from pathlib import Path\n"
        "print([l for l in Path('/proc/self/status').read_text().splitlines()"
        " if l.startswith('VmHWM:')][0].split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    return int(out.stdout.strip()) / 1024


AIO_AGENT = """
import asyncio, sys
from fedloop.agent.aio import AsyncAgent
from fedloop.ml.noop import NoopEngine
agent = AsyncAgent(NoopEngine(model_mb=float(sys.argv[2])), sys.argv[1], "big", timeout=600.0)
print(asyncio.run(agent.run()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-mb", type=float, default=1024.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--agent", choices=["cli", "aio"], default="cli")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()

    model_bytes = int(args.model_mb * 1024 * 1024)
    root = Path(tempfile.mkdtemp(prefix="fedloop-large-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(
        root / "aggregator.toml",
        port,
        root / "data",
        rounds=args.rounds,
        min_agents=1,
        max_model_bytes=max(2 * 1024**3, 2 * model_bytes),
        log_level="warning",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(root / "aggregator.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "fedloop", "aggregator", "--config", str(config)],
            stdout=log,
            stderr=log,
            env=env,
        )
    agent: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    agent_peak = 0.0
    try:
        wait_until_up(url, server)
        server_idle = rss_mb(server.pid, "VmRSS")
        if args.agent == "aio":
            command = [sys.executable, "-c", AIO_AGENT, url, str(args.model_mb)]
        else:
            command = [
                sys.executable, "-m", "fedloop", "agent", "fedloop.ml.noop:NoopEngine",
                "--url", url, "--name", "big", "--workdir", str(root / "agent"),
                "--set", f"model_mb={args.model_mb}",
            ]  # fmt: skip
        with open(root / "agent.log", "wb") as log:
            agent = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        done = threading.Event()

        def watch() -> None:  # VmHWM vanishes with the process: sample it while it lives
            nonlocal agent_peak
            assert agent is not None
            while not done.is_set() and agent.poll() is None:
                try:
                    agent_peak = max(agent_peak, rss_mb(agent.pid, "VmHWM"))
                except (OSError, ValueError):
                    break
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        poller = httpx.Client(timeout=60)  # one client: httpx.get makes a TLS context per call
        while not poller.get(f"{url}/v1/status").json()["finished"]:
            if time.monotonic() - started > args.timeout:
                raise SystemExit(f"timed out; logs in {root}")
            if agent.poll() not in (None, 0):
                raise SystemExit(f"the agent failed; logs in {root}")
            time.sleep(0.2)
        server_peak = rss_mb(server.pid, "VmHWM")
        agent.wait(timeout=300)
        done.set()
        watcher.join()
    finally:
        for process in [agent, server]:
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
    store = Store(database_url(root / "data", None))
    created = [g.created_at for g in store.global_models()]
    store.close()
    shutil.rmtree(root, ignore_errors=True)  # 2 × the model per round; a failed run keeps it
    per_round = [round(b - a, 3) for a, b in itertools.pairwise(created)]
    agent_idle = idle_agent_mb(args.agent)
    model_mb = model_bytes / 1024 / 1024
    print(
        json.dumps(
            {
                "bench": "large_model",
                "model_mb": round(model_mb, 1),
                "agent": args.agent,
                "rounds": args.rounds,
                "seconds_per_round": per_round,
                "aggregator_idle_rss_mb": round(server_idle, 1),
                "aggregator_peak_rss_mb": round(server_peak, 1),
                "aggregator_copies": round((server_peak - server_idle) / model_mb, 2),
                "agent_idle_rss_mb": round(agent_idle, 1),
                "agent_peak_rss_mb": round(agent_peak, 1),
                "agent_copies": round((agent_peak - agent_idle) / model_mb, 2),
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
