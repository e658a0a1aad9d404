"""An agent's side of secure aggregation: its local model leaves the process only masked.

Drives `fedloop.privacy.secagg.SecAggClient` over the aggregator's `/v1/secagg/{round}/…`
routes (fedloop.aggregator.secure): advertise keys, share them, send the masked vector
[n·x, n] (num_samples times the floating tensors in the global model's order, then
num_samples), and reveal the unmasking shares. When the aggregator starts the round's protocol
over (409 ``secagg_restart``), the agent starts over with fresh keys; when the round went on
without it, the local model is dropped like an overtaken upload.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fedloop.agent.client import Refused
from fedloop.privacy.secagg import AdvertiseKeys, SecAggClient, SecAggConfig, SecAggError
from fedloop.protocol import codec
from fedloop.protocol.messages import (
    SecAggAdvertise,
    SecAggJoined,
    SecAggKeyList,
    SecAggMaskedInput,
    SecAggRelayed,
    SecAggShares,
    SecAggSurvivors,
    SecAggUnmask,
)

if TYPE_CHECKING:
    from fedloop.agent.runner import Agent

log = logging.getLogger("fedloop.agent")

# Refusals after which this round's local model is dropped: the round went on without it.
SKIPPED = {
    "round_closed",
    "round_not_open",
    "run_finished",
    "secagg_closed",
    "secagg_phase",
    "secagg_invalid",
}
MAX_ATTEMPTS = 20
# Test hook (tests/integration/test_secagg.py): exit the process at that point of the protocol,
# as a crashed agent would.
_DROP_ENV = "FEDLOOP_TEST_SECAGG_EXIT"


def masked_vector(
    weights: Mapping[str, np.ndarray], num_samples: int, order: list[str] | None = None
) -> NDArray[np.float64]:
    """Return [n·x, n]: num_samples times every floating tensor (in `order`), then n."""
    names = [k for k in (order or list(weights)) if np.asarray(weights[k]).dtype.kind == "f"]
    n = float(num_samples)
    parts = [np.asarray(weights[k], dtype=np.float64).ravel() * n for k in names]
    parts.append(np.array([n]))
    return np.concatenate(parts)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _drop_here(point: str) -> None:
    if os.environ.get(_DROP_ENV) == point:
        log.warning("test hook: exiting at %s", point)
        logging.shutdown()
        os._exit(17)


class _Restart(Exception):
    """The aggregator started the round's secure aggregation over."""


@contextlib.contextmanager
def _restart_on_refusal() -> Iterator[None]:
    """Turn the aggregator's 409 secagg_restart (attempt abandoned) into `_Restart`."""
    try:
        yield
    except Refused as exc:
        if exc.code == "secagg_restart":
            raise _Restart from exc
        raise


def _decode(data: Any) -> dict[str, np.ndarray]:
    """Return the weights of a model body: safetensors bytes or a sequence of their pieces."""
    if not isinstance(data, bytes | bytearray | memoryview):
        data = b"".join(data)
    return codec.decode(data)


def send_secure(agent: Agent, data: Any, meta: Mapping[str, Any]) -> None:
    """Take part in the secure aggregation of the local model `data` (safetensors bytes or
    their pieces); it counts as trained once it was summed in."""
    round_number = int(meta["round"])
    weights = _decode(data)
    order = agent.global_order()  # the model's order, as the aggregator's spec
    if set(order) != set(weights):
        log.warning(
            "round %d: the local model's tensors differ from the global model's; skipped",
            round_number,
        )
        return
    vector = masked_vector(weights, int(meta["num_samples"]), order)
    del weights
    try:
        for _ in range(MAX_ATTEMPTS):
            try:
                _one_attempt(agent, round_number, vector)
            except _Restart:
                continue
            agent.state.rounds_trained += 1
            log.info("round %d: masked local model summed in", round_number)
            return
        log.warning("round %d: secure aggregation kept starting over; skipped", round_number)
    except Refused as exc:
        if exc.code not in SKIPPED:
            raise
        log.info("local model of round %d discarded: %s", round_number, exc)
    except SecAggError as exc:
        log.warning("round %d: secure aggregation failed (%s); skipped", round_number, exc)


def _one_attempt(agent: Agent, round_number: int, vector: NDArray[np.float64]) -> None:
    client = agent.client
    assert agent.state.agent_id is not None
    agent_id = agent.state.agent_id
    # Keys are made before the cohort is known: a provisional config until the key list comes.
    secagg = SecAggClient(1, SecAggConfig(threshold=2, dimension=vector.size))
    advert = secagg.advertise_keys()
    joined = SecAggJoined.model_validate(
        agent._call(
            lambda: client.secagg_post(
                round_number,
                "keys",
                SecAggAdvertise(agent_id=agent_id, c_pk=_b64(advert.c_pk), s_pk=_b64(advert.s_pk)),
            )
        )
    )
    attempt = joined.attempt
    log.info(
        "round %d: joined secure aggregation as client %d (attempt %d)",
        round_number,
        joined.client_id,
        attempt,
    )

    def poll(step: str) -> dict[str, Any]:
        while True:
            if agent.stop_event.is_set():
                raise SecAggError("the agent is stopping")
            with _restart_on_refusal():
                reply = agent._call(
                    lambda: client.secagg_poll(
                        round_number, step, agent_id, attempt, agent.poll_wait
                    )
                )
            if reply is not None:
                return reply

    def post(step: str, message: Any) -> None:
        with _restart_on_refusal():
            agent._call(lambda: client.secagg_post(round_number, step, message))

    keys = SecAggKeyList.model_validate(poll("keys"))
    if keys.dimension != vector.size:
        raise SecAggError(
            f"the aggregator's vectors have {keys.dimension} values, this model {vector.size}"
        )
    config = SecAggConfig(
        keys.threshold, keys.dimension, keys.num_bits, keys.frac_bits, _unb64(keys.session)
    )
    secagg.join(joined.client_id, config)
    table = {
        int(k): AdvertiseKeys(int(k), _unb64(v.c_pk), _unb64(v.s_pk)) for k, v in keys.keys.items()
    }
    shares = secagg.share_keys(table)
    post(
        "shares",
        SecAggShares(
            agent_id=agent_id,
            attempt=attempt,
            ciphertexts={str(v): _b64(c) for v, c in shares.ciphertexts.items()},
        ),
    )
    _drop_here("after_shares")
    relayed = SecAggRelayed.model_validate(poll("shares"))
    masked = secagg.masked_input(
        vector, {int(u): _unb64(c) for u, c in relayed.ciphertexts.items()}
    )
    body = np.asarray(masked.masked).astype(masked.masked.dtype.newbyteorder("<")).tobytes()
    header = SecAggMaskedInput(agent_id=agent_id, attempt=attempt)
    with _restart_on_refusal():
        agent._call(lambda: client.secagg_masked(round_number, header, body))
    survivors = SecAggSurvivors.model_validate(poll("masked"))
    reveal = secagg.unmask(survivors.survivors)
    post(
        "unmask",
        SecAggUnmask(
            agent_id=agent_id,
            attempt=attempt,
            b_shares={str(v): _b64(s) for v, s in reveal.b_shares.items()},
            sk_shares={str(v): _b64(s) for v, s in reveal.sk_shares.items()},
        ),
    )
    # Keep the local model until the round's global model is committed: an aggregator that
    # restarted before that starts the round over (secagg_restart), and this agent with it.
    try:
        poll("unmask")
    except Refused as exc:
        if exc.code not in ("round_closed", "run_finished"):
            raise
