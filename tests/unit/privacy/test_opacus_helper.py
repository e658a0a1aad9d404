"""Agent-side DP-SGD through Opacus: ε accumulates over rounds, weight names are untouched."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from fedloop.ml.torch import to_weights  # noqa: E402
from fedloop.privacy.opacus import LocalDP  # noqa: E402


def test_two_rounds_spend_more_epsilon_and_keep_names() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    names = list(to_weights(model))
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    dp = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0)
    assert dp.epsilon(1e-5) == 0.0
    spent = []
    for _ in range(2):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        private, dp_optimizer, loader = dp.make_private(
            model, optimizer, DataLoader(data, batch_size=16)
        )
        for x, y in loader:
            dp_optimizer.zero_grad()
            torch.nn.functional.cross_entropy(private(x), y).backward()
            dp_optimizer.step()
        spent.append(dp.epsilon(1e-5))
    assert 0 < spent[0] < spent[1]
    assert list(to_weights(model)) == names
