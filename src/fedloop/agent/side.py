"""The agent's half of strategies with side tensors (SCAFFOLD, FedCurv): what its ML engine gets
in ``config``, the extra tensors the engine must return with its weights, and what the agent
keeps between rounds (docs/decisions/0011-strategy-side-tensors.md).

The engine contract (README, "Strategies with side tensors"): when the aggregator's strategy
exchanges side tensors, ``train(weights, config)`` finds ``config["strategy"]`` (the strategy's
name) and ``config["strategy_state"]`` (a dict of arrays: for SCAFFOLD c and this agent's
c_i, for FedCurv the other agents' sums), and returns, in the same mapping as its weights, the
extra tensors the strategy needs (``scaffold.dc/<tensor>``; ``fedcurv.fisher/<tensor>`` and
``fedcurv.fw/<tensor>``). An engine that returns none of them does not support the strategy,
and the agent stops with a sentence that says so, instead of uploading what the aggregator
would refuse.

Used by `fedloop.agent.Agent` (state in its working directory) and by `fedloop simulate`'s
virtual agents (state in files under the run's data directory).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedloop.agent.state import _atomic_write
from fedloop.errors import FedloopError, ProtocolError
from fedloop.protocol import codec
from fedloop.protocol.messages import SideTensors
from fedloop.strategies import agent_side
from fedloop.types import Weights

STRATEGY_KEY = "strategy"
STATE_KEY = "strategy_state"
# The round of the upload that the kept tensors follow from, stored with them.
_ROUND = "fedloop.round"
_HELP = "see the README, 'Strategies with side tensors'"


def kept_file(directory: Path, strategy: str, owner: str) -> Path:
    """Return the file in `directory` where `owner` (an agent id or name) keeps its tensors
    of `strategy`: a new aggregator run (a new agent id) or strategy starts from nothing."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{strategy}-{owner}")
    return directory / f"side-{safe}.safetensors"


class KeptTensors:
    """An agent's kept tensors of one strategy (SCAFFOLD's c_i, FedCurv's last contribution),
    with the round of the upload they follow from, in one safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[Weights, int]:
        """Return the kept tensors and their round; ({}, -1) before the first."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}, -1
        try:
            tensors = codec.decode(data)
            round_number = int(tensors.pop(_ROUND))
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            raise FedloopError(
                f"{self.path} is damaged ({exc}); delete it to start this agent's strategy "
                "state from nothing (SCAFFOLD: c_i = 0)"
            ) from exc
        return tensors, round_number

    def save(self, tensors: Weights, round_number: int) -> None:
        """Replace the kept tensors, durably: the aggregator counted the upload they follow."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        parts = codec.encode_parts({**tensors, _ROUND: np.array(round_number, np.int64)})
        _atomic_write(self.path, parts, durable=True)


class StrategySide:
    """One agent's side of a strategy with side tensors, as `GlobalModelInfo.side` describes it."""

    def __init__(self, info: SideTensors, kept: KeptTensors) -> None:
        self.info = info
        self.rule = agent_side(info.strategy)
        self.kept = kept
        self.prefixes = tuple(info.extras)

    @property
    def strategy(self) -> str:
        return self.info.strategy

    def engine_config(
        self, config: Mapping[str, Any], shipped: Weights, global_round: int
    ) -> dict[str, Any]:
        """Return `config` with what the engine trains with, for global model `global_round`
        (`shipped`: what the aggregator shipped with it)."""
        kept, kept_round = self.kept.load()
        state = self.rule.engine_state(shipped, kept, kept_round, global_round)
        return {**config, STRATEGY_KEY: self.strategy, STATE_KEY: state}

    def split(
        self, returned: Mapping[str, np.ndarray], model: Collection[str], engine: object
    ) -> tuple[Weights, Weights]:
        """Return what the engine's train() returned as (model, extras), or raise a
        FedloopError saying what is wrong: an engine that does not support the strategy
        returns none of its extra tensors."""
        names = set(model)
        extras = {k: v for k, v in returned.items() if k.startswith(self.prefixes)}
        weights = {k: v for k, v in returned.items() if k not in extras}
        kind = type(engine).__name__
        for prefix in self.prefixes:
            if not any(k.startswith(prefix) for k in extras):
                raise FedloopError(
                    f"the ML engine {kind} does not support strategy {self.strategy!r}: its "
                    f"train() returned no {prefix}<tensor> tensors with its weights. Use an "
                    f"engine that does (fedloop.ml.engines.TorchClassifier, "
                    f"fedloop.sim.engines.LogRegEngine) or another strategy; {_HELP}"
                )
        stray = sorted(set(weights) - names)
        missing = sorted(names - set(weights))
        if stray or missing:
            raise FedloopError(
                f"the ML engine {kind} returned weights that do not match the global model "
                f"(missing {missing[:5]}, not in it {stray[:5]}); strategy "
                f"{self.strategy!r} takes extra tensors named {', '.join(self.prefixes)}<tensor>"
            )
        return weights, extras

    def extras_of(self, tensors: Mapping[str, np.ndarray]) -> Weights:
        """Return the extra tensors among an upload's tensors."""
        return {k: v for k, v in tensors.items() if k.startswith(self.prefixes)}

    def accepted(self, extras: Weights, round_number: int) -> None:
        """Keep what follows from the upload of round `round_number` with these extras, once
        the aggregator took it; a round kept already (before a restart) is not kept twice."""
        kept, kept_round = self.kept.load()
        if kept_round >= round_number:
            return
        self.kept.save(self.rule.keep(kept, extras), round_number)
