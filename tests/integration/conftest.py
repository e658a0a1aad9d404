"""Real aggregator and agent processes on loopback ports, with real SQLite files."""

from harness import agents, make_server

__all__ = ["agents", "make_server"]  # fixtures, defined in harness.py
