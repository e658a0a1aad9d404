"""Seconds per round with many agents: asyncio agents spread over a few processes, one aggregator.

    python bench/many_agents.py --agents 500 --processes 4 --model-kb 64 --rounds 5

Starts a real `python -m fedloop aggregator` (SQLite + blob store in a temp dir) on loopback and
PROCESSES worker processes, each running its share of AGENTS `fedloop.agent.aio.AsyncAgent`s in
one event loop (each agent with its own HTTP client and, in push mode, its own WebSocket), whose
engine is `fedloop.ml.noop.NoopEngine` (returns the global model unchanged). Every round needs
every agent's upload. Prints one JSON line: seconds per round (median, p90, max over rounds
2..R+1 from the store's global-model timestamps; round 1 includes start-up and registration),
the first round's seconds, the aggregator's peak RSS (VmHWM) and the agent processes' peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from fedloop.demo import free_port, wait_until_up, write_config
from fedloop.store.db import Store, database_url


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> None:
    """One process: args.count asyncio agents named a{first}..; prints its own JSON line."""
    from fedloop.agent.aio import AsyncAgent, run_agents
    from fedloop.ml.noop import NoopEngine

    engine = NoopEngine(model_mb=args.model_kb / 1024)

    async def main() -> list[int]:
        agents = [
            AsyncAgent(
                engine,
                args.url,
                f"a{args.first + i:05d}",
                mode=args.mode,
                poll_wait=30.0,
                timeout=300.0,
                give_up_after=120.0,
            )
            for i in range(args.count)
        ]
        return [r.rounds_trained for r in await run_agents(agents)]

    trained = asyncio.run(main())
    print(json.dumps({"pid": os.getpid(), "rounds": trained, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--model-kb", type=float, default=64.0)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one more is run)")
    parser.add_argument("--mode", choices=["push", "poll"], default="push")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after (s)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    root = Path(tempfile.mkdtemp(prefix="fedloop-many-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(
        root / "aggregator.toml",
        port,
        root / "data",
        rounds=args.rounds + 1,
        min_agents=args.agents,
        log_level="warning",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fedloop"]
    with open(root / "aggregator.log", "wb") as log:
        server = subprocess.Popen(
            [*cmd, "aggregator", "--config", str(config)], stdout=log, stderr=log, env=env
        )
    workers: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    share = [args.agents // args.processes + (i < args.agents % args.processes)
             for i in range(args.processes)]  # fmt: skip
    try:
        wait_until_up(url, server)
        first = 0
        for i, count in enumerate(share):
            if not count:
                continue
            command = [
                sys.executable, __file__, "--worker", "--url", url, "--first", str(first),
                "--count", str(count), "--model-kb", str(args.model_kb), "--mode", args.mode,
            ]  # fmt: skip
            with open(root / f"worker{i}.log", "wb") as log:
                workers.append(
                    subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env)
                )
            first += count
        poller = httpx.Client(timeout=60)  # one client: httpx.get makes a TLS context per call
        while not poller.get(f"{url}/v1/status").json()["finished"]:
            if time.monotonic() - started > args.timeout:
                raise SystemExit(f"timed out; logs in {root}")
            if any(w.poll() not in (None, 0) for w in workers):
                raise SystemExit(f"an agent process failed; logs in {root}")
            time.sleep(0.2)
        server_peak = peak_rss_mb(server.pid)
        reports = []
        for process in workers:
            out, _ = process.communicate(timeout=120)
            reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for process in [*workers, server]:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
    store = Store(database_url(root / "data", None))
    globals_ = store.global_models()
    store.close()
    created = [g.created_at for g in globals_]
    per_round = sorted(b - a for a, b in itertools.pairwise(created[1:]))
    trained = [n for report in reports for n in report["rounds"]]
    print(
        json.dumps(
            {
                "bench": "many_agents",
                "agents": args.agents,
                "processes": args.processes,
                "model_kb": args.model_kb,
                "mode": args.mode,
                "rounds_timed": len(per_round),
                "seconds_per_round_median": round(statistics.median(per_round), 4),
                "seconds_per_round_p90": round(per_round[int(0.9 * (len(per_round) - 1))], 4),
                "seconds_per_round_max": round(per_round[-1], 4),
                "first_round_s": round(created[1] - created[0], 3) if len(created) > 1 else None,
                "contributors_last_round": len(globals_[-1].contributors),
                "agents_all_rounds": sum(n == args.rounds + 1 for n in trained),
                "aggregator_peak_rss_mb": round(server_peak, 1),
                "agent_process_peak_rss_mb": max(r["peak_rss_mb"] for r in reports),
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
