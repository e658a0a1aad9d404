"""Check that `fedloop simulate --engine ray --gpus-per-agent F` shares GPUs between agents.

Runs a simulation on a local Ray (started here with the machine's GPUs) whose virtual agents
train the digits CNN (``fedloop.ml.engines.digits_engine``) on CUDA. Each agent reports, as
metrics, when its training started and ended, the GPU Ray gave its task and whether its model
was on CUDA; from those this script measures how many agents trained on each GPU at the same
time. With ``--gpus-per-agent 0.25`` that should be 4 per GPU, and never more. One JSON line on
stdout:

    python bench/ray_gpu.py --agents 16 --gpus-per-agent 0.25 --rounds 3
    python bench/ray_gpu.py --agents 16 --gpus-per-agent 0.25 --rounds 3 --no-reuse-workers

The second run is Ray's own default for GPU tasks, a new worker process per task: each chunk
of agents then pays a process start, the PyTorch import and a CUDA context.

Needs a CUDA GPU, PyTorch built for it, Ray and scikit-learn; prints a "skipped" line without.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this module, for the workers


class TimedEngine:
    """Wraps one digits engine; its metrics say when and on which GPU it trained."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def initial_weights(self) -> Any:
        return self.inner.initial_weights()

    def train(self, weights: Any, config: Mapping[str, Any]) -> tuple[Any, int, dict[str, float]]:
        import ray
        import torch

        started = time.time()
        new, n, metrics = self.inner.train(weights, config)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ended = time.time()
        gpu_ids = ray.get_gpu_ids()
        on_cuda = next(self.inner.model.parameters()).is_cuda
        return (
            new,
            n,
            {
                **metrics,
                "started": started,
                "ended": ended,
                "gpu": float(gpu_ids[0]) if gpu_ids else -1.0,
                "on_cuda": 1.0 if on_cuda else 0.0,
                "pid": float(os.getpid()),
            },
        )

    def evaluate(self, weights: Any, config: Mapping[str, Any]) -> dict[str, float]:
        result: dict[str, float] = self.inner.evaluate(weights, config)
        return result


def engine(agent_index: int, num_agents: int, device: str = "cuda", **kw: Any) -> TimedEngine:
    from fedloop.ml.engines import digits_engine

    return TimedEngine(digits_engine(agent_index, num_agents, device=device, **kw))


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """Return the largest number of (start, end) spans open at one instant."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = now = 0
    for _, step in events:  # an end sorts before a start at the same instant
        now += step
        best = max(best, now)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gpus-per-agent", type=float, default=0.25)
    parser.add_argument("--cpus-per-agent", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=100, help="Local epochs (seconds of work).")
    parser.add_argument(
        "--no-reuse-workers",
        action="store_true",
        help="Ray's default for GPU tasks: a new worker process per task (for comparison).",
    )
    parser.add_argument(
        "--fake-gpus",
        type=int,
        default=0,
        help="Dry run without CUDA: Ray pretends to have this many GPUs, agents train on CPU.",
    )
    args = parser.parse_args()
    try:
        import ray  # noqa: F401
        import sklearn  # noqa: F401
        import torch
    except ImportError as exc:
        print(json.dumps({"bench": "ray_gpu", "skipped": f"missing {exc.name}"}))
        return
    if not torch.cuda.is_available() and not args.fake_gpus:
        print(json.dumps({"bench": "ray_gpu", "skipped": "no CUDA GPU"}))
        return
    from fedloop.sim import Observer, RayBackend, SimSettings, run

    # Ray's workers import this module by name: they inherit PYTHONPATH from this process.
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH", "")) if p
    )

    class Collect(Observer):
        def __init__(self) -> None:
            self.agents: list[tuple[int, dict[str, float]]] = []
            self.rounds: list[dict[str, Any]] = []

        def on_agent_done(self, round_number: int, result: Any, done: int, total: int) -> None:
            self.agents.append((round_number, dict(result.metrics)))

        def on_round_end(self, summary: Any) -> None:
            self.rounds.append({"round": summary.round, "seconds": round(summary.seconds, 2)})

    seen = Collect()
    backend = RayBackend(
        cpus_per_agent=args.cpus_per_agent,
        gpus_per_agent=args.gpus_per_agent,
        num_cpus=os.cpu_count(),
        num_gpus=args.fake_gpus or None,
        reuse_workers=not args.no_reuse_workers,
    )
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fedloop-ray-gpu-") as root:
        run(
            SimSettings(
                f"{Path(__file__).stem}:engine",
                num_agents=args.agents,
                rounds=args.rounds,
                params={"epochs": args.epochs, "device": "cpu" if args.fake_gpus else "cuda"},
                data_dir=Path(root) / "data",
                evaluate=False,
            ),
            backend,
            seen,
        )
    name = "none (--fake-gpus)" if args.fake_gpus else torch.cuda.get_device_name(0)
    per_gpu: dict[int, list[tuple[float, float]]] = {}
    for _, m in seen.agents:
        per_gpu.setdefault(int(m["gpu"]), []).append((m["started"], m["ended"]))
    durations = [m["ended"] - m["started"] for _, m in seen.agents]
    print(
        json.dumps(
            {
                "bench": "ray_gpu",
                "gpus": args.fake_gpus or torch.cuda.device_count(),
                "gpu_name": name,
                "agents": args.agents,
                "rounds": args.rounds,
                "gpus_per_agent": args.gpus_per_agent,
                "expected_per_gpu": int(1 / args.gpus_per_agent) if args.gpus_per_agent else None,
                "agents_trained": len(seen.agents),
                "all_on_cuda": all(m["on_cuda"] == 1.0 for _, m in seen.agents),
                "worker_processes": len({m["pid"] for _, m in seen.agents}),
                "max_agents_at_once_per_gpu": {
                    str(g): max_overlap(spans) for g, spans in sorted(per_gpu.items())
                },
                "train_seconds_median": round(sorted(durations)[len(durations) // 2], 2),
                "round_summaries": seen.rounds,
                "seconds": round(time.time() - started, 1),
                "backend": backend.describe(),
                "reuse_workers": not args.no_reuse_workers,
            }
        )
    )


if __name__ == "__main__":
    main()
