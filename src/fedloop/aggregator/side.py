"""The aggregator's half of strategies with side tensors (SCAFFOLD, FedCurv): the extra tensors
each upload carries besides the model, checked before anything touches state, and the tensors
the strategy ships to agents with each global model (docs/decisions/0011-strategy-side-tensors.md).

A strategy without side tensors (FedAvg, …) has no `UploadSide`: its uploads take the path
they always took, with no work added.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedloop.errors import ProtocolError
from fedloop.protocol import codec
from fedloop.protocol.codec import ModelSpec, TensorSpec
from fedloop.protocol.messages import SideTensors
from fedloop.strategies import Strategy
from fedloop.types import Weights

# Where a refusal sends the user.
_HELP = "see the README, 'Strategies with side tensors'"

ShippedParts = tuple[bytes | memoryview, ...]


@dataclass(frozen=True)
class UploadSide:
    """What uploads must carry for a strategy with side tensors, and how to check it."""

    strategy: str
    model: ModelSpec
    extras: tuple[TensorSpec, ...]
    prefixes: tuple[str, ...]
    # The model's tensors, then the extras: what an upload's body holds, checked as one.
    spec: ModelSpec
    ships: bool  # the strategy ships tensors to agents (`Strategy.shipped_state`)

    @classmethod
    def of(cls, strategy: Strategy, model: ModelSpec, global_weights: Weights) -> UploadSide | None:
        """Return the side of `strategy` for this model; None when it has no side tensors."""
        wanted = strategy.upload_extras(global_weights)
        ships = type(strategy).shipped_state is not Strategy.shipped_state
        if not wanted and not ships:
            return None
        names = {t.name for t in model.tensors}
        clash = sorted(names & set(wanted))
        if clash:
            raise ValueError(
                f"the model's tensors {clash[:3]} have the names of strategy "
                f"{strategy.name!r}'s extra tensors; rename them"
            )
        extras = tuple(
            TensorSpec(name, codec.dtype_name(dtype), tuple(shape))
            for name, (shape, dtype) in wanted.items()
        )
        prefixes = tuple(strategy.extra_prefixes) or tuple(
            sorted({name.rsplit("/", 1)[0] + "/" for name in wanted})
        )
        return cls(
            strategy=strategy.name,
            model=model,
            extras=extras,
            prefixes=prefixes,
            spec=ModelSpec(model.tensors + extras),
            ships=ships,
        )

    def info(self, shipped: bool) -> SideTensors:
        """Return what agents are told with a global model (`GlobalModelInfo.side`)."""
        return SideTensors(strategy=self.strategy, extras=list(self.prefixes), state=shipped)

    def ship(self, strategy: Strategy, global_weights: Weights) -> ShippedParts | None:
        """Return the strategy's shipped tensors for this global model as safetensors pieces
        (views of them), or None when it ships none."""
        if not self.ships:
            return None
        shipped = strategy.shipped_state(global_weights)
        return tuple(codec.encode_parts(shipped)) if shipped else None

    def split(self, weights: Weights) -> tuple[Weights, Weights]:
        """Return an upload's tensors as (model, extras)."""
        extras = {t.name: weights[t.name] for t in self.extras}
        model = {t.name: weights[t.name] for t in self.model.tensors}
        return model, extras

    def refusal(self, body: codec.Bytes) -> ProtocolError | None:
        """Return why an upload's extra tensors are refused, or None: from the safetensors
        header alone, so that an agent learns what is wrong with them (missing_extras,
        wrong_extras) rather than a bare wrong_names. The values are checked with the model's."""
        if not self.extras:
            return None
        try:
            header, _ = codec.read_header(body)
        except ProtocolError:
            return None  # not safetensors: the model's check says so
        model = {t.name for t in self.model.tensors}
        given = {n: v for n, v in header.items() if n != "__metadata__" and n not in model}
        missing = [t.name for t in self.extras if t.name not in given]
        what = f"strategy {self.strategy!r}"
        if len(missing) == len(self.extras):
            wanted = ", ".join(f"{p}<tensor>" for p in self.prefixes)
            return ProtocolError(
                f"{what} needs, with each local model, the extra tensors {wanted} (e.g. "
                f"{self.extras[0].name!r}); this upload has none. The agent's ML engine must "
                f"support {self.strategy}, through an agent that passes side tensors; {_HELP}",
                422,
                "missing_extras",
            )
        if missing:
            return _wrong(f"{what}: the upload lacks the extra tensors {missing[:5]}")
        expected = {t.name: t for t in self.extras}
        stray = [n for n in given if n not in expected and n.startswith(self.prefixes)]
        if stray:
            return _wrong(f"{what}: the upload has unexpected extra tensors {stray[:5]}")
        for name, spec in expected.items():
            entry = given[name]
            try:
                dtype, shape = entry["dtype"], tuple(int(s) for s in entry["shape"])
            except (KeyError, TypeError, ValueError):
                return None  # a malformed entry: the model's check says so
            if dtype != spec.dtype or shape != spec.shape:
                return _wrong(
                    f"{what}: extra tensor {name!r} is {dtype} {shape}, it must be "
                    f"{spec.dtype} {spec.shape} (the model's tensor)"
                )
        return None


def _wrong(detail: str) -> ProtocolError:
    return ProtocolError(f"{detail}; {_HELP}", 422, "wrong_extras")
