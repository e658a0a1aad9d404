"""Seconds secure aggregation adds to summing N agents' models, against plain summation.

    python bench/secagg.py --agents 10 --params 1000000 --threshold 6 --drop 0

Runs the four rounds of fedloop.privacy.secagg in one process over N clients holding float32
vectors of the given length (1M float32 = a 4 MB model) and prints one JSON line: seconds for
plain summation, per client (key shares, masking: encode + PRG masks), for the server
(unmasking: recovering seeds and removing masks, decoding), and the total over all parties run
one after another (every client's work plus the server's). With --drop, that many clients
vanish after sharing keys, so the server also rebuilds their pairwise masks.

    python bench/secagg.py --deploy --agents 10 --model-mb 4 --rounds 5

With --deploy, a real aggregator and N `fedloop agent` processes (fedloop.ml.noop:NoopEngine,
no training) run rounds over loopback HTTP, once with plain uploads and once with `[secagg]`
enabled, and the JSON line gives seconds per round for each (median over the rounds after the
first, which includes start-up and registration).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedloop.privacy.secagg import SecAggClient, SecAggConfig, SecAggServer


def deploy_round_seconds(agents: int, model_mb: float, rounds: int, secure: bool) -> list[float]:
    """Return the seconds of rounds 2.. of a real deployment on loopback (see the docstring)."""
    import httpx

    from fedloop.demo import LocalFederation, free_port, write_config
    from fedloop.store.db import Store, database_url

    root = Path(tempfile.mkdtemp(prefix="fedloop-bench-secagg-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings: dict[str, Any] = {"rounds": rounds + 1, "min_agents": agents, "log_level": "warning"}
    if secure:
        settings["secagg"] = {"enabled": True}
    config = write_config(root / "aggregator.toml", port, root / "data", **settings)
    started = time.monotonic()
    with LocalFederation(config, url, root) as federation:
        federation.start_aggregator()
        for i in range(agents):
            sets = {"model_mb": model_mb}
            federation.start_agent(f"b{i}", "fedloop.ml.noop:NoopEngine", root / f"b{i}", sets)
        # One client for all polls (httpx.get would build a TLS context, ≈ 10 ms CPU, per poll).
        with httpx.Client(timeout=30) as poller:
            while not poller.get(f"{url}/v1/status").json()["finished"]:
                if time.monotonic() - started > 900:
                    raise SystemExit(f"timed out; logs in {root}")
                time.sleep(0.25)
        federation.wait_agents(time.monotonic() + 60)
    store = Store(database_url(root / "data", None))
    created = [g.created_at for g in store.global_models()]
    store.close()
    return [b - a for a, b in itertools.pairwise(created[1:])]


def deploy(args: argparse.Namespace) -> None:
    plain = deploy_round_seconds(args.agents, args.model_mb, args.rounds, secure=False)
    secure = deploy_round_seconds(args.agents, args.model_mb, args.rounds, secure=True)
    plain_s, secure_s = statistics.median(plain), statistics.median(secure)
    print(
        json.dumps(
            {
                "bench": "secagg_deploy",
                "agents": args.agents,
                "model_mb": args.model_mb,
                "rounds_timed": len(secure),
                "plain_seconds_per_round": round(plain_s, 3),
                "secagg_seconds_per_round": round(secure_s, 3),
                "secagg_seconds_per_round_max": round(max(secure), 3),
                "overhead_x": round(secure_s / plain_s, 1),
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--threshold", type=int, default=0, help="default: n // 2 + 1")
    parser.add_argument("--drop", type=int, default=0, help="clients lost before masking")
    parser.add_argument("--num-bits", type=int, default=32)
    parser.add_argument("--frac-bits", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--deploy", action="store_true", help="real processes over loopback")
    parser.add_argument("--model-mb", type=float, default=4.0, help="--deploy: model size")
    parser.add_argument("--rounds", type=int, default=5, help="--deploy: rounds timed")
    args = parser.parse_args()
    if args.deploy:
        deploy(args)
        return
    n, d = args.agents, args.params
    threshold = args.threshold or n // 2 + 1
    rng = np.random.default_rng(0)
    inputs = {u: rng.normal(scale=0.1, size=d).astype(np.float32) for u in range(1, n + 1)}

    plain_runs, share_runs, mask_runs, server_runs, total_runs = [], [], [], [], []
    error = 0.0
    for repeat in range(args.repeat):
        start = time.perf_counter()
        total = np.zeros(d, dtype=np.float64)
        for vector in inputs.values():
            total += vector
        plain_runs.append(time.perf_counter() - start)

        config = SecAggConfig(threshold, d, args.num_bits, args.frac_bits, str(repeat).encode())
        clients = {u: SecAggClient(u, config) for u in inputs}
        server = SecAggServer(config)
        share_time = mask_time = server_time = 0.0
        t = time.perf_counter()
        for client in clients.values():
            server.receive_keys(client.advertise_keys())
        keys = server.key_list()
        server_time += time.perf_counter() - t
        for client in clients.values():
            t = time.perf_counter()
            message = client.share_keys(keys)
            share_time += time.perf_counter() - t
            server.receive_shares(message)
        dropped = set(list(inputs)[: args.drop])
        for u, client in clients.items():
            if u in dropped:
                continue
            relayed = server.shares_for(u)
            t = time.perf_counter()
            masked = client.masked_input(inputs[u], relayed)
            mask_time += time.perf_counter() - t
            server.receive_masked_input(masked)
        survivors = server.survivors()
        replies = [clients[u].unmask(survivors) for u in survivors]
        t = time.perf_counter()
        for reply in replies:
            server.receive_unmask(reply)
        result = server.result()
        server_time += time.perf_counter() - t
        expected = np.sum([inputs[u].astype(np.float64) for u in survivors], axis=0)
        error = max(error, float(np.max(np.abs(result - expected))))
        share_runs.append(share_time / n)
        mask_runs.append(mask_time / len(survivors))
        server_runs.append(server_time)
        total_runs.append(share_time + mask_time + server_time)

    plain = statistics.median(plain_runs)
    server_s = statistics.median(server_runs)
    total_s = statistics.median(total_runs)
    print(
        json.dumps(
            {
                "bench": "secagg",
                "agents": n,
                "params": d,
                "model_mb": d * 4 / 1e6,
                "threshold": threshold,
                "dropped": args.drop,
                "num_bits": args.num_bits,
                "plain_sum_s": round(plain, 4),
                "client_share_keys_s": round(statistics.median(share_runs), 4),
                "client_masking_s": round(statistics.median(mask_runs), 4),
                "server_unmasking_s": round(server_s, 4),
                "total_s": round(total_s, 4),
                "overhead_x": round(total_s / plain, 1),
                "max_abs_error": error,
                "quantisation_step": 2.0**-args.frac_bits,
                "masked_upload_mb": d * args.num_bits / 8 / 1e6,
                "repeat": args.repeat,
                "python": platform.python_version(),
                "cpu": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
