"""fedloop.parallel: model-sized passes cut into ranges on threads, with the bits of one pass."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from uploads import float32_updates

from fedloop import parallel
from fedloop.errors import ProtocolError
from fedloop.protocol.codec import ModelSpec, all_finite, check_against
from fedloop.strategies import FedAvg, RunningMean, Update, base

BIG = parallel.MIN_SPLIT * 2 + 3 * 65536 + 11  # over the split size, not a multiple of a block


def _float64_mean(updates: list[Update], key: str) -> np.ndarray:
    """(n1·y1 + n2·y2) + … over whole float64 arrays, divided by the total: the reference."""
    total = updates[0].weights[key].astype(np.float64) * updates[0].num_samples
    for update in updates[1:]:
        total += update.weights[key].astype(np.float64) * update.num_samples
    result: np.ndarray = total / sum(u.num_samples for u in updates)
    return result


@pytest.fixture(autouse=True)
def three_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # Split in 3 whatever this machine's CPUs (CI may have 1 or 2).
    monkeypatch.setattr(parallel, "threads", lambda: 3)


@pytest.mark.parametrize("size", [0, 1, 65536, BIG])
def test_ranges_cover_every_element_once_on_aligned_bounds(size: int) -> None:
    cuts = parallel.ranges(size, 3, 65536)
    assert cuts[0][0] == 0 and cuts[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(cuts))
    assert all(start % 65536 == 0 for start, _ in cuts) and len(cuts) <= 3


def test_split_runs_large_work_on_several_threads_in_order() -> None:
    seen: list[tuple[int, int, int]] = []
    out = parallel.split(BIG, lambda a, b: seen.append((a, b, threading.get_ident())) or a)
    assert out == sorted(out) and len(out) == 3
    assert len({ident for _, _, ident in seen}) > 1
    assert parallel.split(100, lambda a, b: (a, b)) == [(0, 100)]  # small: one call


@pytest.mark.parametrize("counts", [(1, 1), (3, 1, 7), (2, 5, 1, 4)])
def test_a_split_fold_has_the_bits_of_the_whole_array_float64_mean(
    counts: tuple[int, ...],
) -> None:
    updates = float32_updates({"big": BIG}, counts, seed=11)
    running = RunningMean()
    for update in updates:
        running.add(update, parallel=True)
    expected = _float64_mean(updates, "big")
    np.testing.assert_array_equal(running.as_update().weights["big"], expected)
    like = {"big": np.zeros(BIG, np.float32)}
    fast = FedAvg().aggregate(like, [running.as_update(like=like)])["big"]
    assert fast.dtype == np.float32
    np.testing.assert_array_equal(fast, expected.astype(np.float32))


@pytest.mark.parametrize("where", [0, BIG // 2, BIG - 1])
def test_all_finite_finds_a_nan_in_any_range(where: int) -> None:
    x = np.ones(BIG, np.float32)
    assert all_finite(x, parallel=True)
    x[where] = np.nan
    assert not all_finite(x, parallel=True) and not all_finite(x)


# One run of 1.8 × MIN_SPLIT elements in tensors of all sizes: cut in 3, inside tensors.
SIZES = [5, 0, parallel.MIN_SPLIT // 2 + 7, 3, parallel.MIN_SPLIT // 3, parallel.MIN_SPLIT + 1]


def test_split_tensors_covers_each_tensor_once_in_order() -> None:
    pieces = parallel.split_tensors(SIZES, lambda i, a, b: (i, a, b))
    assert [i for i, _, _ in pieces] == sorted(i for i, _, _ in pieces)
    for i, size in enumerate(SIZES):
        mine = [(a, b) for j, a, b in pieces if j == i]
        if size == 0:
            assert not mine
            continue
        assert mine[0][0] == 0 and mine[-1][1] == size
        assert all(x[1] == y[0] for x, y in itertools.pairwise(mine))
    assert len({(a, b) for _, a, b in pieces}) > len([s for s in SIZES if s])  # some were cut


def test_a_fold_of_many_tensors_has_the_bits_of_the_whole_array_mean() -> None:
    names = [f"t{i}" for i in range(len(SIZES))]
    shapes = dict(zip(names, SIZES, strict=True))
    updates = float32_updates(shapes, (3, 1, 7), seed=5)
    running = RunningMean()
    for update in updates:
        running.add(update, parallel=True)
    like = {k: np.zeros(n, np.float32) for k, n in shapes.items()}
    mean = running.as_update(like=like).weights
    for key in names:
        np.testing.assert_array_equal(mean[key], _float64_mean(updates, key).astype(np.float32))


@pytest.mark.parametrize("tensor", [2, 4, 5])
def test_check_against_names_the_tensor_with_a_nan(tensor: int) -> None:
    weights = {f"t{i}": np.ones(n, np.float32) for i, n in enumerate(SIZES)}
    spec = ModelSpec.of(weights)
    check_against(weights, spec, parallel=True)
    weights[f"t{tensor}"][-1] = np.inf
    for threaded in (True, False):
        with pytest.raises(ProtocolError, match=f"'t{tensor}' contains NaN or Inf"):
            check_against(weights, spec, parallel=threaded)
    check_against(weights, spec, finite=False)


def _mean_of(updates: list[Update], last: set[int], like: dict[str, np.ndarray] | None) -> dict:
    """Fold the uploads (those at the indices in `last` with ``last=True``) and return the mean."""
    running = RunningMean()
    for i, update in enumerate(updates):
        running.add(update, parallel=True, last=i in last)
    return running.as_update(like=like).weights


@pytest.mark.parametrize("counts", [(3, 1), (1, 1), (3, 1, 7), (2, 5, 1, 4)])
@pytest.mark.parametrize("with_like", [True, False])
def test_a_last_upload_folded_with_the_division_has_the_bits_of_fold_then_divide(
    counts: tuple[int, ...], with_like: bool
) -> None:
    # The round-closing upload is kept and folded in the pass that divides (and casts): with
    # two uploads the float64 sums are never written. The bits must be those of the plain
    # float64 fold followed by the division, over tensors cut in 3 on threads and in blocks.
    shapes = {"big": BIG, "small": 7, "block": 65536 + 1}
    updates = float32_updates(shapes, counts, seed=3)
    like = {k: np.zeros(n, np.float32) for k, n in shapes.items()} if with_like else None
    plain = _mean_of(updates, set(), like)
    fused = _mean_of(updates, {len(updates) - 1}, like)
    for key in shapes:
        expected = _float64_mean(updates, key)
        if with_like:
            expected = expected.astype(np.float32)
        assert fused[key].dtype == expected.dtype
        np.testing.assert_array_equal(fused[key], expected)
        np.testing.assert_array_equal(fused[key], plain[key])


def test_an_upload_after_a_kept_last_one_folds_it_first_and_as_update_repeats() -> None:
    # A batch can hold more uploads than the round needs: each one past the threshold is
    # "last" in turn. The mean must count every upload once, however often it is asked for.
    shapes = {"big": BIG, "small": 5}
    updates = float32_updates(shapes, (2, 3, 1, 6), seed=9)
    like = {k: np.zeros(n, np.float32) for k, n in shapes.items()}
    running = RunningMean()
    for i, update in enumerate(updates):
        running.add(update, parallel=True, last=i >= 1)
    assert running.count == 4 and running.num_samples == 12
    first = running.as_update(like=like).weights
    again = running.as_update(like=like).weights
    for key in shapes:
        expected = _float64_mean(updates, key).astype(np.float32)
        np.testing.assert_array_equal(first[key], expected)
        np.testing.assert_array_equal(again[key], expected)


def test_a_kept_last_upload_of_another_shape_is_refused_when_added() -> None:
    updates = float32_updates({"w": 10}, (1, 1), seed=1)
    wrong = Update(
        weights={"w": np.zeros(11, np.float32)}, num_samples=1, agent_id="x", base_round=0
    )
    running = RunningMean()
    running.add(updates[0])
    with pytest.raises(ValueError, match="another shape"):
        running.add(wrong, last=True)
    running.add(updates[1], last=True)  # the refused one changed nothing
    assert running.count == 2
    mean = running.as_update(like={"w": np.zeros(10, np.float32)}).weights["w"]
    np.testing.assert_array_equal(mean, _float64_mean(updates, "w").astype(np.float32))


@pytest.mark.parametrize("counts", [(1,), (1, 1), (3, 1), (5, 3), (1, 1, 1, 1), (7, 9), (1, 2)])
def test_a_mean_over_a_power_of_two_samples_has_the_bits_of_the_division(
    counts: tuple[int, ...],
) -> None:
    # N a power of two is divided by multiplying with 1/N (exact): the bits must be those of
    # the division, tiny and subnormal values included; other N (here 3) still divide.
    shapes = {"big": BIG, "small": 5}
    updates = float32_updates(shapes, counts, seed=3)
    for update in updates:
        update.weights["small"][:] = [1e-45, -3e-39, 1.5e-38, 3.4e38, -0.0]
    like = {k: np.zeros(n, np.float32) for k, n in shapes.items()}
    running = RunningMean()
    for i, update in enumerate(updates):
        running.add(update, parallel=True, last=i == len(updates) - 1)
    closed = running.as_update(like=like).weights
    folded = RunningMean()
    for update in updates:
        folded.add(update)  # from two on, folded as they come: the sums divided on their own
    divided = folded.as_update().weights
    for key in shapes:
        expected = _float64_mean(updates, key)
        np.testing.assert_array_equal(divided[key], expected)
        np.testing.assert_array_equal(closed[key], expected.astype(np.float32))


@pytest.mark.parametrize("counts", [(1, 1), (3, 1, 7)])
def test_a_mean_computed_into_given_arrays_lands_in_them_with_the_same_bits(
    counts: tuple[int, ...],
) -> None:
    # The aggregator has the mean written straight into the new global model's buffer: the
    # arrays it gives are filled in place, a given array of another dtype or shape is left
    # alone for a new one, and the bits are those of the float64 route.
    shapes = {"big": BIG, "small": 7, "other": 5}
    updates = float32_updates(shapes, counts, seed=13)
    like = {k: np.zeros(n, np.float32) for k, n in shapes.items()}
    given = {
        "big": np.full(BIG, np.nan, np.float32),
        "small": np.full(7, np.nan, np.float32),
        "other": np.full(5, np.nan, np.float64),  # not the mean's dtype
    }
    running = RunningMean()
    for i, update in enumerate(updates):
        running.add(update, parallel=True, last=i == len(updates) - 1)
    mean = running.as_update(like=like, out=given).weights
    assert mean["big"] is given["big"] and mean["small"] is given["small"]
    assert mean["other"] is not given["other"] and np.isnan(given["other"]).all()
    for key in shapes:
        expected = _float64_mean(updates, key).astype(np.float32)
        np.testing.assert_array_equal(mean[key], expected)


def test_a_fold_leaves_numpys_cast_buffer_as_it_was() -> None:
    # The folds widen NumPy's casting buffer while they run, on whichever thread runs a range,
    # and put the caller's setting back.
    updates = float32_updates({"big": BIG}, (1, 2, 3), seed=2)
    before = np.getbufsize()
    seen: list[int] = []

    def fold_and_look() -> None:
        running = RunningMean()
        for i, update in enumerate(updates):
            running.add(update, parallel=True, last=i == 2)
        running.as_update(like={"big": np.zeros(BIG, np.float32)})
        seen.append(np.getbufsize())

    fold_and_look()
    worker = threading.Thread(target=fold_and_look)
    worker.start()
    worker.join()
    assert np.getbufsize() == before and seen == [before, before]
    pool_sizes = parallel.split(BIG, lambda a, b: np.getbufsize())
    assert set(pool_sizes) == {before}


@pytest.mark.parametrize("max_held", [1, 3])
@pytest.mark.parametrize("batches", [[1, 1, 1, 1, 1], [2, 1, 2], [1, 3, 1], [4, 1]])
def test_folds_says_whether_add_many_folds(max_held: int, batches: list[int]) -> None:
    updates = float32_updates({"w": 8}, [1] * sum(batches), seed=3)
    running = RunningMean(max_held=max_held)
    for _ in range(2):  # after reset() it starts again from a first upload
        at = 0
        for b, size in enumerate(batches):
            batch = updates[at : at + size]
            at += size
            last = b == len(batches) - 1
            assert running.folds(batch, last=True) is False
            predicted = running.folds(batch, last=last)
            kept = len(running._held)
            running.add_many(batch, last=last)
            assert predicted is (len(running._held) < kept + len(batch))  # a fold empties it
        running.reset()


def test_over_http_the_first_and_the_closing_upload_fold_nothing() -> None:
    first, second, third, closing = float32_updates({"w": 8}, [1, 1, 1, 1], seed=4)
    running = RunningMean()  # the aggregator's: max_held 1
    assert running.folds([first]) is False  # kept until a second comes
    running.add(first)
    assert running.folds([second]) is True  # the two are summed
    running.add(second)
    assert running.folds([third]) is True
    running.add(third)
    assert running.folds([closing], last=True) is False  # folded by the division


def _any_finite_float32(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float32 values from random bit patterns: subnormals, zeros of both signs, values near
    the largest float32; NaN and infinities replaced by 1.5."""
    bits = rng.integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(bits), bits, np.float32(1.5))


