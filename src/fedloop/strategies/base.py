"""The strategy interface (Update, Strategy) and the array helpers every family shares.

Conventions every strategy follows:

- Arithmetic is float64; each output tensor is cast back to the global tensor's dtype, and the
  output has the global model's keys in the global model's order.
- Only floating-point tensors go through a method's rule. Non-floating tensors (integer counters
  such as BatchNorm's ``num_batches_tracked``, boolean masks) are bookkeeping, not parameters:
  the non-robust methods take their ``num_samples``-weighted mean, the robust methods
  (median, trimmed mean, Krum, Multi-Krum, Bulyan, geometric median) their coordinate-wise
  median, so that one agent cannot move them. Either way the value is rounded to the nearest
  integer (booleans: majority). Distances (Krum, Bulyan, geometric median) use the floating-point
  tensors only.
- Updates are put in a canonical order, by ``(agent_id, base_round, num_samples)``, before any
  arithmetic, so that permuting the updates gives bit-identical results and ties are broken by
  ``agent_id``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from numpy.typing import NDArray

from fedloop.errors import ConfigError
from fedloop.parallel import split_tensors
from fedloop.types import Weights

Array = NDArray[np.float64]
"""A float64 array: what every strategy computes in."""

RoundConfig = dict[str, float | int | str | bool]


@dataclass(frozen=True, eq=False)
class Update:
    """One agent's upload: its full local weights (not a delta) and what came with them.

    ``extras`` holds side tensors a method needs (SCAFFOLD's control-variate deltas, FedCurv's
    Fisher diagonals, ...), named with the method's prefix. ``base_weights`` is the global
    model the agent trained on (global model ``base_round``) when that is not the one passed
    to ``aggregate``: the aggregator sets it for strategies with ``needs_base_models``, for
    stale updates only; None otherwise. Equality is identity, since numpy arrays have no
    single truth value.
    """

    weights: Weights
    num_samples: int
    agent_id: str
    base_round: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    extras: Weights = field(default_factory=dict)
    base_weights: Weights | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ValueError(
                f"update from agent {self.agent_id!r} has num_samples={self.num_samples}; "
                "it must be 0 or more"
            )


TensorShape = tuple[tuple[int, ...], np.dtype[Any]]
"""A tensor's shape and dtype: what an upload's extra tensor must have."""


class AgentSide:
    """The agent's half of a method with side tensors (SCAFFOLD, FedCurv): pure functions an
    agent, or a simulation's virtual agent, applies around its engine's ``train``.

    ``shipped`` is what the aggregator ships with the global model (`Strategy.shipped_state`);
    ``kept`` what this agent kept after its last accepted upload (`keep`), {} at first, and
    ``kept_round`` that upload's round (-1: none). The defaults hand the engine the shipped
    tensors as they are and keep nothing.
    """

    def engine_state(
        self, shipped: Weights, kept: Weights, kept_round: int, global_round: int
    ) -> Weights:
        """Return the tensors the engine trains with, its ``config["strategy_state"]``, for
        training on global model ``global_round``."""
        return dict(shipped)

    def keep(self, kept: Weights, extras: Weights) -> Weights:
        """Return what the agent keeps once its upload with these extra tensors is accepted."""
        return {}


class Strategy(ABC):
    """An aggregation method: global weights and local updates in, new global weights out."""

    name: ClassVar[str] = ""
    # True when the result needs only the num_samples-weighted mean of the updates (and their
    # total num_samples): the aggregator may fold uploads into a RunningMean as they arrive and
    # call aggregate with its single summary update.
    streaming: ClassVar[bool] = False
    # True for methods that aggregate whenever buffer_size uploads are in, without rounds.
    asynchronous: ClassVar[bool] = False
    # True for methods that take each update's delta against the global model it was trained
    # on (FedBuff): the aggregator loads the stored global model of every older base_round and
    # passes it as Update.base_weights.
    needs_base_models: ClassVar[bool] = False
    buffer_size: int = 1

    @abstractmethod
    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        """Return the new global weights, same keys, order, shapes and dtypes as the old."""

    @property
    def min_updates(self) -> int:
        """Return the fewest local models one aggregation can take: 1, unless the method needs
        more (Krum, Bulyan). The aggregator waits for at least this many before aggregating."""
        return 1

    def round_config(self, server_round: int) -> RoundConfig:
        """Return the settings agents need with this round's global model (none by default)."""
        return {}

    def state(self) -> Weights:
        """Return the server state to persist with each round (arrays, counters as 0-d arrays)."""
        return {}

    def load_state(self, state: Weights) -> None:
        """Restore the server state that state() returned, as when the aggregator restarts."""
        if state:
            raise ValueError(
                f"strategy {self.name!r} keeps no state but was given {sorted(state)[:5]}"
            )

    # --- side tensors (docs/decisions/0011-strategy-side-tensors.md) -------------------------
    # Prefixes of the extra tensors each upload carries besides the model: by default one per
    # floating-point model tensor under each prefix (`upload_extras`), in Update.extras.
    extra_prefixes: ClassVar[tuple[str, ...]] = ()
    # The agent's half of the method; None: agents need nothing but the global model.
    agent_side: ClassVar[AgentSide | None] = None
    # How many agents are registered when the aggregator aggregates (it sets this before each
    # aggregate); 0 outside an aggregator.
    population: int = 0

    def upload_extras(self, global_weights: Weights) -> dict[str, TensorShape]:
        """Return the extra tensors every upload must carry: name -> (shape, dtype).

        By default ``<prefix><tensor>`` for each of `extra_prefixes` and each floating-point
        tensor of the global model, with that tensor's shape and dtype.
        """
        return {
            prefix + key: (tuple(tensor.shape), tensor.dtype)
            for prefix in self.extra_prefixes
            for key, tensor in global_weights.items()
            if tensor.dtype.kind == "f"
        }

    def shipped_state(self, global_weights: Weights) -> Weights:
        """Return the tensors agents receive with ``global_weights`` (the newest global model),
        for their engines: a part of state() or none (the default). Never secrets such as a
        DP mechanism's noise state. Callers only read them."""
        return {}


