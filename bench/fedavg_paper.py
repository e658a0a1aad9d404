"""Reproduce McMahan et al. 2017's MNIST CNN result: FedAvg rounds to reach 99% test accuracy.

Setting (paper, Section 3 and Table 2): the CNN ``fedloop.ml.models.PaperCNN`` (two 5x5
convolutions of 32 and 64 channels, each followed by 2x2 max pooling, dense 512, softmax);
K = 100 agents with 600 MNIST training images each; each round a fraction C = 0.1 of them
(10 agents, drawn at random) trains E = 5 local epochs of plain SGD with batch size B = 10 from
the global model, and the server takes their num_samples-weighted mean
(``fedloop.strategies.FedAvg``, the aggregator's own code). IID: a uniform random split.
Pathological non-IID: sorted by label, cut into 200 shards of 300, two shards per agent
(``fedloop.ml.partition.shards``). After each round the global model is evaluated on the 10,000
MNIST test images; a setting stops when it reaches the target accuracy or ``--max-rounds``.

The simulation runs in this process (agents one after another, the same training code as
``fedloop agent`` with ``fedloop.ml.engines.TorchClassifier``), on CUDA when available.

Paper figures, from H. B. McMahan, E. Moore, D. Ramage, S. Hampson, B. Agüera y Arcas,
"Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017
(arXiv:1602.05629), rounds to 99% for the CNN:

- Table 2 (C = 0.1), E = 5, B = 10 (u = 300): FedAvg 20 IID, 229 non-IID
  (FedSGD, E = 1, B = inf: 626 IID, 483 non-IID); E = 1, B = 10: 34 IID, 350 non-IID.
- Table 1 (E = 5, B = 10, C = 0.1): 18 IID, 206 non-IID (a separate sweep of the same
  setting; the paper's two tables differ by a few rounds).

The paper tuned the learning rate per setting over a grid; ``--lr`` is ours (0.1 by default,
no momentum), so expect the same order of magnitude, not the same number of rounds.

One JSON line per setting on stdout (progress goes to stderr):

    python bench/fedavg_paper.py                   # the paper's setting; hours on CPU, GPU advised
    python bench/fedavg_paper.py --quick           # E=1, target 97%, capped rounds: minutes on CPU
    python bench/fedavg_paper.py --settings iid --max-rounds 50 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"

# (setting, E, B) -> rounds to 99% in McMahan et al. 2017, CNN, C = 0.1.
PAPER_TABLE2 = {
    ("iid", 5, 10): 20,
    ("noniid", 5, 10): 229,
    ("iid", 1, 10): 34,
    ("noniid", 1, 10): 350,
}
PAPER_TABLE1 = {("iid", 5, 10): 18, ("noniid", 5, 10): 206}
PAPER_FEDSGD = {"iid": 626, "noniid": 483}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_setting(args: argparse.Namespace, setting: str, data: dict[str, Any]) -> dict[str, Any]:
    """Run FedAvg on one split until the target accuracy or the round cap; return the JSON row."""
    import torch

    from fedloop.ml import partition
    from fedloop.ml.engines import TorchClassifier
    from fedloop.ml.models import PaperCNN
    from fedloop.strategies import FedAvg, Update

    x_train, y_train, x_test, y_test = data["x"], data["y"], data["xt"], data["yt"]
    if setting == "iid":
        parts = partition.iid(y_train, args.agents, args.seed)
    else:
        parts = partition.shards(y_train, args.agents, 2, args.seed)
    threads = None if args.device != "cpu" else args.threads
    evaluator = TorchClassifier(
        PaperCNN,
        (x_train[:1], y_train[:1]),
        (x_test, y_test),
        seed=args.seed,
        device=args.device,
        num_threads=threads,
    )
    strategy = FedAvg()
    weights = evaluator.initial_weights()
    per_round = max(round(args.fraction * args.agents), 1)
    rng = np.random.default_rng(args.seed)
    accuracy = evaluator.evaluate(weights, {})["accuracy"]
    history: list[float] = []
    reached: int | None = None
    stopped = "max_rounds"
    started = time.monotonic()
    for round_ in range(1, args.max_rounds + 1):
        chosen = np.sort(rng.choice(args.agents, per_round, replace=False))
        updates = []
        for agent in chosen:
            idx = parts[agent]
            engine = TorchClassifier(
                PaperCNN,
                (x_train[idx], y_train[idx]),
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                momentum=args.momentum,
                seed=args.seed * 1000 + int(agent),
                device=args.device,
                num_threads=threads,
            )
            local, n, _ = engine.train(weights, {"round": round_})
            updates.append(Update(local, n, f"agent-{agent:03d}", round_ - 1))
        weights = strategy.aggregate(weights, updates, round_)
        accuracy = evaluator.evaluate(weights, {})["accuracy"]
        history.append(round(accuracy, 4))
        log(
            f"{setting} round {round_:>4}: test accuracy {accuracy:.4f} "
            f"({time.monotonic() - started:.0f} s)"
        )
        if accuracy >= args.target:
            reached, stopped = round_, "target"
            break
        if args.max_seconds and time.monotonic() - started >= args.max_seconds:
            stopped = "max_seconds"
            break
    key = (setting, args.epochs, args.batch_size)
    comparable = args.target == 0.99 and args.fraction == 0.1 and args.agents == 100
    return {
        "bench": "fedavg_paper",
        "setting": setting,
        "model": "PaperCNN",
        "agents": args.agents,
        "C": args.fraction,
        "E": args.epochs,
        "B": args.batch_size,
        "lr": args.lr,
        "momentum": args.momentum,
        "target": args.target,
        "rounds_to_target": reached,
        "rounds_run": len(history),
        "stopped_by": stopped,
        "accuracy": history[-1] if history else round(accuracy, 4),
        "best_accuracy": max(history) if history else None,
        "accuracy_per_round": history,
        "paper_rounds_to_99_table2": PAPER_TABLE2.get(key),
        "paper_rounds_to_99_table1": PAPER_TABLE1.get(key),
        "paper_fedsgd_rounds_to_99": PAPER_FEDSGD[setting],
        "comparable_to_paper": comparable and key in PAPER_TABLE2,
        "quick": args.quick,
        "device": args.device,
        "torch": torch.__version__,
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="MNIST IDX files.")
    parser.add_argument("--settings", default="iid,noniid", help="iid, noniid or both.")
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1, help="C: agents per round.")
    parser.add_argument("--epochs", type=int, default=5, help="E: local epochs.")
    parser.add_argument("--batch-size", type=int, default=10, help="B: local batch size.")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument(
        "--max-rounds", type=int, default=None, help="Default 100 IID / 400 non-IID."
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="Stop a setting after this many seconds of rounds (its JSON says so).",
    )
    parser.add_argument("--test-size", type=int, default=10000, help="Test images evaluated.")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present).")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU-sized run: E=1, target 97%%, at most 10 (IID) / 15 (non-IID) rounds, "
        "2,000 test images.",
    )
    args = parser.parse_args(argv)
    import torch

    from fedloop.errors import FedloopError
    from fedloop.ml import data

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.epochs, args.target, args.test_size = 1, 0.97, min(args.test_size, 2000)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    try:
        x, y = data.load_mnist(args.data_dir, "train")
        xt, yt = data.load_mnist(args.data_dir, "test")
    except FedloopError as exc:
        print(json.dumps({"bench": "fedavg_paper", "skipped": str(exc)}))
        return
    # A fixed random subset when fewer test images are asked for (--quick): same for every run.
    keep = np.sort(np.random.default_rng(12345).permutation(len(yt))[: args.test_size])
    arrays = {
        "x": data.images_to_float(x),
        "y": y,
        "xt": data.images_to_float(xt[keep]),
        "yt": yt[keep],
    }
    cap = args.max_rounds
    for setting in settings:
        if setting not in ("iid", "noniid"):
            parser.error(f"unknown setting {setting!r}; use iid and/or noniid")
        if cap is None:
            if args.quick:
                args.max_rounds = 10 if setting == "iid" else 15
            else:
                args.max_rounds = 100 if setting == "iid" else 400
        print(json.dumps(run_setting(args, setting, arrays)), flush=True)


if __name__ == "__main__":
    main()
