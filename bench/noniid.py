"""Label-skewed data: test accuracy per round of FedAvg, FedProx, SCAFFOLD, FedAdam and FedYogi.

    python bench/noniid.py                      # digits, Dirichlet alpha=0.1 over 10 agents
    python bench/noniid.py --quick              # 5 rounds, 2 local epochs: a smoke run
    python bench/noniid.py --data-dir DIR       # MNIST from the IDX files in DIR

In-process: each round every agent's engine trains on the global model and the strategy
aggregates (`strategy.aggregate`), the same strategy code the aggregator runs, without the
network and the store. Each agent gets the strategy's `round_config(round)` in its training
config, as the aggregator sends it: FedProx's `proximal_mu` reaches the engine that way.
SCAFFOLD needs a correction inside the agent's training loop, which `TorchClassifier` does not
have, so this script trains SCAFFOLD agents with its own loop over the same model, data, batch
order and SGD settings, correcting gradients with `fedloop.ml.torch.scaffold_correction` and
updating controls with `scaffold_update_control` (Option II). The engines use SGD with momentum
0.9, so Option II's K*lr is taken as K*lr/(1 - momentum), heavy-ball SGD's effective step.
Prints one JSON line per method.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
from torch import nn

from fedloop.ml.torch import (
    load_weights,
    scaffold_correction,
    scaffold_update_control,
    tensors_like,
    to_weights,
)
from fedloop.strategies import Strategy, Update, load
from fedloop.strategies.scaffold import CONTROL_PREFIX, DELTA_PREFIX
from fedloop.types import Weights

METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedprox": {"mu": 0.1},
    "scaffold": {},
    "fedadam": {"eta": 0.03},
    "fedyogi": {"eta": 0.03},
}


def make_engines(args: argparse.Namespace) -> list[Any]:
    from fedloop.ml.engines import digits_engine, mnist_engine

    kw: dict[str, Any] = {
        "epochs": args.epochs,
        "seed": args.seed,
        "split": "dirichlet",
        "alpha": args.alpha,
    }
    if args.data_dir:
        return [mnist_engine(args.data_dir, i, args.agents, **kw) for i in range(args.agents)]
    return [digits_engine(i, args.agents, **kw) for i in range(args.agents)]


def scaffold_train(
    engine: Any, weights: Weights, c_global: Weights, c_local: Weights, round_: int
) -> tuple[Weights, int, Weights, Weights]:
    """Return (y_i, n_i, c_i+, c_i+ - c_i): TorchClassifier's loop with SCAFFOLD's correction."""
    model: nn.Module = engine.model
    load_weights(model, weights)
    c = tensors_like(model, c_global)
    ci = tensors_like(model, c_local)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=engine.lr, momentum=engine.momentum, weight_decay=engine.weight_decay
    )
    rng = np.random.default_rng([engine.seed, round_])
    n = len(engine._y)
    steps = 0
    model.train()
    for _ in range(engine.epochs):
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, engine.batch_size):
            idx = order[start : start + engine.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(engine._x[idx]), engine._y[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            scaffold_correction(model, c, ci)
            optimizer.step()
            steps += 1
    local = to_weights(model)
    effective_lr = engine.lr / (1.0 - engine.momentum)
    new_c, delta_c = scaffold_update_control(
        c_local, c_global, weights, local, max(steps, 1), effective_lr
    )
    return local, n, new_c, delta_c


def run(engines: list[Any], initial: Weights, method: str, rounds: int) -> dict[str, Any]:
    strategy: Strategy = load(method, **METHODS[method])
    global_weights = {k: v.copy() for k, v in initial.items()}
    zeros = {k: np.zeros_like(v) for k, v in initial.items()}
    c_locals = [dict(zeros) for _ in engines]
    accuracy: list[float] = []
    for r in range(1, rounds + 1):
        config = {**strategy.round_config(r), "round": r}
        updates = []
        for i, engine in enumerate(engines):
            if method == "scaffold":
                state = strategy.state()
                c_global = {
                    k: state.get(CONTROL_PREFIX + k, zeros[k]).astype(zeros[k].dtype) for k in zeros
                }
                weights, n, c_locals[i], delta = scaffold_train(
                    engine, global_weights, c_global, c_locals[i], r
                )
                extras = {DELTA_PREFIX + k: v for k, v in delta.items()}
                updates.append(Update(weights, n, f"agent-{i:02d}", r - 1, extras=extras))
            else:
                weights, n, _ = engine.train(global_weights, config)
                updates.append(Update(weights, int(n), f"agent-{i:02d}", r - 1))
        global_weights = strategy.aggregate(global_weights, updates, server_round=r)
        accuracy.append(round(engines[0].evaluate(global_weights, {})["accuracy"], 4))
    return {"final_accuracy": accuracy[-1], "accuracy_per_round": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3, help="local epochs per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (default: digits)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quick", action="store_true", help="5 rounds, 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.epochs = min(args.rounds, 5), 2

    engines = make_engines(args)
    initial = engines[0].initial_weights()
    sizes = [engine.num_samples for engine in engines]
    for method in args.methods.split(","):
        started = time.perf_counter()
        result = run(engines, initial, method, args.rounds)
        line = {
            "bench": "noniid",
            "dataset": "mnist" if args.data_dir else "digits",
            "split": f"dirichlet(alpha={args.alpha})",
            "agents": args.agents,
            "samples_per_agent": sizes,
            "rounds": args.rounds,
            "local_epochs": args.epochs,
            "mode": "in-process: engine.train + fedloop.strategies aggregate (no network)",
            "method": method,
            "params": METHODS[method],
            **result,
            "seconds": round(time.perf_counter() - started, 2),
        }
        if method == "scaffold":
            line["note"] = (
                "agent-side SCAFFOLD correction done by this script's training loop "
                "(TorchClassifier has none); Option II with effective lr = lr/(1-momentum)"
            )
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