# --- checking and ordering ------------------------------------------------------------------

_SUPPORTED_KINDS = "fiub"


def canonical(updates: Iterable[Update]) -> list[Update]:
    """Return the updates sorted by (agent_id, base_round, num_samples)."""
    return sorted(updates, key=lambda u: (u.agent_id, u.base_round, u.num_samples))


def check_updates(global_weights: Weights, updates: Sequence[Update]) -> list[Update]:
    """Return the updates in canonical order after checking names and shapes against the global.

    Raises ValueError when there are no updates or an update does not fit the global model.
    """
    if len(updates) == 0:
        raise ValueError("aggregate needs at least one update, got none")
    for key, tensor in global_weights.items():
        if tensor.dtype.kind not in _SUPPORTED_KINDS:
            raise ValueError(
                f"global tensor {key!r} has dtype {tensor.dtype}; strategies support "
                "floating-point, integer and boolean tensors only"
            )
    names = set(global_weights)
    for update in updates:
        if set(update.weights) != names:
            missing = sorted(names - set(update.weights))
            extra = sorted(set(update.weights) - names)
            raise ValueError(
                f"update from agent {update.agent_id!r} does not match the global model: "
                f"missing {missing}, unexpected {extra}"
            )
        for key, tensor in global_weights.items():
            shape = np.shape(update.weights[key])
            if shape != tensor.shape:
                raise ValueError(
                    f"update from agent {update.agent_id!r}: tensor {key!r} has shape {shape}, "
                    f"the global model's has {tensor.shape}"
                )
    return canonical(updates)


def float_keys(weights: Weights) -> list[str]:
    """Return the names of the floating-point tensors, in model order."""
    return [key for key, tensor in weights.items() if tensor.dtype.kind == "f"]


def sample_fractions(updates: Sequence[Update]) -> Array:
    """Return p_i = n_i / sum(n), the num_samples weights of the updates."""
    counts = np.array([u.num_samples for u in updates], dtype=np.float64)
    total = float(counts.sum())
    if total <= 0:
        raise ValueError("every update has num_samples=0, so there is nothing to weight them by")
    return counts / total


