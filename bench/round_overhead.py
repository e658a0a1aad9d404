"""Seconds per round spent by fedloop itself: real processes, no-op training.

    python bench/round_overhead.py --agents 3 --model-mb 4 --rounds 20

Starts a real aggregator and N real agent processes on loopback whose `train` returns the
global model unchanged, so every second measured is protocol, storage and scheduling. Prints one
JSON line: per-round seconds (median, p90, max; the first round, which includes start-up and
registration, is left out), the aggregator's peak RSS (VmHWM) and its CPU seconds (user +
system) per round after round 1, which a shared machine's load disturbs less than wall time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from fedloop.demo import LocalFederation, free_port, write_config
from fedloop.store.db import Store, database_url


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (less sensitive to load than wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--model-mb", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--mode", choices=["push", "poll"], default="push")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="fedloop-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rounds = args.rounds + 1
    config = write_config(
        root / "aggregator.toml",
        port,
        root / "data",
        rounds=rounds,
        min_agents=args.agents,
        log_level="warning",
    )
    started = time.monotonic()
    with LocalFederation(config, url, root) as federation:
        server = federation.start_aggregator()
        for i in range(args.agents):
            federation.start_agent(
                f"b{i}",
                "fedloop.ml.noop:NoopEngine",
                root / f"b{i}",
                {"model_mb": args.model_mb},
                extra=["--mode", args.mode],
            )
        cpu_from: tuple[int, float] | None = None  # (global round, aggregator CPU s) then
        # One client for all polls: httpx.get builds a TLS context per call (≈ 10 ms of CPU),
        # which at 10 polls/s took CPU from the processes being measured.
        with httpx.Client(timeout=30) as poller:
            while not (status := poller.get(f"{url}/v1/status").json())["finished"]:
                if time.monotonic() - started > 600:
                    raise SystemExit(f"timed out; logs in {root}")
                if cpu_from is None and status["global_round"] >= 1:  # start-up left out
                    cpu_from = (status["global_round"], cpu_seconds(server.pid))
                time.sleep(0.25)
        peak = peak_rss_mb(server.pid)
        cpu_per_round = float("nan")
        if cpu_from is not None and status["global_round"] > cpu_from[0]:
            cpu_per_round = (cpu_seconds(server.pid) - cpu_from[1]) / (
                status["global_round"] - cpu_from[0]
            )
        federation.wait_agents(time.monotonic() + 60)
    store = Store(database_url(root / "data", None))
    created = [g.created_at for g in store.global_models()]
    store.close()
    # Round 1 includes start-up and registration: time rounds 2.. only.
    per_round = sorted(b - a for a, b in itertools.pairwise(created[1:]))
    print(
        json.dumps(
            {
                "bench": "round_overhead",
                "agents": args.agents,
                "model_mb": args.model_mb,
                "mode": args.mode,
                "rounds_timed": len(per_round),
                "seconds_per_round_median": round(statistics.median(per_round), 4),
                "seconds_per_round_p90": round(per_round[int(0.9 * (len(per_round) - 1))], 4),
                "seconds_per_round_max": round(per_round[-1], 4),
                "aggregator_peak_rss_mb": round(peak, 1),
                "aggregator_cpu_s_per_round": round(cpu_per_round, 4),
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
