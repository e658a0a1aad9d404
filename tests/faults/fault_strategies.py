"""A user strategy, `fault_strategies:SlowFedAvg`, that lets a test kill mid-aggregation."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from fedloop.strategies import FedAvg, Update
from fedloop.types import Weights


class SlowFedAvg(FedAvg):
    """FedAvg whose aggregation of each round in `slow_rounds` first writes the file
    `<marker_dir>/aggregating-<round>` and then sleeps `delay` seconds — once: after a restart
    the marker is there and the round aggregates at full speed."""

    name = "slow_fedavg"

    def __init__(
        self, marker_dir: str = ".", slow_rounds: Sequence[int] = (), delay: float = 30.0
    ) -> None:
        self.marker_dir = Path(marker_dir)
        self.slow_rounds = {int(r) for r in slow_rounds}
        self.delay = float(delay)

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        marker = self.marker_dir / f"aggregating-{server_round}"
        if server_round in self.slow_rounds and not marker.exists():
            marker.write_text(f"{len(updates)}\n")
            time.sleep(self.delay)
        return super().aggregate(global_weights, updates, server_round)
