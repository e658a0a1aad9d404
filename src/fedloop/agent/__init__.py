"""The FL client: `Agent` drives an ML engine; `Client` is the book's step-by-step API."""

from __future__ import annotations

from fedloop.agent.client import AggregatorClient, Refused
from fedloop.agent.imperative import Client
from fedloop.agent.runner import Agent, Engine
from fedloop.agent.state import AgentState, Phase

__all__ = ["Agent", "AgentState", "AggregatorClient", "Client", "Engine", "Phase", "Refused"]