# --- arrays ----------------------------------------------------------------------------------


def as_f64(array: Any) -> Array:
    """Return the array as float64 (a copy only when the dtype differs)."""
    return np.asarray(array, dtype=np.float64)


def stack(updates: Sequence[Update], key: str) -> Array:
    """Return one tensor of every update stacked along a new first axis, in float64."""
    return np.stack([as_f64(u.weights[key]) for u in updates])


def stack_extras(updates: Sequence[Update], key: str, shape: tuple[int, ...]) -> Array:
    """Return one side tensor of every update stacked, with a clear error if one is missing."""
    rows = []
    for update in updates:
        if key not in update.extras:
            raise ValueError(
                f"update from agent {update.agent_id!r} lacks the extra tensor {key!r}"
            )
        row = as_f64(update.extras[key])
        if row.shape != shape:
            raise ValueError(
                f"update from agent {update.agent_id!r}: extra tensor {key!r} has shape "
                f"{row.shape}, expected {shape}"
            )
        rows.append(row)
    return np.stack(rows)


def weighted_sum(stacked: Array, coefficients: Array) -> Array:
    """Return sum_i c_i * stacked[i] over the first axis."""
    return np.asarray(np.tensordot(coefficients, stacked, axes=1), dtype=np.float64)


def flatten(weights: Mapping[str, Any], keys: Sequence[str]) -> Array:
    """Return the named tensors raveled and concatenated into one float64 vector."""
    if not keys:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([as_f64(weights[key]).ravel() for key in keys])


def flatten_updates(updates: Sequence[Update], keys: Sequence[str]) -> Array:
    """Return an (n, d) matrix whose row i is update i's flattened floating-point model."""
    return np.stack([flatten(u.weights, keys) for u in updates])


def unflatten(vector: Array, like: Weights, keys: Sequence[str]) -> dict[str, Array]:
    """Return the vector cut back into float64 tensors shaped like like[key] for each key."""
    out: dict[str, Array] = {}
    offset = 0
    for key in keys:
        shape = like[key].shape
        size = math.prod(shape)
        out[key] = vector[offset : offset + size].reshape(shape)
        offset += size
    if offset != vector.size:
        raise ValueError(f"vector has {vector.size} values, the tensors {offset}")
    return out


def cast_like(value: Array, like: np.ndarray) -> np.ndarray:
    """Return value in like's dtype: floats cast, integers rounded to nearest, booleans majority."""
    if like.dtype.kind == "f":
        return np.asarray(value, dtype=like.dtype)
    return np.asarray(np.rint(value), dtype=like.dtype)


def assemble(
    global_weights: Weights,
    computed: Mapping[str, Array],
    updates: Sequence[Update],
    counters: Literal["mean", "median"],
) -> Weights:
    """Return the new global weights from the method's float64 results for floating tensors.

    Tensors absent from ``computed`` (the non-floating ones) get the num_samples-weighted mean
    (``counters="mean"``) or the coordinate-wise median (``"median"``) of the updates, rounded.
    """
    out: Weights = {}
    fractions: Array | None = None
    for key, tensor in global_weights.items():
        if key in computed:
            out[key] = cast_like(computed[key], tensor)
            continue
        stacked = stack(updates, key)
        if counters == "median":
            value = np.asarray(np.median(stacked, axis=0), dtype=np.float64)
        else:
            if fractions is None:
                fractions = sample_fractions(updates)
            value = weighted_sum(stacked, fractions)
        out[key] = cast_like(value, tensor)
    return out


_BLOCK = 1 << 16  # elements per block of a fold: 512 KiB of float64, stays in cache
# Elements per block of a closing pass that reads two arrays (two kept uploads, or the sums
# and one): its two threads then hand the GIL to each other half as often (each ufunc call
# releases and takes it again). The mean of two 4 MB uploads: 1.45 ms in blocks of 64 Ki,
# 1.15 ms in these. Passes over more arrays keep `_BLOCK`: a simulation's groups of four
# kept uploads were slower in larger blocks (sim 10 × 4 MB, distinct models: 0.029–0.033 s a
# round in 64 Ki blocks, 0.038–0.042 s in 128 Ki).
_PAIR_BLOCK = 1 << 17
# Elements NumPy casts at a time inside one ufunc call whose operands differ in dtype (float32
# uploads into float64 sums, float64 sums into a float32 mean); its default is 8,192. A fold
# of one upload into the sums is one call over its whole range: adding 1 M float32 into
# float64 sums took 0.72 ms with the default, 0.48 ms with this. The same operations on the
# same values: the same bits.
_CAST_BUFFER = 1 << 17


