"""The built-in engines' SCAFFOLD and FedCurv local training against the papers' formulas,
recomputed in plain numpy: TorchClassifier (a linear softmax classifier, whose gradients are
written by hand here) and the simulation's LogRegEngine.

SCAFFOLD (Karimireddy et al. 2020, Algorithm 1): y <- y - lr (g(y) - c_i + c) for K steps from
x, then Delta c_i = c_i+ - c_i with option II, c_i+ = c_i - c + (x - y) / (K lr).
FedCurv (Shoham et al. 2019): the gradient of lambda sum_{j != s} (w - w_j)^T diag(F_j) (w - w_j)
is 2 lambda (sum_j F_j * w - sum_j F_j * w_j); the uploaded F is the mean squared per-sample
gradient of the negative log-likelihood at the trained weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from fedloop.errors import ConfigError  # noqa: E402
from fedloop.ml.engines import TorchClassifier  # noqa: E402
from fedloop.sim.engines import logreg_engine  # noqa: E402

rng = np.random.default_rng(3)
N, D, C = 24, 4, 3
X = rng.standard_normal((N, D)).astype(np.float32)
Y = rng.integers(0, C, N)
ONEHOT = np.eye(C)[Y]
LR, EPOCHS = 0.1, 4


def _engine() -> TorchClassifier:
    # One full batch per epoch: K = EPOCHS steps on the same data, whatever the shuffle.
    return TorchClassifier(
        lambda: nn.Linear(D, C), (X, Y), epochs=EPOCHS, batch_size=N, lr=LR, momentum=0.9
    )


def _start() -> dict[str, np.ndarray]:
    return {
        "weight": rng.standard_normal((C, D)).astype(np.float32) * 0.3,
        "bias": rng.standard_normal(C).astype(np.float32) * 0.3,
    }


def _residual(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """p - onehot per sample: d(-log p_y)/dz of softmax cross-entropy."""
    z = X.astype(np.float64) @ weight.T + bias
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(p / p.sum(axis=1, keepdims=True) - ONEHOT)


def _grads(weight: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
    r = _residual(weight, bias) / N  # mean cross-entropy
    return {"weight": r.T @ X.astype(np.float64), "bias": r.sum(axis=0)}


def _descend(start: dict[str, np.ndarray], extra: Any) -> dict[str, np.ndarray]:
    """K plain gradient steps with the cross-entropy gradient plus extra(w)."""
    w = {k: v.astype(np.float64) for k, v in start.items()}
    for _ in range(EPOCHS):
        g = _grads(w["weight"], w["bias"])
        w = {k: w[k] - LR * (g[k] + extra(k, w[k])) for k in w}
    return w


def test_torch_scaffold_corrects_every_step_and_uploads_option_two() -> None:
    x = _start()
    c = {k: rng.standard_normal(v.shape) * 0.5 for k, v in x.items()}
    ci = {k: rng.standard_normal(v.shape) * 0.5 for k, v in x.items()}
    state = {f"scaffold.c/{k}": v for k, v in c.items()}
    state.update({f"scaffold.ci/{k}": v for k, v in ci.items()})
    new, n, metrics = _engine().train(x, {"strategy": "scaffold", "strategy_state": state})
    assert n == N and metrics["local_steps"] == EPOCHS and metrics["local_momentum"] == 0
    # momentum 0.9 is off: the paper's plain SGD steps with g - c_i + c
    expected = _descend(x, lambda k, w: -ci[k] + c[k])
    for k in x:
        np.testing.assert_allclose(new[k], expected[k], rtol=1e-5, atol=1e-6)
        dc = new[f"scaffold.dc/{k}"]
        assert dc.dtype == np.float32 and dc.shape == x[k].shape
        option_two = -c[k] + (x[k].astype(np.float64) - new[k]) / (EPOCHS * LR)
        np.testing.assert_allclose(dc, option_two, rtol=1e-5, atol=1e-5)
    assert sorted(new) == ["bias", "scaffold.dc/bias", "scaffold.dc/weight", "weight"]


def test_torch_fedcurv_adds_the_penalty_gradient_and_uploads_the_fisher_diagonal() -> None:
    x = _start()
    lam = 0.3
    f = {k: rng.random(v.shape) for k, v in x.items()}
    fw = {k: rng.standard_normal(v.shape) for k, v in x.items()}
    state = {f"fedcurv.fisher/{k}": v for k, v in f.items()}
    state.update({f"fedcurv.fw/{k}": v for k, v in fw.items()})
    config = {"strategy": "fedcurv", "strategy_state": state, "fedcurv_lambda": lam}
    new, _, _ = TorchClassifier(
        lambda: nn.Linear(D, C), (X, Y), epochs=EPOCHS, batch_size=N, lr=LR, momentum=0.0
    ).train(x, config)
    expected = _descend(x, lambda k, w: 2 * lam * (f[k] * w - fw[k]))
    for k in x:
        np.testing.assert_allclose(new[k], expected[k], rtol=1e-5, atol=1e-6)
    # F at the trained weights: mean over samples of the squared per-sample gradients
    r = _residual(new["weight"].astype(np.float64), new["bias"].astype(np.float64))
    fisher = {
        "weight": np.mean((r[:, :, None] * X[:, None, :].astype(np.float64)) ** 2, axis=0),
        "bias": np.mean(r**2, axis=0),
    }
    for k in x:
        np.testing.assert_allclose(new[f"fedcurv.fisher/{k}"], fisher[k], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(new[f"fedcurv.fw/{k}"], fisher[k] * new[k], rtol=1e-4, atol=1e-7)
    # round 1: no sums yet, no penalty; the Fisher diagonal still goes up
    first, _, _ = _engine().train(x, {"strategy": "fedcurv", "strategy_state": {}})
    assert "fedcurv.fisher/weight" in first


def test_torch_engine_names_the_strategy_it_cannot_run() -> None:
    with pytest.raises(ConfigError, match="does not support strategy 'fedfancy'"):
        _engine().train(_start(), {"strategy": "fedfancy", "strategy_state": {}})
    with pytest.raises(ConfigError, match="lacks"):
        _engine().train(_start(), {"strategy": "scaffold", "strategy_state": {}})


def _logreg() -> Any:
    # samples=20: agent 0 gets 10..30 samples, all in one batch of 64
    return logreg_engine(0, 1, features=5, samples=20, batch_size=64, epochs=EPOCHS, lr=LR)


def _logreg_descend(engine: Any, w0: np.ndarray, b0: float, extra: Any) -> tuple[Any, float]:
    x, y = engine.x.astype(np.float64), engine.y.astype(np.float64)
    w, b = w0.astype(np.float64), float(b0)
    for _ in range(EPOCHS):
        err = 1 / (1 + np.exp(-(x @ w + b))) - y
        gw, gb = x.T @ err / len(y) + extra("w", w), err.mean() + extra("b", b)
        w, b = w - LR * gw, b - LR * gb
    return w, b


def test_logreg_scaffold_and_fedcurv_follow_the_papers() -> None:
    engine = _logreg()
    start = {"w": rng.standard_normal(5).astype(np.float32), "b": np.array([0.2], np.float32)}
    c = {"w": rng.standard_normal(5), "b": rng.standard_normal(1)}
    ci = {"w": rng.standard_normal(5), "b": rng.standard_normal(1)}
    state = {f"scaffold.c/{k}": v for k, v in c.items()}
    state.update({f"scaffold.ci/{k}": v for k, v in ci.items()})
    new, _, _ = engine.train(start, {"strategy": "scaffold", "strategy_state": state})
    w, b = _logreg_descend(engine, start["w"], start["b"][0], lambda k, v: c[k] - ci[k])
    np.testing.assert_allclose(new["w"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["b"], np.ravel(b), rtol=1e-5, atol=1e-6)
    for k in start:
        option_two = -c[k] + (start[k].astype(np.float64) - new[k]) / (EPOCHS * LR)
        np.testing.assert_allclose(new[f"scaffold.dc/{k}"], option_two, rtol=1e-5, atol=1e-5)

    lam = 0.7
    f = {"w": rng.random(5), "b": rng.random(1)}
    fw = {"w": rng.standard_normal(5), "b": rng.standard_normal(1)}
    state = {f"fedcurv.fisher/{k}": v for k, v in f.items()}
    state.update({f"fedcurv.fw/{k}": v for k, v in fw.items()})
    config = {"strategy": "fedcurv", "strategy_state": state, "fedcurv_lambda": lam}
    new, _, _ = engine.train(start, config)
    w, b = _logreg_descend(
        engine, start["w"], start["b"][0], lambda k, v: 2 * lam * (f[k] * v - fw[k])
    )
    np.testing.assert_allclose(new["w"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["b"], np.ravel(b), rtol=1e-5, atol=1e-6)
    x, y = engine.x.astype(np.float64), engine.y.astype(np.float64)
    err = 1 / (1 + np.exp(-(x @ new["w"].astype(np.float64) + float(new["b"][0])))) - y
    fisher = {"w": np.mean((err[:, None] * x) ** 2, axis=0), "b": np.array([np.mean(err**2)])}
    for k in start:
        np.testing.assert_allclose(new[f"fedcurv.fisher/{k}"], fisher[k], rtol=1e-5)
        np.testing.assert_allclose(new[f"fedcurv.fw/{k}"], fisher[k] * new[k], rtol=1e-5)
    with pytest.raises(ConfigError, match="does not support strategy 'fedfancy'"):
        engine.train(start, {"strategy": "fedfancy"})
