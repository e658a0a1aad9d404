"""Seconds per round spent by fedloop itself: real processes, no-op training.

    python bench/round_overhead.py --agents 3 --model-mb 4 --rounds 20
    python bench/round_overhead.py --agents 2 --model-mb 100 --rounds 10 --distinct

Starts a real aggregator and N real agent processes on loopback whose `train` returns the
global model unchanged, so every second measured is protocol, storage and scheduling. Prints one
JSON line: per-round seconds (median, p90, max; the first round, which includes start-up and
registration, is left out), the aggregator's peak RSS (VmHWM), the CPU seconds (user + system)
per round after round 1 of the aggregator and of the agents (mean), which a shared machine's
load disturbs less than wall time, and the aggregation's mean time (the aggregator's
`fedloop_aggregation_duration_seconds`). `--distinct`: every local model differs
(`NoopEngine(vary=True)`), so the aggregator stores each one; identical models are stored once.
The run's directory is deleted at the end (a 100 MB `--distinct` run writes ≈ 300 MB a round)
unless `--keep`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
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
    parser.add_argument("--distinct", action="store_true", help="every local model differs")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
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
                {"model_mb": args.model_mb, **({"vary": 1} if args.distinct else {})},
                extra=["--mode", args.mode],
            )
        pids = [server.pid, *(agent.pid for agent in federation.agents)]
        # (global round, CPU s of each process): the first after round 1 (start-up left out),
        # and the last taken while every process was still running.
        first: tuple[int, list[float]] | None = None
        last: tuple[int, list[float]] | None = None
        # One client for all polls: httpx.get builds a TLS context per call (≈ 10 ms of CPU),
        # which at 10 polls/s took CPU from the processes being measured.
        with httpx.Client(timeout=30) as poller:
            while not (status := poller.get(f"{url}/v1/status").json())["finished"]:
                if time.monotonic() - started > 600:
                    raise SystemExit(f"timed out; logs in {root}")
                if status["global_round"] >= 1:
                    try:
                        sample = (status["global_round"], [cpu_seconds(pid) for pid in pids])
                    except OSError:  # an agent has exited: the run is ending
                        sample = None
                    if sample is not None:
                        first, last = first or sample, sample
                time.sleep(0.25)
            aggregation = poller.get(f"{url}/metrics").text
        peak = peak_rss_mb(server.pid)
        cpu_per_round = [float("nan")] * len(pids)
        if first is not None and last is not None and last[0] > first[0]:
            rounds = last[0] - first[0]
            cpu_per_round = [(b - a) / rounds for a, b in zip(first[1], last[1], strict=True)]
        federation.wait_agents(time.monotonic() + 60)
    store = Store(database_url(root / "data", None))
    created = [g.created_at for g in store.global_models()]
    store.close()
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    sums = {
        line.split()[0]: float(line.split()[1])
        for line in aggregation.splitlines()
        if line.startswith("fedloop_aggregation_duration_seconds_")
    }
    count = sums.get("fedloop_aggregation_duration_seconds_count", 0.0)
    aggregation_ms = (
        1000 * sums["fedloop_aggregation_duration_seconds_sum"] / count if count else float("nan")
    )
    # Round 1 includes start-up and registration: time rounds 2.. only.
    per_round = sorted(b - a for a, b in itertools.pairwise(created[1:]))
    print(
        json.dumps(
            {
                "bench": "round_overhead",
                "agents": args.agents,
                "model_mb": args.model_mb,
                "mode": args.mode,
                "distinct": args.distinct,
                "rounds_timed": len(per_round),
                "seconds_per_round_median": round(statistics.median(per_round), 4),
                "seconds_per_round_p90": round(per_round[int(0.9 * (len(per_round) - 1))], 4),
                "seconds_per_round_max": round(per_round[-1], 4),
                "aggregator_peak_rss_mb": round(peak, 1),
                "aggregator_cpu_s_per_round": round(cpu_per_round[0], 4),
                "agent_cpu_s_per_round": round(statistics.mean(cpu_per_round[1:]), 4),
                "aggregation_ms": round(aggregation_ms, 3),
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
