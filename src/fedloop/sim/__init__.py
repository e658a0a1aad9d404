"""Simulation: many virtual agents over the real aggregator, in one machine or on Ray.

    from fedloop.sim import SimSettings, LocalBackend, run

    result = run(SimSettings("fedloop.sim.engines:logreg_engine", num_agents=1000, rounds=10,
                             fraction=0.1), LocalBackend())
    print(result.database, result.seconds_per_round)

See docs/simulation.md.
"""

from __future__ import annotations

import asyncio

from fedloop.sim.core import (
    AgentFailed,
    AgentResult,
    Backend,
    EngineSpec,
    ModelBytes,
    Observer,
    RoundSummary,
    SimResult,
    SimSettings,
    agents_per_round,
    run_simulation,
    sample_agents,
)
from fedloop.sim.local import LocalBackend
from fedloop.sim.ray import RayBackend

__all__ = [
    "AgentFailed",
    "AgentResult",
    "Backend",
    "EngineSpec",
    "LocalBackend",
    "ModelBytes",
    "Observer",
    "RayBackend",
    "RoundSummary",
    "SimResult",
    "SimSettings",
    "agents_per_round",
    "run",
    "run_simulation",
    "sample_agents",
]


def run(
    settings: SimSettings, backend: Backend | None = None, observer: Observer | None = None
) -> SimResult:
    """Run a simulation to its end (on a `LocalBackend` unless told otherwise); see `SimResult`."""
    return asyncio.run(run_simulation(settings, backend or LocalBackend(), observer))
