"""Ready ML engines for image classification that fedloop agents drive.

An ML engine is any object with ``train(weights, config) -> (weights, num_samples, metrics)``
and ``evaluate(weights, config) -> metrics``. ``TorchClassifier`` is one for any PyTorch
classifier on in-memory arrays; ``digits_engine`` and ``mnist_engine`` build one per agent on
a fixed, seeded split of a real dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fedloop.errors import ConfigError
from fedloop.ml import data, partition
from fedloop.ml.models import Net, PaperCNN
from fedloop.ml.torch import (
    fedcurv_penalty,
    fisher_diagonal,
    load_weights,
    proximal_term,
    scaffold_correction,
    tensors_like,
    to_weights,
    trainable_names,
)
from fedloop.strategies import fedcurv, scaffold
from fedloop.types import Weights

__all__ = [
    "TorchClassifier",
    "digits_engine",
    "digits_initial_weights",
    "digits_test_set",
    "mnist_engine",
]

ModelFactory = Callable[[], nn.Module]
Dataset = tuple[np.ndarray, np.ndarray]

# Defaults measured on the digits benchmark (3 agents, FedAvg): see tests/unit/ml/test_engines.py.
DEFAULT_EPOCHS = 5
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 0.05
DEFAULT_MOMENTUM = 0.9


def _init_model(factory: ModelFactory, seed: int) -> nn.Module:
    # A private RNG stream: the same seed gives the same initial weights in every process,
    # whatever else touched torch's global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


class TorchClassifier:
    """An ML engine training a PyTorch classifier with cross-entropy on in-memory arrays.

    ``train`` and ``test`` are (inputs, labels): inputs float arrays in the shape the model
    takes (images N x C x H x W), labels integer class indices. Training is SGD with momentum
    over shuffled mini-batches; the shuffle order depends only on ``seed`` and the round
    (``config["round"]`` or, without it, the number of ``train`` calls so far), so runs are
    reproducible. ``config`` may override ``epochs``, ``lr`` and ``batch_size`` for a round and
    carry ``proximal_mu`` (FedProx: adds mu/2 * ||w - w_global||^2 to the loss).

    Strategies with side tensors (``config["strategy"]``, README "Strategies with side
    tensors"):

    - ``scaffold``: every gradient of a trainable parameter is corrected, g <- g - c_i + c,
      with plain SGD steps (momentum off: option II's (x - y) / (K lr) assumes them), and
      ``scaffold.dc/<tensor>`` = -c + (x - y) / (K lr) is returned for each floating tensor
      (0 for buffers and frozen parameters, which no gradient moves).
    - ``fedcurv``: the loss gets lambda * sum_{j != s} (w - w_j)^T diag(F_j) (w - w_j) from the
      other agents' sums, and after training the empirical Fisher diagonal F on the local data
      is returned as ``fedcurv.fisher/<tensor>`` with ``fedcurv.fw/<tensor>`` = F * w (0 for
      buffers and frozen parameters).
    """

    def __init__(
        self,
        model_factory: ModelFactory,
        train: Dataset,
        test: Dataset | None = None,
        epochs: int = DEFAULT_EPOCHS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        lr: float = DEFAULT_LR,
        momentum: float = DEFAULT_MOMENTUM,
        weight_decay: float = 0.0,
        seed: int = 0,
        device: str = "cpu",
        num_threads: int | None = 1,
    ) -> None:
        if num_threads is not None:
            # Several agents often share a few cores; one thread each avoids oversubscription.
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.seed = seed
        self._calls = 0
        self._factory = model_factory
        self.model = _init_model(model_factory, seed).to(self.device)
        self._x, self._y = self._tensors(train, "train")
        self._test = None if test is None else self._tensors(test, "test")

    def _tensors(self, ds: Dataset, label: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = np.asarray(ds[0]), np.asarray(ds[1])
        if len(x) != len(y):
            raise ConfigError(f"{label} set has {len(x)} inputs but {len(y)} labels.")
        if len(x) == 0:
            raise ConfigError(f"{label} set is empty.")
        return (
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device),
            torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(self.device),
        )

    @property
    def num_samples(self) -> int:
        """Return the number of training samples."""
        return len(self._y)

    def initial_weights(self) -> Weights:
        """Return the model's weights as initialised from ``seed``, before any training."""
        return to_weights(_init_model(self._factory, self.seed))

    def train(
        self, weights: Weights, config: Mapping[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        """Return (trained weights, number of training samples, metrics) after local training.

        Metrics: ``loss`` (mean cross-entropy over the samples seen this round; none with
        ``epochs`` 0, which sees none: a NaN metric would be refused by the aggregator),
        ``local_steps`` (optimizer steps) and ``local_momentum`` (the SGD momentum, 0 in
        SCAFFOLD rounds; each round's optimizer starts with an empty momentum buffer), which
        FedNova needs, and ``accuracy`` of the trained model on the test set when the engine
        has one.
        """
        epochs = int(config.get("epochs", self.epochs))
        batch_size = int(config.get("batch_size", self.batch_size))
        lr = float(config.get("lr", self.lr))
        mu = float(config.get("proximal_mu", 0.0))
        round_ = int(config.get("round", self._calls))
        strategy = config.get("strategy")
        self._calls += 1
        if epochs < 0 or batch_size < 1 or lr <= 0 or mu < 0:
            raise ConfigError(
                f"bad training config: epochs={epochs}, batch_size={batch_size}, lr={lr}, "
                f"proximal_mu={mu}; need epochs >= 0, batch_size >= 1, lr > 0, proximal_mu >= 0."
            )
        if strategy not in (None, "scaffold", "fedcurv"):
            raise ConfigError(
                f"TorchClassifier does not support strategy {strategy!r}, whose agents exchange "
                "side tensors; it supports scaffold and fedcurv"
            )
        model = self.model
        load_weights(model, weights)
        global_params = tensors_like(model, weights) if mu > 0 else None
        trainable = trainable_names(model)
        state: Mapping[str, Any] = config.get("strategy_state") or {}
        controls = penalty = None
        if strategy == "scaffold":
            controls = (
                tensors_like(model, _side(state, scaffold.CONTROL_PREFIX, trainable), trainable),
                tensors_like(model, _side(state, scaffold.LOCAL_PREFIX, trainable), trainable),
            )
        lam = float(config.get("fedcurv_lambda", 0.0))
        if strategy == "fedcurv" and state and lam > 0:  # no sums before the first round
            penalty = (
                tensors_like(model, _side(state, fedcurv.FISHER_PREFIX, trainable), trainable),
                tensors_like(model, _side(state, fedcurv.PRODUCT_PREFIX, trainable), trainable),
            )
        # SCAFFOLD's local steps are plain SGD steps: option II's (x - y) / (K lr) assumes them.
        momentum = 0.0 if controls is not None else self.momentum
        optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=self.weight_decay
        )
        rng = np.random.default_rng([self.seed, round_])
        n = len(self._y)
        steps = 0
        loss_sum = 0.0
        seen = 0
        model.train()
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(n)).to(self.device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                xb, yb = self._x[idx], self._y[idx]
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(xb), yb)
                total = loss
                if global_params is not None:
                    total = loss + proximal_term(model, global_params, mu)
                if penalty is not None:
                    total = total + fedcurv_penalty(model, *penalty, None, None, lam)
                total.backward()  # type: ignore[no-untyped-call]
                if controls is not None:
                    scaffold_correction(model, *controls)  # g <- g - c_i + c
                optimizer.step()
                steps += 1
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
        metrics: dict[str, float] = {
            **({"loss": loss_sum / seen} if seen else {}),
            "local_steps": float(steps),
            "local_momentum": float(momentum),
        }
        if self._test is not None:
            metrics["accuracy"] = self._score(*self._test)["accuracy"]
        new = to_weights(model)
        if strategy == "scaffold":
            new.update(_scaffold_extras(weights, new, state, set(trainable), steps, lr))
        elif strategy == "fedcurv":
            fisher = fisher_diagonal(
                model,
                (
                    (self._x[i : i + batch_size], self._y[i : i + batch_size])
                    for i in range(0, n, batch_size)
                ),
            )
            new.update(_fedcurv_extras(new, fisher))
        return new, n, metrics

    def evaluate(self, weights: Weights, config: Mapping[str, Any]) -> dict[str, float]:
        """Return {"accuracy", "loss"} of ``weights`` on the test set ({} without a test set)."""
        if self._test is None:
            return {}
        load_weights(self.model, weights)
        return self._score(*self._test)

    def _score(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        model = self.model
        model.eval()
        correct = 0
        loss_sum = 0.0
        with torch.no_grad():
            for start in range(0, len(y), 1024):
                xb, yb = x[start : start + 1024], y[start : start + 1024]
                out = model(xb)
                loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
                correct += int((out.argmax(dim=1) == yb).sum())
        return {"accuracy": correct / len(y), "loss": loss_sum / len(y)}


def _side(state: Mapping[str, Any], prefix: str, names: list[str]) -> dict[str, Any]:
    """Return the strategy-state tensors ``prefix + name`` by name, or raise a ConfigError."""
    missing = [prefix + n for n in names if prefix + n not in state]
    if missing:
        raise ConfigError(
            f"config['strategy_state'] lacks {missing[:3]}: the agent must pass the tensors its "
            "aggregator ships with the global model (an older aggregator sends none; upgrade it)"
        )
    return {n: state[prefix + n] for n in names}


def _scaffold_extras(
    x: Weights, y: Weights, state: Mapping[str, Any], trainable: set[str], steps: int, lr: float
) -> Weights:
    """Return Delta c_i = -c + (x - y) / (K lr) per floating tensor (option II); 0 where no
    gradient moves the tensor (buffers, frozen parameters)."""
    out: Weights = {}
    for name, tensor in y.items():
        if tensor.dtype.kind != "f":
            continue
        if name in trainable:
            c = np.asarray(state[scaffold.CONTROL_PREFIX + name])
            delta = scaffold.control_delta(c, x[name], tensor, steps, lr)
        else:
            delta = np.zeros(tensor.shape)
        out[scaffold.DELTA_PREFIX + name] = delta.astype(tensor.dtype)
    return out


def _fedcurv_extras(y: Weights, fisher: Weights) -> Weights:
    """Return FedCurv's F and F * w per floating tensor; 0 where no gradient moves it."""
    out: Weights = {}
    for name, tensor in y.items():
        if tensor.dtype.kind != "f":
            continue
        f = np.asarray(fisher[name], dtype=np.float64) if name in fisher else np.zeros(tensor.shape)
        out[fedcurv.FISHER_PREFIX + name] = f.astype(tensor.dtype)
        out[fedcurv.PRODUCT_PREFIX + name] = (f * tensor).astype(tensor.dtype)
    return out


def _digits_split(seed: int) -> tuple[Dataset, Dataset]:
    from sklearn.model_selection import train_test_split

    images, labels = data.load_digits()
    x = data.images_to_float(images)
    x_train, x_test, y_train, y_test = train_test_split(
        x, labels, test_size=0.2, stratify=labels, random_state=seed
    )
    return (x_train, y_train), (x_test, y_test)


def _digits_net() -> nn.Module:
    return Net(in_size=8)


def digits_test_set(seed: int = 0) -> Dataset:
    """Return the common digits test set (images float32 N x 1 x 8 x 8, labels int64).

    It is the stratified 20% of scikit-learn's 1,797 digits held out for ``seed`` (360 images).
    """
    return _digits_split(seed)[1]


def digits_initial_weights(seed: int = 0) -> Weights:
    """Return the initial weights of the digits ``Net`` for ``seed``, equal in every caller."""
    return to_weights(_init_model(_digits_net, seed))


def _agent_part(
    labels: np.ndarray,
    agent_index: int,
    num_agents: int,
    seed: int,
    split: Literal["iid", "dirichlet", "shards"],
    alpha: float,
) -> np.ndarray:
    if not 0 <= agent_index < num_agents:
        raise ConfigError(
            f"agent_index must be in 0..{num_agents - 1} for {num_agents} agents, "
            f"got {agent_index}."
        )
    if split == "iid":
        parts = partition.iid(labels, num_agents, seed)
    elif split == "dirichlet":
        parts = partition.dirichlet(labels, num_agents, alpha, seed)
    elif split == "shards":
        parts = partition.shards(labels, num_agents, 2, seed)
    else:
        raise ConfigError(f"split must be 'iid', 'dirichlet' or 'shards', got {split!r}.")
    return parts[agent_index]


def digits_engine(
    agent_index: int,
    num_agents: int,
    seed: int = 0,
    split: Literal["iid", "dirichlet", "shards"] = "iid",
    alpha: float = 0.5,
    **kw: Any,
) -> TorchClassifier:
    """Return agent ``agent_index``'s engine on scikit-learn's 8x8 digits with the ``Net`` CNN.

    A stratified 80/20 train/test split fixed by ``seed``; the train part (1,437 images) is
    split among ``num_agents`` (IID by default, or ``dirichlet``/``shards`` label skew) and
    this agent trains on its share; every agent evaluates on the common test part. Keyword
    arguments go to ``TorchClassifier`` (epochs, lr, batch_size, ...).
    """
    (x_train, y_train), test = _digits_split(seed)
    idx = _agent_part(y_train, agent_index, num_agents, seed, split, alpha)
    return TorchClassifier(_digits_net, (x_train[idx], y_train[idx]), test, seed=seed, **kw)


def mnist_engine(
    data_dir: str | Path,
    agent_index: int,
    num_agents: int,
    seed: int = 0,
    model: Literal["net", "cnn"] = "net",
    split: Literal["iid", "dirichlet", "shards"] = "iid",
    alpha: float = 0.5,
    fashion: bool = False,
    **kw: Any,
) -> TorchClassifier:
    """Return agent ``agent_index``'s engine on MNIST (or Fashion-MNIST) IDX files in data_dir.

    The official 60,000 training images are split among ``num_agents`` (IID by default) and
    the official 10,000 test images are the common test set. ``model`` is ``"net"`` (the
    book's small CNN) or ``"cnn"`` (McMahan et al.'s ``PaperCNN``). Keyword arguments go to
    ``TorchClassifier``.
    """
    load = data.load_fashion_mnist if fashion else data.load_mnist
    train_images, train_labels = load(data_dir, "train")
    test_images, test_labels = load(data_dir, "test")
    idx = _agent_part(train_labels, agent_index, num_agents, seed, split, alpha)
    factory: ModelFactory
    if model == "net":
        factory = _mnist_net
    elif model == "cnn":
        factory = PaperCNN
    else:
        raise ConfigError(f"model must be 'net' or 'cnn', got {model!r}.")
    return TorchClassifier(
        factory,
        (data.images_to_float(train_images[idx]), train_labels[idx]),
        (data.images_to_float(test_images), test_labels),
        seed=seed,
        **kw,
    )


def _mnist_net() -> nn.Module:
    return Net(in_size=28)
