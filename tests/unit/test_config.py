"""Config: file < environment < flags, and mistakes as one clear sentence."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedloop.aggregator.service import needed_uploads
from fedloop.config import load_config
from fedloop.errors import ConfigError


def test_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.toml"
    path.write_text(
        '[aggregator]\nport = 9000\nmin_agents = 2\n[strategy]\nname = "fedprox"\nmu = 0.1\n'
    )
    monkeypatch.setenv("FEDLOOP_MIN_AGENTS", "3")
    config = load_config(path, port=9100)
    assert config.port == 9100 and config.min_agents == 3
    assert config.strategy.name == "fedprox" and config.strategy.params == {"mu": 0.1}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("port = 'x'", "port"),
        ("aggregation_threshold = 2.0", "aggregation_threshold"),
        ("unknown_key = 1", "unknown_key"),
        ("port = ", "not valid TOML"),
    ],
)
def test_bad_config_is_a_sentence(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "a.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("threshold", "agents", "min_agents", "needed"),
    [
        (1.0, 3, 1, 3),
        (0.5, 3, 1, 2),
        (0.7, 10, 1, 7),
        (0.1, 3, 1, 1),
        (0.5, 0, 1, 1),
        (0.5, 4, 3, 3),
    ],
)
def test_needed_uploads(threshold: float, agents: int, min_agents: int, needed: int) -> None:
    assert needed_uploads(threshold, agents, min_agents) == needed