def _pair_mean(a: np.ndarray, b: np.ndarray, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The bits of the closing pass's mean of a and b, and of the float64 reference's."""
    updates = [
        Update(weights={"w": x}, num_samples=samples, agent_id=name, base_round=0)
        for name, x in (("a", a), ("b", b))
    ]
    running = RunningMean()
    running.add(updates[0])
    running.add(updates[1], last=True)
    mean = running.as_update(like={"w": np.zeros_like(a)}).weights["w"]
    reference = _float64_mean(updates, "w").astype(np.float32)
    return mean.view(np.uint32), reference.view(np.uint32)


@pytest.mark.parametrize("samples", [1, 2, 3, 7, 12345, 2**28 - 1])
def test_two_uploads_of_equal_samples_have_the_bits_of_the_float64_mean_in_float32(
    samples: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two float32 uploads with the same num_samples are averaged in float32, (x + y) · 0.5:
    # the bits must be those of the float64 route, every bit pattern included (subnormal
    # halves, signed zeros, exponents far apart, sums past the largest float32).
    rng = np.random.default_rng(samples)
    size = 3 * parallel.MIN_SPLIT + 5
    a, b = _any_finite_float32(rng, size), _any_finite_float32(rng, size)
    b[:1000] = -a[:1000]  # exact cancellation: +0.0
    b[1000:2000] = a[1000:2000] * np.float32(0.75)  # close values, same sign
    a[2000:3000], b[2000:3000] = np.float32(3.0e38), np.float32(2.9e38)  # overflows float32
    a[3000:3010], b[3000:3010] = -0.0, -0.0
    # Integers of 24 bits whose sums need 25: every odd sum's half is a float32 tie, which
    # the float64 route rounds to even only while samples · sum is exact (samples < 2**28).
    a[4000:6000] = rng.integers(2**23, 2**24, 2000)
    b[4000:6000] = rng.integers(2**23, 2**24, 2000)
    halved: list[int] = []
    half_sum = base._half_sum

    def counting(x: np.ndarray, y: np.ndarray, out: np.ndarray) -> bool:
        done = half_sum(x, y, out)
        halved.append(int(done))
        return done

    monkeypatch.setattr(base, "_half_sum", counting)
    np.testing.assert_array_equal(*_pair_mean(a, b, samples))
    assert 1 in halved, "the float32 route was never taken"
    assert 0 in halved, "the block that overflows float32 was not computed again in float64"


@pytest.mark.parametrize("counts", [(1, 1), (1, 3), (2, 1, 5)])
def test_a_mean_ignores_a_callers_raising_error_state(counts: tuple[int, ...]) -> None:
    # A mean that rounds to a subnormal raises the underflow flag, on the float32 route and
    # the float64 one; a caller's np.seterr(all="raise") must not fail the aggregation.
    updates = float32_updates({"w": 3}, counts, seed=2)
    updates[0].weights["w"][:] = [1e-45, 3e-45, 1.0]  # (1e-45 + 0) / 2 rounds
    for update in updates[1:]:
        update.weights["w"][:] = [0.0, 0.0, 3.0]
    running = RunningMean()
    for i, update in enumerate(updates):
        running.add(update, last=i == len(updates) - 1)
    with np.errstate(all="raise"):
        mean = running.as_update(like={"w": np.zeros(3, np.float32)}).weights["w"]
    reference = _float64_mean(updates, "w").astype(np.float32)
    np.testing.assert_array_equal(mean.view(np.uint32), reference.view(np.uint32))


def test_a_tie_with_samples_of_2_to_the_28_or_more_keeps_the_float64_route() -> None:
    # (1 + 2**24) / 2 is halfway between two float32 values. Float32 rounds it to even; the
    # float64 route, whose (2**29 - 1)·(1 + 2**24) is rounded, goes up. The mean must be
    # the float64 route's.
    a, b = np.array([1.0], np.float32), np.array([2.0**24], np.float32)
    mean, reference = _pair_mean(a, b, 2**29 - 1)
    assert mean[0] == reference[0] == np.float32(2.0**23 + 1).view(np.uint32)
    assert (a + b)[0] * np.float32(0.5) == np.float32(2.0**23)  # what float32 would give


@given(
    pair=hnp.arrays(
        np.float32,
        st.integers(1, 64).map(lambda n: (2, n)),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    samples=st.integers(1, 2**29 - 1),
)
@settings(max_examples=300, deadline=None)
def test_the_float32_pair_mean_has_the_float64_bits_for_any_values(
    pair: np.ndarray, samples: int
) -> None:
    np.testing.assert_array_equal(*_pair_mean(pair[0].copy(), pair[1].copy(), samples))


@pytest.mark.parametrize(
    ("counts", "dtype"), [((1, 2), np.float32), ((3, 1), np.float32), ((1, 1), np.float64)]
)
def test_pairs_of_unequal_samples_or_other_dtypes_keep_the_float64_route(
    counts: tuple[int, int], dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object) -> bool:
        raise AssertionError("the float32 route was taken")

    monkeypatch.setattr(base, "_half_sum", refuse)
    updates = float32_updates({"w": 1000}, counts, seed=5)
    for update in updates:
        update.weights["w"] = update.weights["w"].astype(dtype)
    running = RunningMean()
    running.add(updates[0])
    running.add(updates[1], last=True)
    mean = running.as_update(like={"w": np.zeros(1000, dtype)}).weights["w"]
    np.testing.assert_array_equal(mean, _float64_mean(updates, "w").astype(dtype))
