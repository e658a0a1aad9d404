"""The book's imperative agent API, for readers porting simple-fl code.

client = Client("http://127.0.0.1:8765", name="a1")
client.send_initial_model(weights)
while True:
    global_weights = client.wait_for_global_model()
    client.send_trained_model(train(global_weights), num_samples, {"accuracy": acc})
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from fedloop.agent.client import NO_SECAGG, POLL_GAP, AggregatorClient, Refused, retry
from fedloop.errors import FedloopError
from fedloop.protocol import codec
from fedloop.types import Weights


class Client:
    """A minimal blocking agent: you call each step yourself."""

    def __init__(
        self,
        aggregator_url: str,
        name: str,
        *,
        poll_wait: float = 10.0,
        token: str | None = None,
        credential: str | None = None,
    ) -> None:
        # With auth on: `token` is the enrollment token for the first registration, which sets
        # `self.credential` (keep it: it is returned only once); `credential` is one kept before.
        self.client = AggregatorClient(aggregator_url, token=credential or token)
        self.credential = credential
        self.name = name
        self.poll_wait = poll_wait
        self.agent_id: str | None = None
        self.global_round = -1
        self.finished = False
        self._sent: set[int] = set()  # rounds whose local model was accepted

    def send_initial_model(self, weights: Mapping[str, np.ndarray]) -> str:
        """Register with `weights` as this agent's initial model; return the agent id."""
        reply = retry(lambda: self.client.register(self.name, weights))
        if reply.credential:
            self.credential = self.client.token = reply.credential
        if reply.secure_aggregation:
            raise FedloopError(NO_SECAGG.format(agent="fedloop.agent.imperative.Client"))
        self.agent_id = reply.agent_id
        return reply.agent_id

    def wait_for_global_model(self, timeout: float | None = None) -> Weights | None:
        """Block until a global model newer than the last one received arrives, and return it.

        Returns None when `timeout` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            asked = time.monotonic()
            left = None if deadline is None else deadline - asked
            if left is not None and left <= 0:
                return None
            wait = self.poll_wait if left is None else min(self.poll_wait, left)
            result = retry(lambda w=wait: self.client.latest_global(self.global_round, w))  # type: ignore[misc]
            if result is not None:
                info, data = result
                self.global_round, self.finished = info.round, info.finished
                return codec.decode(data)
            # Not yet. Time is measured, not assumed: an aggregator caps a long poll (60 s),
            # and one that answers early must not be asked again at once (`POLL_GAP`).
            now = time.monotonic()
            gap = asked + POLL_GAP - now
            if deadline is not None:
                gap = min(gap, deadline - now)
            if gap > 0:
                time.sleep(gap)

    def send_trained_model(
        self,
        weights: Mapping[str, np.ndarray],
        num_samples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Upload a local model trained on the last global model; False if it was overtaken."""
        if self.agent_id is None:
            raise RuntimeError("call send_initial_model() first")
        agent_id, data, round_number = self.agent_id, codec.encode(weights), self.global_round + 1
        try:
            retry(lambda: self.client.upload(agent_id, round_number, data, num_samples, metrics))
        except Refused as exc:
            if exc.code in ("round_closed", "round_not_open", "run_finished"):
                return False
            # The aggregator holds a local model of this agent for the round that this client
            # did not see accepted: an earlier attempt got through but its answer was lost, or
            # it was sent before a restart. A second call after an accepted one is a mistake.
            if exc.code != "duplicate_upload" or round_number in self._sent:
                raise
        self._sent.add(round_number)
        return True

    def close(self) -> None:
        self.client.close()
