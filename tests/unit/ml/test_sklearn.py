"""scikit-learn adapter: Weights round trips and initialising an unfitted model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neural_network import MLPClassifier

from fedloop.errors import FedloopError
from fedloop.ml import data
from fedloop.ml.sklearn import init_model, load_weights, to_weights


def breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    x, y = data.load_breast_cancer()
    return (x - x.mean(axis=0)) / x.std(axis=0), y


@pytest.mark.parametrize(
    "make",
    [
        lambda: LogisticRegression(max_iter=200),
        lambda: SGDClassifier(loss="log_loss", random_state=0),
        lambda: MLPClassifier((8, 4), max_iter=50, random_state=0),
    ],
)
def test_round_trip_gives_identical_predictions(make: Any) -> None:
    x, y = breast_cancer()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = make().fit(x, y)
    w = to_weights(fitted)
    fresh = init_model(make(), n_features=x.shape[1], classes=[0, 1])
    load_weights(fresh, w)
    np.testing.assert_array_equal(fresh.predict_proba(x), fitted.predict_proba(x))
    assert all(np.array_equal(a, to_weights(fresh)[k]) for k, a in w.items())


def test_weight_names_and_shapes() -> None:
    lr = init_model(LogisticRegression(), 30, [0, 1])
    w = to_weights(lr)
    assert {k: v.shape for k, v in w.items()} == {"coef": (1, 30), "intercept": (1,)}
    assert not np.any(w["coef"])
    multi = to_weights(init_model(SGDClassifier(), 64, list(range(10))))
    assert multi["coef"].shape == (10, 64) and multi["intercept"].shape == (10,)
    mlp = init_model(MLPClassifier((16,)), 64, list(range(10)), seed=1)
    shapes = {k: v.shape for k, v in to_weights(mlp).items()}
    assert shapes == {
        "coefs.0": (64, 16),
        "intercepts.0": (16,),
        "coefs.1": (16, 10),
        "intercepts.1": (10,),
    }
    assert np.std(to_weights(mlp)["coefs.0"]) > 0  # not zeros: hidden units must differ
    again = to_weights(init_model(MLPClassifier((16,)), 64, list(range(10)), seed=1))
    assert all(np.array_equal(v, again[k]) for k, v in to_weights(mlp).items())


def test_init_model_keeps_the_models_own_parameters() -> None:
    model = init_model(LogisticRegression(max_iter=321), 4, [0, 1])
    assert model.max_iter == 321


def test_warm_start_training_continues_from_loaded_weights() -> None:
    x, y = breast_cancer()
    model = init_model(SGDClassifier(random_state=0), x.shape[1], [0, 1])
    model.partial_fit(x, y)
    acc = float(np.mean(model.predict(x) == y))
    clone = init_model(SGDClassifier(random_state=0), x.shape[1], [0, 1])
    load_weights(clone, to_weights(model))
    assert float(np.mean(clone.predict(x) == y)) == acc > 0.9


def test_mismatch_and_unfitted_raise() -> None:
    with pytest.raises(FedloopError, match="init_model"):
        to_weights(LogisticRegression())
    model = init_model(LogisticRegression(), 3, [0, 1])
    with pytest.raises(FedloopError, match=r"'coef' has shape \(1, 4\)"):
        load_weights(model, {"coef": np.zeros((1, 4)), "intercept": np.zeros(1)})
    with pytest.raises(FedloopError, match="missing"):
        load_weights(model, {"coef": np.zeros((1, 3))})
    with pytest.raises(FedloopError, match="classes"):
        init_model(LogisticRegression(), 3, [0])
