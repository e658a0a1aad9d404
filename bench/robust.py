"""Byzantine robustness: final test accuracy of each aggregation method with 2 of 10 agents lying.

    python bench/robust.py                      # digits, 10 agents, 2 Byzantine, 10 rounds
    python bench/robust.py --quick              # 5 rounds, 2 local epochs: a smoke run
    python bench/robust.py --data-dir DIR       # MNIST from the IDX files in DIR

In-process: each round every agent's engine trains on the global model (`engine.train`) and
the strategy aggregates the results (`strategy.aggregate`): the same strategy code the
aggregator runs, without the network and the store. Uploads with non-finite values are
dropped, as the aggregator refuses them; a round whose uploads are all dropped or whose
aggregate is not finite ends the run (the aggregator would keep that round open) and is
reported as `diverged_at_round`, with the last finite global model's accuracy as final.
The Byzantine agents (agents 0 and 1) send
`sign_flip`: x - 5 (y - x), their honest update delta reversed and scaled by 5, or `gaussian`:
x + N(0, 10^2) per coordinate (their training result is not used). `clean` is FedAvg with all
10 agents honest, the reference. Prints one JSON line per (attack, method).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from fedloop.strategies import Update, load
from fedloop.types import Weights

METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "median": {},
    "trimmed_mean": {"beta": 0.2},  # trims 2 of 10 at each end: as many as there are liars
    "krum": {"f": 2},
    "multikrum": {"f": 2},
    "bulyan": {"f": 1},  # n >= 4f + 3: 10 agents allow f = 1 at most
    "geometric_median": {},
}
ATTACKS = ("sign_flip", "gaussian")


def make_engines(args: argparse.Namespace) -> list[Any]:
    from fedloop.ml.engines import digits_engine, mnist_engine

    kw: dict[str, Any] = {"epochs": args.epochs, "seed": args.seed}
    if args.data_dir:
        return [mnist_engine(args.data_dir, i, args.agents, **kw) for i in range(args.agents)]
    return [digits_engine(i, args.agents, **kw) for i in range(args.agents)]


def attack(kind: str, global_weights: Weights, local: Weights, rng: np.random.Generator) -> Weights:
    """Return what a Byzantine agent sends instead of its trained weights `local`."""
    out: Weights = {}
    for key, x in global_weights.items():
        x64 = x.astype(np.float64)
        if kind == "sign_flip":
            value = x64 - 5.0 * (local[key].astype(np.float64) - x64)
        elif kind == "gaussian":
            value = x64 + rng.normal(0.0, 10.0, size=x.shape)
        else:
            raise ValueError(kind)
        out[key] = value.astype(x.dtype)
    return out


def finite(weights: Weights) -> bool:
    return all(np.isfinite(v).all() for v in weights.values())


def run(
    engines: list[Any],
    initial: Weights,
    method: str,
    params: dict[str, Any],
    attack_kind: str | None,
    byzantine: int,
    rounds: int,
    seed: int,
    evaluate: Callable[[Weights], dict[str, float]],
) -> dict[str, Any]:
    strategy = load(method, **params)
    rng = np.random.default_rng(seed)
    global_weights = {k: v.copy() for k, v in initial.items()}
    accuracy: list[float] = []
    dropped = 0
    diverged: int | None = None
    for r in range(1, rounds + 1):
        updates = []
        for i, engine in enumerate(engines):
            liar = attack_kind is not None and i < byzantine
            if liar and attack_kind == "gaussian":
                weights, n = (
                    attack("gaussian", global_weights, global_weights, rng),
                    engine.num_samples,
                )
            else:
                weights, n, _ = engine.train(global_weights, {"round": r})
                if liar:
                    assert attack_kind is not None
                    weights = attack(attack_kind, global_weights, weights, rng)
            if not finite(weights):
                dropped += 1  # the aggregator answers 422 to non-finite values
                continue
            updates.append(Update(weights, int(n), f"agent-{i:02d}", r - 1))
        new = strategy.aggregate(global_weights, updates, server_round=r) if updates else None
        if new is None or not finite(new):
            # The aggregator would refuse this global model and the run would stall here.
            diverged = r
            break
        global_weights = new
        accuracy.append(round(evaluate(global_weights).get("accuracy", float("nan")), 4))
    final = accuracy[-1] if accuracy else evaluate(initial)["accuracy"]
    return {
        "final_accuracy": final,
        "accuracy_per_round": accuracy,
        "dropped": dropped,
        "diverged_at_round": diverged,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--byzantine", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3, help="local epochs per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (default: digits)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--quick", action="store_true", help="5 rounds, 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.epochs = min(args.rounds, 5), 2

    engines = make_engines(args)
    initial = engines[0].initial_weights()
    dataset = "mnist" if args.data_dir else "digits"
    common = {
        "bench": "robust",
        "dataset": dataset,
        "agents": args.agents,
        "rounds": args.rounds,
        "local_epochs": args.epochs,
        "mode": "in-process: engine.train + fedloop.strategies aggregate (no network)",
    }
    plan: list[tuple[str, str, int]] = [("clean", "fedavg", 0)]
    for kind in args.attacks.split(","):
        plan += [(kind, method, args.byzantine) for method in args.methods.split(",")]
    for kind, method, byzantine in plan:
        started = time.perf_counter()
        result = run(
            engines,
            initial,
            method,
            METHODS[method],
            None if kind == "clean" else kind,
            byzantine,
            args.rounds,
            args.seed,
            lambda w: engines[0].evaluate(w, {}),
        )
        line = {
            **common,
            "attack": kind,
            "byzantine": byzantine,
            "method": method,
            "params": METHODS[method],
            **result,
            "seconds": round(time.perf_counter() - started, 2),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