@contextlib.contextmanager
def _wide_casts() -> Iterator[None]:
    """Run the ufuncs inside with NumPy's casting buffer at `_CAST_BUFFER` elements, and
    floating-point errors ignored: a mean of finite uploads that rounds to a subnormal is
    no error, whatever a caller's `np.seterr` (`_half_sum` raises what it checks for).

    The settings belong to the calling thread (and context), so each range of a fold sets
    them on whichever thread runs it, and puts the old ones back.
    """
    old = np.setbufsize(_CAST_BUFFER)
    try:
        with np.errstate(all="ignore"):
            yield
    finally:
        np.setbufsize(old)


def _scale_range(y: Array, out: Array, weight: float, start: int, stop: int) -> None:
    """out[start:stop] = weight * y[start:stop], computed in float64."""
    np.multiply(y[start:stop], weight, out=out[start:stop], dtype=np.float64)


def _divide(x: Array, n: int, out: Array) -> None:
    """out = x / n, cast to out's dtype. For n a power of two, x · (1/n): 1/n is exact, so both
    round the same real number once and give the same bits, and a multiplication costs about
    half a division (per million float64 values here: 0.20 vs 0.54 ms, 0.40 vs 0.76 ms when
    cast to float32)."""
    if n > 0 and n & (n - 1) == 0 and n < 2**1000:
        np.multiply(x, 1.0 / n, out=out, casting="same_kind")
    else:
        np.divide(x, n, out=out, casting="same_kind")


def _divide_range(sums: Array, out: Array, n: int, start: int, stop: int) -> None:
    """out[start:stop] = sums[start:stop] / n, cast to out's dtype."""
    _divide(sums[start:stop], n, out[start:stop])


def _single_precision_pair(
    out: Array, xs: Sequence[Array], weights: Sequence[float], n: int
) -> bool:
    """Whether out = (w·x + w·y) / 2w, float32 in and out, has the bits of (x + y) · 0.5 in
    float32, so that `_half_sum` may compute it.

    Two uploads of equal num_samples w < 2**28. In float32, x + y is rounded once and · 0.5 is
    exact (a sum under 2**-125, whose half is subnormal, is exact itself): one rounding of
    (x + y) / 2, ties to even. In float64, w·x and w·y are exact. When x + y is exact in
    float64 and w·(x + y) too, the division by 2w gives (x + y) / 2 exactly and the cast
    rounds it once: the same bits. A sum rounded in float64 is off by under 2**-52 of it,
    which moves it across a float32 rounding boundary only if (x + y) / 2 lies exactly on one
    (a tie: x + y of 25 significant bits) or within that distance of one; the second needs
    exponents more than 28 apart, where the smaller value is too small to reach a boundary.
    A tie's w·(x + y) has at most 25 + 28 = 53 bits, exact in float64, for w < 2**28; from
    2**28 a tie can round the other way (w = 2**29 - 1, x = 1, y = 2**24 does). The one other
    difference, a float32 sum past the largest float32, is caught by `_half_sum`.
    """
    return (
        len(xs) == 2
        and out.dtype == np.float32
        and xs[0].dtype == np.float32
        and xs[1].dtype == np.float32
        and weights[0] == weights[1]
        and 0 < weights[0] < 2**28
        and float(weights[0]).is_integer()
        and n == weights[0] + weights[1]
    )


def _half_sum(x: Array, y: Array, out: Array) -> bool:
    """out = (x + y) · 0.5 in float32; False (out to be computed again) if a sum overflowed
    or came out NaN from two infinities, where float64 would differ. A half rounded to a
    subnormal is no error here, whatever the caller's `np.seterr`."""
    try:
        with np.errstate(over="raise", invalid="raise", under="ignore"):
            np.add(x, y, out=out)
            np.multiply(out, np.float32(0.5), out=out)
    except FloatingPointError:
        return False
    return True


