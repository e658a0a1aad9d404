"""Every strategy the README, docs, examples and deployment files show, with its parameters,
is one the registry builds: each command line's `--strategy`/`--strategy-set` and each
`[strategy]` table (in a ```toml block or a .toml file) goes through `strategies.create`."""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from fedloop._loading import parse_sets
from fedloop.strategies import create

ROOT = Path(__file__).resolve().parents[2]
FILES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted((ROOT / "examples").rglob("*.md")),
    *sorted((ROOT / "examples").rglob("*.toml")),
    *sorted((ROOT / "deploy").rglob("*.toml")),
]
TOML_BLOCK = re.compile(r"^```toml\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _command_lines(text: str) -> Iterator[tuple[int, str]]:
    """Yield (first line number, command) for each line that names --strategy, with its
    backslash-continued lines joined."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start, joined = i + 1, lines[i]
        while joined.endswith("\\") and i + 1 < len(lines):
            i += 1
            joined = joined[:-1] + " " + lines[i]
        if "--strategy" in joined:
            yield start, joined
        i += 1


def _from_command(command: str) -> tuple[str, dict[str, Any]]:
    try:
        words = shlex.split(command, comments=True)
    except ValueError:  # prose with an apostrophe, not a command line
        words = command.split()
    name, sets = "fedavg", []
    for word, value in pairwise(words):
        if word == "--strategy":
            name = value
        elif word == "--strategy-set":
            sets.append(value)
    return name, parse_sets(sets, "--strategy-set")


def _uses() -> Iterator[Any]:
    for path in FILES:
        text = path.read_text()
        where = path.relative_to(ROOT)
        tables = (
            [(1, text)]
            if path.suffix == ".toml"
            else [
                (text.count("\n", 0, m.start()) + 2, m.group(1)) for m in TOML_BLOCK.finditer(text)
            ]
        )
        for line, source in tables:
            table = dict(tomllib.loads(source).get("strategy", {}))
            if table:
                name = table.pop("name", "fedavg")
                yield pytest.param(name, table, id=f"{where}:{line}")
        if path.suffix == ".md":
            for line, command in _command_lines(text):
                name, params = _from_command(command)
                if params or name != "fedavg":
                    yield pytest.param(name, params, id=f"{where}:{line}")


USES = list(_uses())


def test_the_docs_show_strategies_at_all() -> None:
    # The scan finds what it is meant to: README's table, a --strategy-set command line.
    ids = [use.id for use in USES]
    assert any(i.startswith("README.md:") for i in ids), ids
    assert any(i.startswith("docs/simulation.md:") for i in ids), ids


@pytest.mark.parametrize(("name", "params"), USES)
def test_a_documented_strategy_and_its_parameters_exist(name: str, params: dict[str, Any]) -> None:
    if ":" in name:  # the user's own class, "module:Class": nothing to check here
        return
    create(name, **params)
