"""The no-training engine of the benchmarks: unchanged models, or each one different."""

from __future__ import annotations

import numpy as np

from fedloop.ml.noop import NoopEngine
from fedloop.protocol import codec


def test_noop_returns_the_global_model_itself() -> None:
    engine = NoopEngine(model_mb=0.01)
    weights = engine.initial_weights()
    out, samples, metrics = engine.train(weights, {})
    assert samples == 1 and metrics == {}
    assert all(out[k] is weights[k] for k in weights)


def test_vary_gives_every_local_model_its_own_bytes_and_nothing_else_changes() -> None:
    engine, other = NoopEngine(model_mb=0.01, vary=True), NoopEngine(model_mb=0.01, vary=True)
    weights = engine.initial_weights()
    before = {k: v.copy() for k, v in weights.items()}
    first, _, _ = engine.train(weights, {})
    second, _, _ = engine.train(weights, {})
    third, _, _ = other.train(weights, {})
    encoded = [codec.encode(first), codec.encode(second), codec.encode(third)]
    assert len(set(encoded)) == 3 and codec.encode(weights) not in encoded
    for key in weights:
        np.testing.assert_array_equal(weights[key], before[key])  # the input is untouched
        assert first[key].shape == weights[key].shape and first[key].dtype == np.float32
    name = next(iter(weights))
    changed = np.flatnonzero(first[name] != weights[name])
    assert set(changed) <= {0, 1}
    assert all(first[k] is weights[k] for k in list(weights)[1:])  # not copied


def test_vary_comes_from_set_on_the_command_line() -> None:
    from fedloop._loading import load_engine, parse_sets

    engine = load_engine("fedloop.ml.noop:NoopEngine", **parse_sets(["model_mb=0.01", "vary=1"]))
    assert isinstance(engine, NoopEngine) and engine.vary
