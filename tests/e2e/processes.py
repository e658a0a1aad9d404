"""A real aggregator process with the dashboard's routes, and real agent processes.

The agents run `engines:ShiftEngine` from tests/integration (put on their PYTHONPATH).
tests/e2e is a package so that its conftest does not shadow tests/integration's `conftest`
module, which the integration tests import by that name.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from procs import AggregatorProcess, process_env

HERE = Path(__file__).parent
ENGINES = HERE.parent / "integration"


@dataclass
class Server(AggregatorProcess):
    """An aggregator process, and the agent processes it started (stopped with it)."""

    pythonpath: Path | None = ENGINES
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_agent(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "fedloop", "agent", "engines:ShiftEngine"]
        command += ["--url", self.url, "--name", name, "--workdir", str(self.root / name)]
        with open(self.root / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                [*command, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=process_env(ENGINES),
            )
        self.agents.append(process)
        return process

    def stop(self) -> None:
        for process in self.agents:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        super().stop()