# Bytes of uploads a RunningMean keeps unfolded at most (`max_held`), past the first two.
HOLD_BYTES = 512 << 20


class RunningMean:
    """A num_samples-weighted running mean of uploads, for strategies with ``streaming``.

    Fold each upload in with add() as it arrives, then pass ``[running.as_update()]`` to the
    strategy's aggregate: for a streaming strategy the result equals aggregating all uploads at
    once (up to floating-point summation order), without holding them all in memory.

    Uploads are kept as they came (views into their bodies), the first until a second comes,
    later ones until `max_held` are in (at most `HOLD_BYTES` of them), then folded into the
    float64 sums together, block by block: each block of the sums is read and written once per
    group, while in cache. The float64 operations are those of folding one upload at a time, in
    the order they came: the same bits. as_update folds the uploads still kept in the pass that
    divides: one upload needs no float64 copy at all, and with two the sums are never written.

    ``max_held`` > 1 is for a simulation, whose uploads come from workers on the same machine:
    with 10 uploads of 100 MB, folding one at a time moves 500 MB through memory per upload
    (the 200 MB of sums read and written), in groups of 4 about 230 MB. Over HTTP the default
    folds each upload as it comes: a group's fold holds the aggregator's lock while other
    uploads wait for their answers, and leaves more to fold when the round closes (deploy
    10 × 100 MB was 12 % slower in groups of 4).
    """

    def __init__(self, max_held: int = 1) -> None:
        self.max_held = max(1, max_held)
        self._sums: dict[str, Array] = {}
        # The float64 buffers behind `_sums`, kept by reset(): an aggregator that reuses one
        # RunningMean allocates (and page-faults in) 2 × the model once, not every round.
        self._buffers: dict[str, Array] = {}
        # Per thread, one block of n_i * y_i, reused: no temporaries.
        self._scratch = threading.local()
        self._held: list[Update] = []  # counted, not folded yet, in the order they came
        self._hold = 1  # how many to keep before folding them, from the first upload's size
        self._samples = 0
        self._count = 0

    def reset(self) -> None:
        """Forget every upload folded in, keeping the buffers for the next round's uploads."""
        self._sums = {}
        self._held = []
        self._samples = 0
        self._count = 0

    @property
    def count(self) -> int:
        """How many uploads were folded in."""
        return self._count

    @property
    def num_samples(self) -> int:
        """Total num_samples of the uploads folded in."""
        return self._samples

    def _buffer(self, key: str, shape: tuple[int, ...]) -> Array:
        """Return the float64 sum buffer for `key`, kept from earlier rounds when it fits."""
        total = self._buffers.get(key)
        if total is None or total.shape != shape:
            total = self._buffers[key] = np.empty(shape, dtype=np.float64)
        return total

    def _add_block(self, out: Array, x: Array, weight: float) -> None:
        """out += weight * x in float64 (x is at most one block: its product stays in cache)."""
        if weight == 1.0:
            np.add(out, x, out=out)  # the ufunc casts x to float64 chunk by chunk: same bits
            return
        scratch: Array | None = getattr(self._scratch, "block", None)
        if scratch is None:  # one block per thread: ranges are folded on several at once
            scratch = self._scratch.block = np.empty(_PAIR_BLOCK, dtype=np.float64)
        term = scratch[: x.size]
        np.multiply(x, weight, out=term, dtype=np.float64)  # float64, not float32 math
        np.add(out, term, out=out)

    def _sum_block(
        self, out: Array, sums: Array | None, xs: Sequence[Array], weights: Sequence[float]
    ) -> None:
        """out = (sums or 0) + n_1·x_1 + n_2·x_2 + …, added in that order, in float64."""
        first = 0
        if out is not sums:  # the first kept upload starts the sum: n_1·x_1 (+ sums)
            if weights[0] == 1.0:  # 1·x is x: a cast, half the time of a multiplication
                np.copyto(out, xs[0], casting="unsafe")
            else:
                np.multiply(xs[0], weights[0], out=out, dtype=np.float64)
            if sums is not None:
                np.add(out, sums, out=out)  # IEEE addition commutes: sums + n_1·x_1
            first = 1
        for x, weight in zip(xs[first:], weights[first:], strict=True):
            self._add_block(out, x, weight)

    def _fold_range(
        self,
        flat: Array,
        materialized: bool,
        xs: Sequence[Array],
        weights: Sequence[float],
        start: int,
        stop: int,
    ) -> None:
        """Fold xs[start:stop] into flat[start:stop] (which starts them, unless materialized)."""
        with _wide_casts():
            if materialized and len(xs) == 1 and weights[0] == 1.0:  # one ufunc call, same bits
                np.add(flat[start:stop], xs[0][start:stop], out=flat[start:stop])
                return
            for at in range(start, stop, _BLOCK):
                end = min(at + _BLOCK, stop)
                out = flat[at:end]
                self._sum_block(
                    out, out if materialized else None, [x[at:end] for x in xs], weights
                )

    def add(self, update: Update, parallel: bool = False, last: bool = False) -> None:
        """Count one upload in; fold the kept ones once there are enough of them.

        ``parallel``: a fold runs on several threads (`fedloop.parallel`).

        ``last``: the upload that closes the round. It is kept, whatever the count, for
        as_update to fold in the pass that divides the sums into the mean: each block of
        (sums + Σ n·y) / N is computed while in cache and written once, in the model's dtype,
        instead of a pass that writes the float64 sums and another that reads them back.
        """
        self.add_many([update], parallel, last)

    def add_many(
        self, updates: Sequence[Update], parallel: bool = False, last: bool = False
    ) -> None:
        """Count several uploads in, in order, as add() would one after another, except that
        uploads that came together are folded together: in one pass over the sums, whatever
        `max_held` (they are in memory already). ``last``: they close the round; all are kept
        for the pass that divides. The bits are those of adding them one at a time."""
        for update in updates:
            if self._count == 0:
                self._hold = self._hold_for(update)
            else:
                self._check_like(update)
            self._held.append(update)
            self._samples += update.num_samples
            self._count += 1
        if not last and self._full():
            self._fold(parallel)

    def _hold_for(self, first: Update) -> int:
        """How many uploads to keep before folding them, from the first upload's size."""
        nbytes = sum(np.asarray(t).nbytes for t in first.weights.values())
        return max(1, min(self.max_held, HOLD_BYTES // max(1, nbytes)))

    def _full(self, more: int = 0) -> bool:
        """Whether the kept uploads, with `more` besides, are enough to fold."""
        # The first upload waits for a second: one needs no sums, two are summed in one pass.
        return len(self._held) + more >= (self._hold if self._sums else max(2, self._hold))

    def folds(self, updates: Sequence[Update], last: bool = False) -> bool:
        """Whether add_many(updates, last=last) would fold (a pass over the model's sums),
        rather than only keep them: the caller can tell cheap calls from model-sized ones."""
        if last or not updates:
            return False
        if self._count == 0:
            hold = self._hold_for(updates[0])
            return len(updates) >= max(2, hold)
        return self._full(len(updates))

    def _reference(self, key: str) -> Array:
        """The tensor `key` that uploads are checked against: a kept upload's, or the sum."""
        if self._held:
            return np.asarray(self._held[0].weights[key])
        return self._sums[key]

    def _check_like(self, update: Update) -> None:
        """Raise ValueError unless the upload has the tensor names and sizes of the first."""
        names = set(self._held[0].weights if self._held else self._sums)
        if set(update.weights) != names:
            raise ValueError(f"update from agent {update.agent_id!r} has other tensor names")
        for key, tensor in update.weights.items():
            if np.asarray(tensor).size != self._reference(key).size:
                raise ValueError(
                    f"update from agent {update.agent_id!r}: {key!r} has another shape"
                )

    def _fold(self, parallel: bool) -> None:
        """Add n·y of every kept upload into the float64 sums, in one pass over them."""
        held, self._held = self._held, []
        materialized = bool(self._sums)
        weights = [float(u.num_samples) for u in held]
        folds: list[tuple[Array, list[Array]]] = []
        for key, tensor in held[0].weights.items():
            if not materialized:
                self._sums[key] = self._buffer(key, np.shape(tensor))
            xs = [np.asarray(u.weights[key]).reshape(-1) for u in held]
            folds.append((self._sums[key].reshape(-1), xs))
        # All tensors as one run of elements, cut into ranges on a few threads.
        split_tensors(
            [flat.size for flat, _ in folds],
            lambda i, start, stop: self._fold_range(
                folds[i][0], materialized, folds[i][1], weights, start, stop
            ),
            _BLOCK,
            parallel,
        )

    def _exact_single(self, like: Weights | None) -> Weights | None:
        """Return the one upload's tensors as its mean, if (n*y)/n == y exactly for them all.

        n*y is exact in float64 for float32 (or narrower) y when n < 2**29, and for any y when
        n == 1, so the division gives y back: the same bits as the float64 route, no copy.
        """
        if self._count != 1 or self._sums or like is None:
            return None
        first = self._held[0]
        n = first.num_samples
        out: Weights = {}
        for key, tensor in first.weights.items():
            array, target = np.asarray(tensor), like.get(key)
            exact = n == 1 or (array.dtype.kind == "f" and array.dtype.itemsize <= 4 and n < 2**29)
            if target is None or target.dtype.kind != "f" or target.shape != array.shape:
                return None
            if not (exact and array.dtype.kind == "f"):
                return None
            out[key] = np.asarray(array, dtype=target.dtype)
        return out

    def _mean(self, like: Weights | None, out: Weights | None = None) -> Weights:
        """Return (sums + Σ n·y of the kept uploads) / N: like's dtype where it is floating;
        into the arrays of `out` that have the mean's dtype and shape."""
        held = self._held
        n = self._samples
        weights: Weights = {}
        passes: list[tuple[Array, Array | None, list[Array]]] = []
        for key, tensor in (held[0].weights if held else self._sums).items():
            target = like.get(key) if like is not None else None
            shape = np.shape(tensor)
            dtype = np.dtype(np.float64)
            if target is not None and target.dtype.kind == "f" and target.shape == shape:
                dtype = target.dtype
            given = out.get(key) if out is not None else None
            if (
                given is not None
                and given.dtype == dtype
                and given.shape == shape
                and given.flags.c_contiguous
                and given.flags.writeable
            ):
                mean = weights[key] = given
            else:
                mean = weights[key] = np.empty(shape, dtype)
            sums = self._sums[key].reshape(-1) if self._sums else None
            xs = [np.asarray(u.weights[key]).reshape(-1) for u in held]
            passes.append((mean.reshape(-1), sums, xs))
        factors = [float(u.num_samples) for u in held]
        split_tensors(
            [flat.size for flat, _, _ in passes],
            lambda i, start, stop: self._finish_range(*passes[i], factors, n, start, stop),
            _BLOCK,
        )
        return weights

    def _finish_range(
        self,
        out: Array,
        sums: Array | None,
        xs: list[Array],
        weights: list[float],
        n: int,
        start: int,
        stop: int,
    ) -> None:
        """out[start:stop] = (sums + Σ n·x of the kept uploads) / N, block by block.

        The same float64 operations as folding each kept upload into the sums, then dividing,
        in the same order: the same bits, but one pass over the model. Two float32 uploads of
        equal num_samples are averaged in float32 instead, which gives those bits too
        (`_single_precision_pair`) in half the time: 0.55–0.75 ms against 1.2–1.9 ms for two
        4 MB uploads, caches evicted.
        """
        with _wide_casts():
            if not xs:  # the sums are complete: the division alone
                assert sums is not None
                _divide_range(sums, out, n, start, stop)
                return
            scratch: Array | None = getattr(self._scratch, "sum", None)
            if scratch is None:
                scratch = self._scratch.sum = np.empty(_PAIR_BLOCK, dtype=np.float64)
            block = _PAIR_BLOCK if len(xs) + (sums is not None) <= 2 else _BLOCK
            halves = sums is None and _single_precision_pair(out, xs, weights, n)
            for at in range(start, stop, block):
                end = min(at + block, stop)
                if halves and _half_sum(xs[0][at:end], xs[1][at:end], out[at:end]):
                    continue
                total = scratch[: end - at]
                base = sums[at:end] if sums is not None else None
                self._sum_block(total, base, [x[at:end] for x in xs], weights)
                _divide(total, n, out[at:end])

    def as_update(
        self,
        base_round: int = 0,
        agent_id: str = "running-mean",
        like: Weights | None = None,
        out: Weights | None = None,
    ) -> Update:
        """Return the weighted mean so far as one update carrying the total num_samples.

        With ``like`` (the global model), floating-point tensors come out in like's dtype,
        divided and cast in one pass: exactly ``cast_like(sum / n, like)``, which is what FedAvg
        returns for a single update, without a float64 copy of the model. Leave it out for
        strategies that compute on the mean (FedAdam, …): they get it in float64.

        ``out``: writable arrays to compute the mean into (e.g. `codec.encode_into`'s views of
        one buffer); a tensor whose dtype or shape differs from the mean's gets a new array.
        One upload whose tensors are its mean exactly is returned as it is (no copy).
        """
        if self._count == 0:
            raise ValueError("no update was folded in")
        if self._samples <= 0:
            raise ValueError("every folded update has num_samples=0")
        weights = self._exact_single(like)
        if weights is None:
            weights = self._mean(like, out)
        return Update(
            weights=weights,
            num_samples=self._samples,
            agent_id=agent_id,
            base_round=base_round,
        )


# --- state -----------------------------------------------------------------------------------


def check_state_tensors(
    state: Mapping[str, Array], global_weights: Weights, keys: Sequence[str], what: str
) -> None:
    """Raise ValueError unless the state holds exactly the given tensors with the global shapes."""
    if set(state) != set(keys):
        raise ValueError(
            f"{what} covers tensors {sorted(state)[:5]}..., the global model's floating tensors "
            f"are {list(keys)[:5]}...; the saved state belongs to another model"
        )
    for key in keys:
        if state[key].shape != global_weights[key].shape:
            raise ValueError(
                f"{what} for {key!r} has shape {state[key].shape}, "
                f"the global model's tensor {global_weights[key].shape}"
            )


def split_state(state: Weights, prefixes: Sequence[str], strategy: str) -> list[dict[str, Array]]:
    """Return, per prefix, the state tensors under it with the prefix removed, as float64 copies."""
    parts: list[dict[str, Array]] = [{} for _ in prefixes]
    for key, value in state.items():
        for part, prefix in zip(parts, prefixes, strict=True):
            if key.startswith(prefix):
                part[key[len(prefix) :]] = np.array(value, dtype=np.float64)
                break
        else:
            raise ValueError(
                f"state key {key!r} is not {strategy!r} state (expected prefixes {list(prefixes)})"
            )
    return parts


# --- parameters ------------------------------------------------------------------------------


def param_float(
    strategy: str,
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return the parameter as a float, or raise ConfigError saying which range it must be in."""
    number: float
    if isinstance(value, bool):
        number = math.nan
    elif isinstance(value, int | float | np.integer | np.floating):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
    else:
        number = math.nan
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b) or "finite"
        raise ConfigError(
            f"strategy {strategy!r}: parameter {name} must be a number {bounds}, got {value!r}; "
            "fix it in the strategy parameters"
        )
    return number


def param_int(strategy: str, name: str, value: object, *, low: int | None = None) -> int:
    """Return the parameter as an int, or raise ConfigError saying what it must be."""
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int | np.integer) or (isinstance(value, float) and value.is_integer()):
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            number = None
    if number is None or (low is not None and number < low):
        bound = "" if low is None else f" >= {low}"
        raise ConfigError(
            f"strategy {strategy!r}: parameter {name} must be an integer{bound}, got {value!r}; "
            "fix it in the strategy parameters"
        )
    return number


def param_choice(strategy: str, name: str, value: object, choices: Sequence[str]) -> str:
    """Return the parameter if it is one of the choices, else raise ConfigError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(
            f"strategy {strategy!r}: parameter {name} must be one of {', '.join(choices)}; "
            f"got {value!r}"
        )
    return value
