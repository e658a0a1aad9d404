"""Seconds per round and peak memory of `fedloop simulate`, one JSON line per number of agents.

    python bench/simulate.py --agents 100 1000 10000 --rounds 10
    python bench/simulate.py --agents 1000 --engine ray
    python bench/simulate.py --agents 1000 --factory fedloop.ml.noop:NoopEngine --set model_mb=0.01

Every N runs in a fresh process, so its peak RSS is its own: ``driver_peak_rss_mb`` is the
process holding the aggregator (and, with ``--pool thread``, the agents);
``worker_peak_rss_mb`` is the largest worker process (local) or Ray worker. Per-round seconds
are the median, p90 and max over the rounds; start-up (workers, registration of every agent)
is reported apart. The data directory is a fresh temporary one (``--tmp /dev/shm`` puts the
database and blobs in memory, which shows what the disk costs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def one(args: argparse.Namespace, agents: int) -> dict[str, Any]:
    from fedloop.sim import LocalBackend, RayBackend, SimSettings, run
    from fedloop.sim.cli import parse_sets

    root = Path(tempfile.mkdtemp(prefix="fedloop-bench-sim-", dir=args.tmp))
    try:
        settings = SimSettings(
            args.factory,
            num_agents=agents,
            rounds=args.rounds,
            fraction=args.fraction,
            params=parse_sets(args.set),
            data_dir=root / "run",
            evaluate=args.evaluate,
        )
        backend = (
            RayBackend(args.ray_address, args.cpus_per_agent, num_cpus=args.workers)
            if args.engine == "ray"
            else LocalBackend(args.workers, args.pool)
        )
        result = run(settings, backend)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    seconds = sorted(r.seconds for r in result.rounds)
    last = result.rounds[-1]
    return {
        "bench": "simulate",
        "engine": backend.describe(),
        "factory": args.factory,
        "params": settings.params,
        "agents": agents,
        "per_round": settings.per_round,
        "rounds": len(result.rounds),
        "seconds_total": round(result.seconds, 3),
        "setup_seconds": round(result.setup_seconds, 3),
        "seconds_per_round_median": round(statistics.median(seconds), 4),
        "seconds_per_round_p90": round(seconds[int(0.9 * (len(seconds) - 1))], 4),
        "seconds_per_round_max": round(seconds[-1], 4),
        "agents_per_second": round(settings.per_round / statistics.median(seconds), 1),
        "driver_peak_rss_mb": round(result.driver_peak_rss_mb, 1),
        "worker_peak_rss_mb": round(result.worker_peak_rss_mb, 1),
        "global_metrics": last.global_metrics,
        "local_metrics_mean": last.local_metrics_mean,
        "tmp": args.tmp or tempfile.gettempdir(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--factory", default="fedloop.sim.engines:logreg_engine")
    parser.add_argument("--set", action="append", default=[], help="key=value for the factory")
    parser.add_argument("--engine", choices=["local", "ray"], default="local")
    parser.add_argument("--pool", choices=["process", "thread"], default="process")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--cpus-per-agent", type=float, default=1.0)
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tmp", default=None, help="parent of the data directory")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args, args.one)), flush=True)
        return
    for agents in args.agents:
        argv = [a for a in sys.argv[1:]]
        subprocess.run([sys.executable, __file__, *argv, "--one", str(agents)], check=True)


if __name__ == "__main__":
    main()
