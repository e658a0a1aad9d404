"""The RDP accountant against published reference values and closed forms."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fedloop.privacy import RdpAccountant, compute_rdp, dp_epsilon, epsilon_from_rdp
from fedloop.privacy.accountant import rdp_sampled_gaussian

# TF Privacy's tutorial grid of orders (tutorials/mnist_dpsgd_tutorial.py, 2019).
TF_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


@pytest.mark.parametrize(
    ("noise", "epochs", "expected"),
    [
        # tensorflow/privacy tutorials/README.md, "Select Parameters" and "Expected Output":
        # MNIST, N = 60000, batch 256, δ = 1e-5, steps = epochs · 60000 // 256, classic conversion.
        (1.12, 60, 2.92),
        (1.2, 10, 1.20),
        (1.12, 1, 1.00),
        (1.12, 2, 1.04),
    ],
)
def test_tf_privacy_mnist_tutorial_values(noise: float, epochs: int, expected: float) -> None:
    steps = epochs * 60000 // 256
    eps = dp_epsilon(256 / 60000, noise, steps, 1e-5, TF_ORDERS, conversion="classic")
    assert eps == pytest.approx(expected, abs=0.006)


def test_opacus_documented_value() -> None:
    # opacus.ai, compute_dp_sgd_privacy: q = 0.01, σ = 1.0, 300 steps, orders 2 5 10 20 100,
    # δ = 1e-5 → ε = 2.39 at α = 5 (Balle et al. 2020 conversion).
    orders = [2.0, 5.0, 10.0, 20.0, 100.0]
    rdp = compute_rdp(0.01, 1.0, 300, orders)
    eps, order = epsilon_from_rdp(rdp, 1e-5, orders)
    assert eps == pytest.approx(2.39, abs=0.005)
    assert order == 5.0


def _opacus_rdp_module() -> ModuleType:
    """Load Opacus's rdp.py alone (numpy + scipy), without importing torch through opacus."""
    spec = importlib.util.find_spec("opacus")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("opacus is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "accountants/analysis/rdp.py"
    pytest.importorskip("scipy")
    loaded = importlib.util.spec_from_file_location("_opacus_rdp", path)
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def test_matches_opacus_at_integer_and_fractional_orders() -> None:
    analysis = _opacus_rdp_module()
    orders = [1.05, 1.5, 2.0, 2.5, 3.3, 7.7, 12.0, 31.7, 64.0, 250.5]
    for q, sigma in [(0.001, 0.8), (0.05, 0.7), (0.3, 3.0), (256 / 60000, 1.1)]:
        mine = compute_rdp(q, sigma, 17, orders)
        theirs = analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=17, orders=orders)
        np.testing.assert_allclose(mine, theirs, rtol=1e-7, atol=1e-12)


def test_closed_forms() -> None:
    # q = 1: the Gaussian mechanism, α / (2σ²); q = 0: nothing is released.
    assert rdp_sampled_gaussian(1.0, 2.0, 8.0) == pytest.approx(8 / 8)
    assert rdp_sampled_gaussian(0.0, 2.0, 8.0) == 0.0
    assert math.isinf(rdp_sampled_gaussian(0.5, 0.0, 8.0))
    # α = 2, integer formula: log(1 + q²(e^{1/σ²} − 1)) (Mironov et al. 2019, Section 3.3).
    q, sigma = 0.1, 1.3
    expected = math.log1p(q * q * math.expm1(1 / sigma**2))
    assert rdp_sampled_gaussian(q, sigma, 2.0) == pytest.approx(expected, rel=1e-12)
    # Fractional orders interpolate between their integer neighbours (RDP is monotone in α).
    low, mid, high = (rdp_sampled_gaussian(q, sigma, a) for a in (3.0, 3.5, 4.0))
    assert low < mid < high


def test_improved_conversion_never_worse_and_composition_adds() -> None:
    rdp = compute_rdp(0.02, 1.0, 500)
    assert epsilon_from_rdp(rdp, 1e-6)[0] <= epsilon_from_rdp(rdp, 1e-6, conversion="classic")[0]
    accountant = RdpAccountant()
    assert accountant.epsilon(1e-5) == 0.0
    for _ in range(3):
        accountant.step(0.02, 1.0, 100)
    accountant.step(0.02, 1.0, 200)
    np.testing.assert_allclose(accountant.rdp, rdp, rtol=1e-12)
    assert accountant.steps == 500
    assert accountant.epsilon(1e-6) == pytest.approx(epsilon_from_rdp(rdp, 1e-6)[0])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="delta"):
        epsilon_from_rdp([1.0], 0.0, [2.0])
    with pytest.raises(ValueError, match="sampling rate"):
        rdp_sampled_gaussian(1.5, 1.0, 2.0)
    with pytest.raises(ValueError, match="orders"):
        rdp_sampled_gaussian(0.5, 1.0, 1.0)
