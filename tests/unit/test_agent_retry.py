"""Agents wait as long as the aggregator asks (`Retry-After`) before sending a refused model
again, and both kinds of agent take any 5xx (a full disk's 507 included) for an outage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from fedloop.agent.aio import AsyncAgent, AsyncRefused
from fedloop.agent.client import (
    RETRY_AFTER_MAX,
    AggregatorClient,
    body_size,
    retry,
    retry_after,
)
from fedloop.errors import ConnectionFailed
from fedloop.protocol import codec

WEIGHTS = {"w": np.arange(12, dtype=np.float32).reshape(4, 3)}
FULL = {
    "protocol": 1,
    "error": "storage_full",
    "detail": "the aggregator could not store the model (No space left on device)",
}
ACCEPTED = {"accepted": True, "round": 1, "uploads": 1, "needed": 2}


def _answers(*responses: httpx.Response) -> tuple[Callable[[httpx.Request], httpx.Response], list]:
    """A handler giving `responses` in turn (the last one from then on), and the bodies it got."""
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        return responses[min(len(bodies), len(responses)) - 1]

    return handler, bodies


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("10", 10.0),
        ("0.5", 0.5),
        ("-3", 0.0),
        ("86400", RETRY_AFTER_MAX),
        ("nan", None),
        ("Wed, 21 Oct 2026 07:28:00 GMT", None),  # a date: fedloop's aggregator sends seconds
    ],
)
def test_retry_after_reads_seconds_and_caps_them(header: str | None, seconds: float | None) -> None:
    assert retry_after({} if header is None else {"retry-after": header}) == seconds


def test_a_full_disk_is_an_outage_the_agent_waits_out_as_long_as_asked() -> None:
    handler, bodies = _answers(
        httpx.Response(507, json=FULL, headers={"retry-after": "0.4"}),
        httpx.Response(200, json=ACCEPTED),
    )
    client = AggregatorClient("http://aggregator.test")
    client.http.close()
    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler))
    client.bulk = None
    data = codec.encode_parts(WEIGHTS)
    waits: list[tuple[Exception, float]] = []
    started = time.monotonic()
    reply = retry(
        lambda: client.upload("a", 1, data, 10),
        on_retry=lambda exc, wait: waits.append((exc, wait)),
    )
    elapsed = time.monotonic() - started
    client.close()

    assert reply.accepted and len(bodies) == 2 and bodies[0] == bodies[1]
    ((exc, wait),) = waits
    assert isinstance(exc, ConnectionFailed) and exc.retry_after == 0.4
    assert wait == 0.4 and elapsed >= 0.4  # not the first backoff step (0.1 s)
    # What the log says: the aggregator's reason, not "it may be restarting".
    assert "507 (storage_full: the aggregator could not store the model" in str(exc)


def test_a_5xx_without_retry_after_keeps_the_backoff() -> None:
    attempts: list[float] = []

    def action() -> str:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionFailed("the aggregator answered 502")
        return "done"

    waits: list[float] = []
    assert retry(action, on_retry=lambda exc, wait: waits.append(wait)) == "done"
    assert waits == [0.1, 0.2]


class _Engine:
    def train(self, weights: dict, config: dict) -> tuple[dict, int, dict]:
        return weights, 1, {}


def _async_send(
    handler: Callable[[httpx.Request], httpx.Response], give_up_after: float | None = 60.0
) -> httpx.Response:
    async def send() -> httpx.Response:
        agent = AsyncAgent(_Engine(), "http://aggregator.test", "a", give_up_after=give_up_after)
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(base_url=agent.url, transport=transport) as http:
            parts = codec.encode_parts(WEIGHTS)
            headers = {"content-length": str(body_size(parts))}
            return await agent._send(http, "POST", "/v1/updates", model=parts, headers=headers)

    return asyncio.run(send())


def test_async_agents_wait_out_a_5xx_too() -> None:
    handler, bodies = _answers(
        httpx.Response(507, json=FULL, headers={"retry-after": "0.3"}),
        httpx.Response(503, text="balancer: no backend"),
        httpx.Response(200, json=ACCEPTED),
    )
    started = time.monotonic()
    response = _async_send(handler)
    assert response.status_code == 200
    # 0.3 s asked for, then the backoff's 0.2 s; the whole model each time.
    assert time.monotonic() - started >= 0.5
    assert bodies == [codec.encode(WEIGHTS)] * 3


def test_async_agents_still_give_up_and_still_take_a_4xx_as_a_refusal() -> None:
    handler, _ = _answers(httpx.Response(507, json=FULL))
    with pytest.raises(ConnectionFailed, match=r"507 \(storage_full"):
        _async_send(handler, give_up_after=0.0)
    refused = {"protocol": 1, "error": "round_closed", "detail": "round 1 is closed"}
    handler, bodies = _answers(httpx.Response(409, json=refused))
    with pytest.raises(AsyncRefused) as caught:
        _async_send(handler)
    assert caught.value.code == "round_closed" and len(bodies) == 1
