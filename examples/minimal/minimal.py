"""The book's minimal example: two small arrays per agent, no training.

Each agent sends fixed local models; FedAvg's result can be checked by hand. Run an aggregator
first (`fedloop aggregator --config examples/minimal/aggregator.toml`), then, in two shells:

    python examples/minimal/minimal.py --name a1 --value 1 --samples 1
    python examples/minimal/minimal.py --name a2 --value 3 --samples 3

Global model of round 1: (1·1 + 3·3) / (1 + 3) = 2.5 in every element.
"""

from __future__ import annotations

import argparse

import numpy as np

from fedloop.agent import Client


def local_models(value: float) -> dict[str, np.ndarray]:
    """The book's two arrays (a 2x3 and a 3x2 matrix), filled with `value`."""
    return {
        "model1": np.full((2, 3), value, dtype=np.float32),
        "model2": np.full((3, 2), value, dtype=np.float32),
    }


def main(argv: list[str] | None = None) -> dict[str, np.ndarray]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8765")
    parser.add_argument("--name", default="minimal-agent")
    parser.add_argument("--value", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)

    client = Client(args.url, args.name)
    client.send_initial_model(local_models(0.0))
    global_model = client.wait_for_global_model()
    for _ in range(args.rounds):
        # "Training": the book's minimal example just sends fixed arrays.
        client.send_trained_model(local_models(args.value), args.samples, {"accuracy": 0.0})
        global_model = client.wait_for_global_model()
        assert global_model is not None
        print(f"global model of round {client.global_round}:")
        for name, array in global_model.items():
            print(f"  {name} = {array.tolist()}")
    client.close()
    assert global_model is not None
    return global_model


if __name__ == "__main__":
    main()
