"""Flower's side of bench/vs_flower.py: run inside the Flower venv, never imports fedloop.

    python flower_bench.py sim    --agents N --model-mb S --rounds R --out result.json
    python flower_bench.py server --agents N --model-mb S --rounds R --port P --out result.json
    python flower_bench.py client --model-mb S --port P

The workload is the one of fedloop's `NoopEngine`: a model of `model_mb` MB of float32 in four
tensors, and a client whose `fit` returns the parameters it received unchanged (one sample, no
metrics). The server uses FedAvg with fraction_fit=1, min clients N and no evaluation (neither
federated nor centralised). A FedAvg subclass stamps the time at the end of every
`aggregate_fit`, i.e. when a round's global model exists, the same instant fedloop records as a
global model's `created_at`. The server process writes its own VmHWM (peak RSS) at the end.

APIs (flwr 1.42): the legacy `flwr.simulation.start_simulation` (Ray) and the legacy
`flwr.server.start_server` / `flwr.client.start_client` over gRPC (transport "grpc-bidi").
Both are deprecated in favour of SuperLink/SuperNode and `run_simulation`, but still shipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

warnings.filterwarnings("ignore")

import flwr  # noqa: E402
from flwr.client import NumPyClient  # noqa: E402
from flwr.common import ndarrays_to_parameters  # noqa: E402
from flwr.server import ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402

GRPC_MAX = 1 << 30  # 1 GiB: 100 MB models need more than gRPC's 4 MB default


def initial_weights(model_mb: float, tensors: int = 4, seed: int = 0) -> list[np.ndarray]:
    """The same arrays as fedloop.ml.noop.NoopEngine.initial_weights, as a list."""
    total = max(tensors, int(model_mb * 1024 * 1024 / 4))
    sizes = [total // tensors] * tensors
    sizes[-1] += total - sum(sizes)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n, dtype=np.float32) for n in sizes]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class NoopClient(NumPyClient):
    def __init__(self, model_mb: float, distinct: bool = False) -> None:
        self.model_mb = model_mb
        self.distinct = distinct  # as fedloop's NoopEngine(vary=True): two values changed
        self.calls = 0

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return initial_weights(self.model_mb)

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        if not self.distinct:
            return parameters, 1, {}
        self.calls += 1
        changed = np.array(parameters[0], copy=True)
        flat = changed.reshape(-1)
        flat[: min(2, flat.size)] = [os.getpid() % 2**24, self.calls % 2**24][: flat.size]
        return [changed, *parameters[1:]], 1, {}


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round's aggregate exists."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stamps: list[float] = []

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        out = super().aggregate_fit(server_round, results, failures)
        self.stamps.append(time.time())
        if failures:
            print(f"round {server_round}: {len(failures)} failures", file=sys.stderr, flush=True)
        return out


def strategy(agents: int, model_mb: float) -> TimedFedAvg:
    return TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=agents,
        min_evaluate_clients=0,
        min_available_clients=agents,
        initial_parameters=ndarrays_to_parameters(initial_weights(model_mb)),
    )


def write(out: str, started: float, agents: int, stamps: list[float], **extra: Any) -> None:
    Path(out).write_text(
        json.dumps(
            {
                "flwr": flwr.__version__,
                "agents": agents,
                "start": started,
                "round_ends": stamps,
                "server_peak_rss_mb": round(peak_rss_mb(), 1),
                **extra,
            }
        )
    )


def run_sim(args: argparse.Namespace) -> None:
    from flwr.simulation import start_simulation

    started = time.time()
    strat = strategy(args.agents, args.model_mb)
    cpus = os.cpu_count() or 1
    start_simulation(
        client_fn=lambda context: NoopClient(args.model_mb, args.distinct).to_client(),
        num_clients=args.agents,
        client_resources={"num_cpus": 1, "num_gpus": 0.0},
        config=ServerConfig(num_rounds=args.rounds),
        strategy=strat,
        ray_init_args={
            "num_cpus": cpus,
            "include_dashboard": False,
            "ignore_reinit_error": True,
            "log_to_driver": False,
        },
    )
    write(args.out, started, args.agents, strat.stamps, ray_actors=cpus)


def run_server(args: argparse.Namespace) -> None:
    from flwr.server import start_server

    started = time.time()
    strat = strategy(args.agents, args.model_mb)
    start_server(
        server_address=f"127.0.0.1:{args.port}",
        config=ServerConfig(num_rounds=args.rounds),
        strategy=strat,
        grpc_max_message_length=GRPC_MAX,
    )
    write(args.out, started, args.agents, strat.stamps)


def run_client(args: argparse.Namespace) -> None:
    from flwr.client import start_client

    start_client(
        server_address=f"127.0.0.1:{args.port}",
        client=NoopClient(args.model_mb, args.distinct).to_client(),
        grpc_max_message_length=GRPC_MAX,
        insecure=True,
        transport="grpc-bidi",
        max_retries=100,
        max_wait_time=600,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["sim", "server", "client"])
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--model-mb", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", default="")
    parser.add_argument("--distinct", action="store_true", help="every local model differs")
    args = parser.parse_args()
    {"sim": run_sim, "server": run_server, "client": run_client}[args.mode](args)


if __name__ == "__main__":
    main()
