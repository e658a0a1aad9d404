"""The ServerApp of bench/vs_flower.py --flower-runtime deployment: FedAvg over every node
each round, no evaluation, the time stamped at the end of each `aggregate_train` (when a
round's global model exists), written with this process's VmHWM to the run config's `out`."""

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


def initial_weights(model_mb: float, tensors: int = 4, seed: int = 0) -> list[np.ndarray]:
    """The same arrays as fedloop.ml.noop.NoopEngine.initial_weights: a copy of
    flower_bench.initial_weights, because a Flower App ships only its own folder."""
    total = max(tensors, int(model_mb * 1024 * 1024 / 4))
    sizes = [total // tensors] * tensors
    sizes[-1] += total - sum(sizes)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n, dtype=np.float32) for n in sizes]


class TimedFedAvg(FedAvg):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stamps: list[float] = []

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        out = super().aggregate_train(server_round, replies)
        self.stamps.append(time.time())
        return out


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    nodes = int(config["agents"])
    started = time.time()
    strategy = TimedFedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=nodes,
        min_evaluate_nodes=0,
        min_available_nodes=nodes,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial_weights(float(config["model-mb"]))),
        num_rounds=int(config["num-server-rounds"]),
    )
    out = {"start": started, "round_ends": strategy.stamps, "serverapp_peak_rss_mb": peak_rss_mb()}
    path = Path(str(config["out"]))
    path.with_suffix(".tmp").write_text(json.dumps(out))
    path.with_suffix(".tmp").replace(path)  # whole: the bench reads it once it exists
