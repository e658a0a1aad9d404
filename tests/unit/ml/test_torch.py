"""PyTorch adapter: Weights round trips, strict loading, FedProx, SCAFFOLD and FedCurv terms."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from fedloop.errors import FedloopError  # noqa: E402
from fedloop.ml.torch import (  # noqa: E402
    fedcurv_penalty,
    fisher_diagonal,
    load_weights,
    proximal_term,
    scaffold_correction,
    scaffold_update_control,
    tensors_like,
    to_weights,
)


def bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))


def test_round_trip_includes_batchnorm_buffers_and_int64_counter() -> None:
    torch.manual_seed(0)
    src = bn_model()
    src.train()
    for _ in range(3):
        src(torch.randn(8, 4))  # moves running stats and num_batches_tracked
    w = to_weights(src)
    assert list(w) == list(src.state_dict())
    assert w["1.num_batches_tracked"].dtype == np.int64 and int(w["1.num_batches_tracked"]) == 3
    assert w["1.running_mean"].dtype == np.float32 and np.any(w["1.running_mean"] != 0)
    dst = bn_model()
    load_weights(dst, w)
    for name, t in dst.state_dict().items():
        assert torch.equal(t, src.state_dict()[name]), name
    # The export is a copy: training on afterwards does not change it.
    before = w["0.weight"].copy()
    with torch.no_grad():
        src[0].weight.add_(1.0)
    np.testing.assert_array_equal(w["0.weight"], before)


def test_int64_counter_survives_a_float_average() -> None:
    dst = bn_model()
    w = to_weights(dst)
    w["1.num_batches_tracked"] = np.asarray(7.0)  # what a float mean of counters gives
    load_weights(dst, w)
    assert dst.state_dict()["1.num_batches_tracked"].dtype == torch.int64
    assert int(dst.state_dict()["1.num_batches_tracked"]) == 7


def test_float16_module_round_trips_in_float16() -> None:
    torch.manual_seed(1)
    src = bn_model().half()
    w = to_weights(src)
    assert w["0.weight"].dtype == np.float16
    dst = bn_model().half()
    load_weights(dst, w)
    assert all(torch.equal(t, src.state_dict()[n]) for n, t in dst.state_dict().items())


def test_bfloat16_travels_as_float32_and_returns_bit_exact() -> None:
    torch.manual_seed(2)
    src = nn.Linear(5, 3).to(torch.bfloat16)
    w = to_weights(src)
    assert w["weight"].dtype == np.float32
    dst = nn.Linear(5, 3).to(torch.bfloat16)
    load_weights(dst, w)
    assert dst.weight.dtype == torch.bfloat16
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)


def test_load_weights_is_strict_and_names_the_tensor() -> None:
    model = bn_model()
    w = to_weights(model)
    missing = {k: v for k, v in w.items() if k != "3.bias"}
    with pytest.raises(FedloopError, match=r"missing tensors \['3.bias'\]"):
        load_weights(model, missing)
    with pytest.raises(FedloopError, match=r"unexpected tensors.*extra"):
        load_weights(model, {**w, "extra": np.zeros(1)})
    bad = dict(w)
    bad["3.weight"] = np.zeros((2, 4), np.float32)
    before = to_weights(model)
    with pytest.raises(FedloopError, match=r"'3.weight' has shape \(2, 4\).*\(2, 3\)"):
        load_weights(model, {**bad, "0.weight": np.ones((3, 4), np.float32)})
    # Nothing changed: checks run before any copy.
    assert all(np.array_equal(before[k], v) for k, v in to_weights(model).items())


def test_proximal_term_matches_hand_computation() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    glob = {"weight": np.array([[0.0, 1.0]], np.float32), "bias": np.array([1.5], np.float32)}
    # ||w - w_g||^2 = 1 + 1 + 1 = 3; mu/2 * 3 with mu = 0.2 -> 0.3
    term = proximal_term(model, glob, 0.2)
    assert float(term.detach()) == pytest.approx(0.3)
    term.backward()
    # d/dw mu/2 ||w - g||^2 = mu (w - g)
    assert model.weight.grad is not None and model.bias.grad is not None
    np.testing.assert_allclose(model.weight.grad.numpy(), [[0.2, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(model.bias.grad.numpy(), [-0.2], rtol=1e-6)
    pre = tensors_like(model, glob)
    assert float(proximal_term(model, pre, 0.2).detach()) == pytest.approx(0.3)


def test_proximal_term_ignores_buffers() -> None:
    model = bn_model()
    w = to_weights(model)
    w["1.running_mean"] = w["1.running_mean"] + 100.0
    assert float(proximal_term(model, w, 1.0).detach()) == 0.0


def test_scaffold_correction_adds_c_minus_ci_to_gradients() -> None:
    model = nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    g_w = model.weight.grad.clone()  # type: ignore[union-attr]
    c = {"weight": np.array([[1.0, 2.0]], np.float32), "bias": np.array([3.0], np.float32)}
    ci = {"weight": np.array([[0.5, 0.5]], np.float32), "bias": np.array([1.0], np.float32)}
    scaffold_correction(model, c, ci)
    assert model.weight.grad is not None
    np.testing.assert_allclose(
        model.weight.grad.numpy(), (g_w + torch.tensor([[0.5, 1.5]])).numpy()
    )
    np.testing.assert_allclose(model.bias.grad.numpy(), [1.0 + 2.0])  # type: ignore[union-attr]


def test_scaffold_update_control_option_two() -> None:
    ci = {"w": np.array([1.0, 0.0], np.float32)}
    c = {"w": np.array([0.5, 0.5], np.float32)}
    x = {"w": np.array([2.0, 2.0], np.float32)}
    y = {"w": np.array([1.0, 3.0], np.float32)}
    new, delta = scaffold_update_control(ci, c, x, y, local_steps=10, lr=0.1)
    # c_i+ = c_i - c + (x - y) / (K lr) = [1 - .5 + 1, 0 - .5 - 1]
    np.testing.assert_allclose(new["w"], [1.5, -1.5])
    np.testing.assert_allclose(delta["w"], [0.5, -1.5])
    assert new["w"].dtype == np.float32
    with pytest.raises(FedloopError, match="local_steps"):
        scaffold_update_control(ci, c, x, y, local_steps=0, lr=0.1)


def test_fisher_diagonal_is_mean_of_squared_per_sample_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    fisher = fisher_diagonal(model, [(x[:6], y[:6]), (x[6:], y[6:])])
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(10):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.pow(2) / 10  # type: ignore[union-attr]
    assert set(fisher) == set(expected)
    for n in expected:
        np.testing.assert_allclose(fisher[n], expected[n].numpy(), rtol=1e-5, atol=1e-8)
    with pytest.raises(FedloopError, match="no samples"):
        fisher_diagonal(model, [])


def test_fedcurv_penalty_equals_weighted_distance_to_other_agents_up_to_a_constant() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    rng = np.random.default_rng(0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    agents = [
        (
            {n: rng.random(s).astype(np.float32) for n, s in shapes.items()},  # F_j
            {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()},  # w_j
        )
        for _ in range(3)
    ]
    f_sum = {n: sum(f[n] for f, _ in agents) for n in shapes}
    fw_sum = {n: sum(f[n] * w[n] for f, w in agents) for n in shapes}
    own_f, own_w = agents[0]
    own_fw = {n: own_f[n] * own_w[n] for n in shapes}
    lam = 0.7
    penalty = fedcurv_penalty(model, f_sum, fw_sum, own_f, own_fw, lam)
    params = {n: p.detach().numpy().astype(np.float64) for n, p in model.named_parameters()}
    full = sum(lam * np.sum(f[n] * (params[n] - w[n]) ** 2) for f, w in agents[1:] for n in shapes)
    const = sum(lam * np.sum(f[n] * w[n] ** 2) for f, w in agents[1:] for n in shapes)
    assert float(penalty.detach()) + const == pytest.approx(full, rel=1e-5)
    penalty.backward()
    assert model.weight.grad is not None
