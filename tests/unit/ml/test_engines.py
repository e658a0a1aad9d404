"""ML engines: the digits FedAvg benchmark, determinism, FedProx, the models' shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from fedloop.errors import ConfigError, FedloopError  # noqa: E402
from fedloop.ml.engines import (  # noqa: E402
    TorchClassifier,
    digits_engine,
    digits_initial_weights,
    digits_test_set,
    mnist_engine,
)
from fedloop.ml.models import Net, PaperCNN  # noqa: E402
from fedloop.strategies import Update, create  # noqa: E402
from fedloop.types import Weights  # noqa: E402

MNIST = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "mnist"


def fedavg(results: list[tuple[Weights, int, dict[str, float]]]) -> Weights:
    total = sum(n for _, n, _ in results)
    return {
        k: (sum(w[k].astype(np.float64) * n for w, n, _ in results) / total).astype(w0.dtype)
        for k, w0 in results[0][0].items()
    }


def test_three_agents_fedavg_reach_90_percent_on_digits_in_five_rounds() -> None:
    agents = [digits_engine(i, 3, seed=0) for i in range(3)]
    weights = digits_initial_weights(0)
    accuracies = []
    for round_ in range(5):
        results = [a.train(weights, {"round": round_}) for a in agents]
        weights = fedavg(results)
        accuracies.append(agents[0].evaluate(weights, {})["accuracy"])
    assert accuracies[-1] >= 0.90, accuracies
    # Every agent evaluates on the same common test set.
    assert agents[1].evaluate(weights, {})["accuracy"] == accuracies[-1]


def test_train_returns_weights_samples_and_metrics() -> None:
    engine = digits_engine(0, 3, seed=0, epochs=1)
    w0 = digits_initial_weights(0)
    weights, n, metrics = engine.train(w0, {})
    assert n == engine.num_samples == 479  # 1,437 training digits / 3
    assert set(weights) == set(w0)
    assert all(weights[k].shape == w0[k].shape and weights[k].dtype == w0[k].dtype for k in w0)
    assert set(metrics) == {"loss", "accuracy", "local_steps", "local_momentum"}
    assert metrics["local_steps"] == 15  # ceil(479 / 32) for one epoch
    # FedNova's normaliser needs the momentum the optimizer ran with (SGD's 0.9 by default)
    assert metrics["local_momentum"] == engine.momentum == 0.9
    assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])
    assert engine.train(w0, {"epochs": 2})[2]["local_steps"] == 30
    assert set(engine.evaluate(weights, {})) == {"accuracy", "loss"}


def test_fednova_normalises_the_engines_momentum_sgd_as_the_paper() -> None:
    # Two agents run 15 and 45 steps of SGD with momentum 0.9 from the same global model.
    # FedNova must divide each one's progress by ||a_i||_1 of momentum SGD (Wang et al. 2020,
    # the sum of a_{i,k} = sum_{j <= tau-1-k} rho^j), not by tau_i as for plain SGD.
    w0 = digits_initial_weights(0)
    agents = [digits_engine(0, 3, seed=0, epochs=1), digits_engine(1, 3, seed=0, epochs=3)]
    results = [agent.train(w0, {"round": 0}) for agent in agents]
    updates = [Update(w, n, f"a{i}", 0, metrics=m) for i, (w, n, m) in enumerate(results)]
    got = create("fednova").aggregate(w0, updates)

    taus = [int(m["local_steps"]) for _, _, m in results]
    assert taus == [15, 45]
    a = [sum(sum(0.9**j for j in range(tau - k)) for k in range(tau)) for tau in taus]
    p = np.array([n for _, n, _ in results], dtype=np.float64)
    p /= p.sum()
    tau_eff = float(p @ np.array(a))
    for key, x in w0.items():
        x64 = x.astype(np.float64)
        d = sum(pi * (x64 - w[key].astype(np.float64)) / ai for pi, (w, _, _), ai in
                zip(p, results, a, strict=True))  # fmt: skip
        np.testing.assert_allclose(got[key], x64 - tau_eff * d, rtol=1e-5, atol=1e-6)


def test_zero_epochs_train_nothing_and_report_no_loss() -> None:
    engine = digits_engine(0, 3, seed=0, epochs=1)
    w0 = digits_initial_weights(0)
    weights, n, metrics = engine.train(w0, {"epochs": 0})
    assert n == 479 and all(np.array_equal(weights[k], w0[k]) for k in w0)
    # No NaN loss: the aggregator refuses non-finite metrics, and so the whole upload.
    assert set(metrics) == {"accuracy", "local_steps", "local_momentum"}
    assert metrics["local_steps"] == 0 and all(np.isfinite(v) for v in metrics.values())


def test_training_is_deterministic_for_a_seed() -> None:
    w0 = digits_initial_weights(3)
    a = digits_engine(1, 2, seed=3, epochs=1).train(w0, {"round": 4})
    b = digits_engine(1, 2, seed=3, epochs=1).train(w0, {"round": 4})
    assert a[2] == b[2]
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k])


def test_initial_weights_are_the_same_for_every_caller_and_differ_by_seed() -> None:
    torch.manual_seed(123)  # the global generator must not matter
    a = digits_initial_weights(0)
    torch.rand(5)
    b = digits_initial_weights(0)
    c = digits_initial_weights(1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["fc1.weight"], c["fc1.weight"])
    engine = digits_engine(0, 2, seed=0)
    assert all(np.array_equal(engine.initial_weights()[k], a[k]) for k in a)


def test_proximal_mu_keeps_local_model_near_the_global_one() -> None:
    w0 = digits_initial_weights(0)

    def drift(mu: float) -> float:
        w, _, _ = digits_engine(0, 3, seed=0, epochs=1).train(w0, {"proximal_mu": mu})
        return float(sum(np.sum((w[k] - w0[k]) ** 2) for k in w0))

    assert drift(10.0) < 0.5 * drift(0.0)


def test_common_test_set_and_split_are_disjoint() -> None:
    x_test, y_test = digits_test_set(0)
    assert x_test.shape == (360, 1, 8, 8) and x_test.dtype == np.float32
    assert x_test.min() >= 0.0 and x_test.max() <= 1.0
    assert np.bincount(y_test).min() >= 35  # stratified: 10 classes of ~36


def test_bad_agent_index_and_config_raise() -> None:
    with pytest.raises(ConfigError, match="agent_index"):
        digits_engine(3, 3)
    engine = digits_engine(0, 3, epochs=1)
    with pytest.raises(ConfigError, match="lr"):
        engine.train(digits_initial_weights(0), {"lr": -1})
    with pytest.raises(FedloopError, match="missing"):
        engine.train({"fc1.weight": np.zeros((120, 256), np.float32)}, {})


def test_engine_without_test_set_evaluates_to_nothing() -> None:
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    y = np.arange(20) % 10
    engine = TorchClassifier(lambda: Net(8), (x, y), None, epochs=1)
    w, n, metrics = engine.train(engine.initial_weights(), {})
    assert n == 20 and "accuracy" not in metrics
    assert engine.evaluate(w, {}) == {}


@pytest.mark.parametrize(
    ("in_size", "channels", "flat"), [(8, 1, 256), (28, 1, 256), (32, 3, 400), (16, 1, 256)]
)
def test_net_adapts_to_input_size(in_size: int, channels: int, flat: int) -> None:
    net = Net(in_size, in_channels=channels)
    assert net.fc1.in_features == flat
    assert net(torch.zeros(2, channels, in_size, in_size)).shape == (2, 10)


def test_paper_cnn_has_the_papers_shape() -> None:
    net = PaperCNN()
    assert sum(p.numel() for p in net.parameters()) == 1_663_370
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST files not found at {MNIST}")
def test_mnist_engine_trains_on_its_share() -> None:
    engine = mnist_engine(MNIST, 0, 60, seed=0, epochs=3)
    assert engine.num_samples == 1000
    _, n, metrics = engine.train(engine.initial_weights(), {})
    assert n == 1000 and metrics["accuracy"] > 0.5
