"""The book's image-classification example: a real federated run on loopback, then its report.

An aggregator and ``--agents`` agent processes (``python -m fedloop aggregator`` / ``agent``)
train the book's ``Net`` CNN with FedAvg: on scikit-learn's 8x8 digits by default, on MNIST
when ``--data-dir`` holds its four IDX .gz files. Each agent trains on its share of the
training set (``--split iid|dirichlet|shards``) and every agent and the aggregator evaluate on
the common test set. At the end it writes ``fedloop report`` into ``OUT/report``.

    python examples/image_classification/run.py                       # digits, 3 agents, 5 rounds
    python examples/image_classification/run.py --split shards --rounds 10
    python examples/image_classification/run.py --data-dir ../shared/data/mnist --epochs 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedloop.demo import LocalFederation, free_port, write_config
from fedloop.errors import FedloopError
from fedloop.history import history_rows
from fedloop.report import open_records, write_report
from fedloop.store.db import Store, database_url


def engine_and_params(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Return the engine (module:object) and the factory arguments every agent shares."""
    params: dict[str, Any] = {"split": args.split, "alpha": args.alpha, "seed": args.seed}
    if args.epochs is not None:
        params["epochs"] = args.epochs
    if args.lr is not None:
        params["lr"] = args.lr
    if args.data_dir is None:
        return "fedloop.ml.engines:digits_engine", params
    params["data_dir"] = str(Path(args.data_dir).resolve())
    params["model"] = args.model
    return "fedloop.ml.engines:mnist_engine", params


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the federation, write the report, and return a summary."""
    root = Path(args.out or tempfile.mkdtemp(prefix="fedloop-image-"))
    root.mkdir(parents=True, exist_ok=True)
    engine, params = engine_and_params(args)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = root / "aggregator"
    # The aggregator measures every global model on the whole common test set: an evaluation
    # engine for "agent 0 of 1" has that test set.
    evaluate_params = {k: v for k, v in params.items() if k in ("data_dir", "model", "seed")}
    config = write_config(
        root / "aggregator.toml",
        port,
        data_dir,
        rounds=args.rounds,
        min_agents=args.agents,
        aggregation_threshold=1.0,
        strategy={"name": args.strategy},
        evaluate={
            "engine": engine,
            "params": {**evaluate_params, "agent_index": 0, "num_agents": 1},
        },
    )
    print(f"{args.agents} agents, {args.rounds} rounds, {engine} ({args.split}); files in {root}")
    started = time.monotonic()
    with LocalFederation(config, url, root / "logs") as federation:
        federation.start_aggregator()
        for index in range(args.agents):
            sets = {**params, "agent_index": index, "num_agents": args.agents}
            federation.start_agent(
                f"agent-{index}", engine, root / f"agent-{index}", sets, give_up_after=60
            )
        federation.wait_agents(time.monotonic() + args.timeout)
    seconds = time.monotonic() - started
    store = Store(database_url(data_dir, None))
    try:
        rows = history_rows(store)
    finally:
        store.close()
    print(f"{'round':>5}  {'global acc':>10}  {'mean local acc':>14}  {'seconds':>7}")
    for row in rows:
        print(
            f"{row['round']:>5}  {row['global_metrics'].get('accuracy', float('nan')):>10.4f}"
            f"  {row['local_metrics_mean'].get('accuracy', float('nan')):>14.4f}"
            f"  {row['seconds']:>7.2f}"
        )
    files = write_report(open_records(data_dir), root / "report", source=str(data_dir))
    print(f"report: {files.html}")
    final = rows[-1]["global_metrics"].get("accuracy") if rows else None
    return {
        "rounds": rows[-1]["round"] if rows else 0,
        "final_accuracy": final,
        "seconds": round(seconds, 2),
        "report": str(files.html),
        "directory": str(root),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--split", choices=["iid", "dirichlet", "shards"], default="iid")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration.")
    parser.add_argument("--data-dir", help="Directory with MNIST's four IDX .gz files.")
    parser.add_argument("--model", choices=["net", "cnn"], default="net", help="MNIST model.")
    parser.add_argument("--epochs", type=int, help="Local epochs per round (engine default 5).")
    parser.add_argument("--lr", type=float, help="Local learning rate (engine default 0.05).")
    parser.add_argument("--strategy", default="fedavg", help="fedavg, fedprox, fedadam, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="Directory for the run's files (default: a new temp dir).")
    parser.add_argument("--timeout", type=float, default=1800.0, help="Seconds before giving up.")
    parser.add_argument("--json", action="store_true", help="Print a JSON summary last.")
    args = parser.parse_args(argv)
    try:
        summary = run(args)
    except FedloopError as exc:
        sys.exit(f"error: {exc}")
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
