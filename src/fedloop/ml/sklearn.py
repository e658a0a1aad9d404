"""scikit-learn adapter: linear models and multi-layer perceptrons to and from Weights.

Supported: any estimator with ``coef_``/``intercept_`` (``LogisticRegression``,
``SGDClassifier``, ``LinearSVC``, ...) as ``{"coef", "intercept"}``, and ``MLPClassifier``/
``MLPRegressor`` as ``{"coefs.0", "intercepts.0", "coefs.1", ...}`` in layer order. Arrays are
copied in their own dtype (float64 unless the model was fitted on float32 data).

A model must know its shapes before it can load weights: ``init_model`` gives an unfitted
model every fitted attribute (classes, shapes) with zero weights for linear models and
seeded Glorot-uniform weights for an MLP (zeros would leave every hidden unit identical).
Train afterwards with ``warm_start=True`` (``fit`` starts from the loaded weights) or
``partial_fit``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedloop.errors import FedloopError
from fedloop.types import Weights

__all__ = ["init_model", "is_mlp", "load_weights", "to_weights"]


def is_mlp(model: Any) -> bool:
    """Return True when the model stores layers as ``coefs_``/``intercepts_`` (an MLP)."""
    return hasattr(model, "hidden_layer_sizes")


def to_weights(model: Any) -> Weights:
    """Return copies of a fitted (or ``init_model``-ed) model's weights as ``Weights``."""
    if is_mlp(model):
        if not hasattr(model, "coefs_"):
            raise FedloopError("the MLP has no weights yet; fit it or call init_model first.")
        out: Weights = {}
        for i, (c, b) in enumerate(zip(model.coefs_, model.intercepts_, strict=True)):
            out[f"coefs.{i}"] = np.array(c, copy=True)
            out[f"intercepts.{i}"] = np.array(b, copy=True)
        return out
    if not hasattr(model, "coef_"):
        raise FedloopError(
            f"{type(model).__name__} has no coef_ yet; fit it or call init_model first."
        )
    intercept = np.atleast_1d(np.asarray(model.intercept_))
    return {"coef": np.array(model.coef_, copy=True), "intercept": np.array(intercept, copy=True)}


def load_weights(model: Any, weights: Weights) -> None:
    """Set the model's weights from ``weights`` in place; the names and shapes must match.

    A mismatch raises ``FedloopError`` naming the tensor, and nothing is changed.
    """
    current = to_weights(model)
    missing = [n for n in current if n not in weights]
    unexpected = [n for n in weights if n not in current]
    if missing or unexpected:
        raise FedloopError(
            f"weights do not match the {type(model).__name__}: missing {missing}, "
            f"unexpected {unexpected}."
        )
    for name, arr in current.items():
        shape = np.shape(weights[name])
        if shape != arr.shape:
            raise FedloopError(
                f"tensor {name!r} has shape {shape} but the model expects {arr.shape}."
            )
    if is_mlp(model):
        for i in range(len(model.coefs_)):
            _assign(model.coefs_, i, weights[f"coefs.{i}"])
            _assign(model.intercepts_, i, weights[f"intercepts.{i}"])
        return
    model.coef_ = np.asarray(weights["coef"], dtype=current["coef"].dtype).copy()
    intercept = np.asarray(weights["intercept"], dtype=current["intercept"].dtype).copy()
    if np.ndim(model.intercept_) == 0:
        model.intercept_ = intercept.reshape(())
    else:
        model.intercept_ = intercept


def _assign(arrays: list[np.ndarray], i: int, value: np.ndarray) -> None:
    # In place, so an optimizer holding references to the layer arrays sees the new values.
    arrays[i][...] = np.asarray(value, dtype=arrays[i].dtype)


def init_model(model: Any, n_features: int, classes: Sequence[Any], seed: int = 0) -> Any:
    """Return ``model`` made ready to load weights: fitted attributes for ``n_features`` inputs
    and the given ``classes``, with zero (linear) or seeded Glorot (MLP) weights.

    Internally fits the model for one iteration on one zero sample per class, then resets the
    weights; the model's own parameters are left as they were.
    """
    labels = np.asarray(classes)
    if labels.ndim != 1 or len(labels) < 2:
        raise FedloopError(f"classes must list at least two labels, got {list(labels)}.")
    if n_features < 1:
        raise FedloopError(f"n_features must be at least 1, got {n_features}.")
    x = np.zeros((len(labels), n_features))
    params = model.get_params(deep=False)
    override = {k: 1 for k in ("max_iter",) if k in params}
    try:
        model.set_params(**override)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x, labels)
    finally:
        model.set_params(**{k: params[k] for k in override})
    if is_mlp(model):
        rng = np.random.default_rng(seed)
        # sklearn's own scheme: uniform(+-sqrt(factor / (fan_in + fan_out))), factor 2 for logistic.
        factor = 2.0 if getattr(model, "activation", "") == "logistic" else 6.0
        for i, c in enumerate(model.coefs_):
            bound = np.sqrt(factor / (c.shape[0] + c.shape[1]))
            c[...] = rng.uniform(-bound, bound, c.shape)
            model.intercepts_[i][...] = rng.uniform(-bound, bound, model.intercepts_[i].shape)
        # A fresh optimizer for the first real round, not the state of the placeholder fit.
        if hasattr(model, "_optimizer"):
            del model._optimizer
        model.n_iter_ = 0
        model.t_ = 0
    else:
        model.coef_ = np.zeros_like(model.coef_)
        model.intercept_ = np.zeros_like(model.intercept_)
    return model
