"""Secure aggregation in a deployed run: the aggregator relays and sums masked vectors only.

One `SecureRound` per aggregator round drives `fedloop.privacy.secagg.SecAggServer` through the
four phases of Bonawitz et al. 2017 over HTTP (docs/privacy.md):

    keys → shares → masked → unmask → (sum) → the round's global model

- **Cohort.** The agents that advertise keys for the round, numbered 1..n in arrival order. The
  key phase closes when `Aggregator.needed()` agents (at least 2) have advertised, or
  `phase_timeout` seconds after the first one with at least 2 (and `min_agents`). The Shamir
  threshold is t = max(2, ceil(threshold · n)).
- **Stragglers.** Each later phase closes when every client of the previous one has answered,
  or at `phase_timeout` with at least t. With fewer than t the attempt is abandoned and the
  round starts over at the key phase (a new *attempt*, new keys, new session): agents learn it
  from a 409 ``secagg_restart`` and advertise fresh keys.
- **Session.** Every mask and share is bound to a session of a random per-process nonce (so
  an aggregator that restarted never repeats one), the round number and the attempt.
- **What is summed.** Each agent masks the float vector [n·x, n] — its num_samples n times its
  floating tensors concatenated in the model's order, then n — so the unmasked sum gives Σn·x
  and Σn, and the mean Σn·x / Σn goes into the strategy as one update with Σn samples.
  Only strategies whose aggregate needs nothing but that mean (`Strategy.streaming`) qualify.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import os
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fedloop.config import SecAggSettings
from fedloop.errors import ConfigError, ProtocolError
from fedloop.privacy import shamir
from fedloop.privacy.secagg import (
    AdvertiseKeys,
    MaskedInput,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    ShareKeys,
    UnmaskShares,
)
from fedloop.protocol.codec import ModelSpec
from fedloop.protocol.messages import (
    Message,
    SecAggAccepted,
    SecAggAdvertise,
    SecAggJoined,
    SecAggKeyList,
    SecAggMaskedInput,
    SecAggPublicKeys,
    SecAggRelayed,
    SecAggShares,
    SecAggSurvivors,
    SecAggUnmask,
    parse_message,
)
from fedloop.protocol.version import MESSAGE_HEADER
from fedloop.strategies import Strategy
from fedloop.types import Weights

if TYPE_CHECKING:
    from fedloop.aggregator.service import Aggregator

log = logging.getLogger("fedloop.aggregator")

PHASES = ("keys", "shares", "masked", "unmask", "summing", "done")
LONG_POLL_MAX = 60.0
MAX_SECAGG_JSON = 64 * 1024 * 1024  # shares: n ciphertexts of ~100 bytes each


def check_strategy(strategy: Strategy, asynchronous: bool) -> None:
    """Raise ConfigError unless secure aggregation can compute this strategy's aggregate."""
    if asynchronous:
        raise ConfigError(
            f"secure aggregation ([secagg] enabled) needs synchronous rounds; strategy "
            f"{strategy.name!r} is asynchronous — turn one of them off"
        )
    if not strategy.streaming:
        raise ConfigError(
            f"secure aggregation ([secagg] enabled) reveals only the weighted mean of the "
            f"updates, and strategy {strategy.name!r} needs the individual updates; use "
            "fedavg, fedavgm, fedadam, fedadagrad or fedyogi, or turn secagg off"
        )


def floating(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Return the floating tensors' names and shapes, in the model's order."""
    return [(t.name, t.shape) for t in spec.tensors if t.dtype.startswith("F")]


def dimension(spec: ModelSpec) -> int:
    """Return the length of the masked vector: every floating value, then num_samples."""
    return sum(math.prod(shape) for _, shape in floating(spec)) + 1


def threshold_for(fraction: float, cohort: int) -> int:
    """Return t = max(2, ceil(fraction · n)), never above n."""
    return min(cohort, max(2, math.ceil(fraction * cohort - 1e-9)))


def session_bytes(boot: bytes, round_number: int, attempt: int) -> bytes:
    """Return the session id that binds every key and mask to this process, round and attempt."""
    return b"fedloop-secagg|" + boot + struct.pack(">QI", round_number, attempt)


def mean_weights(
    total: NDArray[np.float64], spec: ModelSpec, global_weights: Weights
) -> tuple[Weights, int]:
    """Return (Σn·x / Σn as the model's tensors, Σn) from an unmasked sum [Σn·x, Σn].

    Non-floating tensors keep the global model's value. Raises SecAggError for Σn <= 0.
    """
    samples = round(float(total[-1]))
    if samples <= 0:
        raise SecAggError(f"the survivors' num_samples sum to {samples}; nothing to average")
    out: Weights = {}
    offset = 0
    shapes = dict(floating(spec))
    for tensor in spec.tensors:
        if tensor.name in shapes:
            size = math.prod(tensor.shape)
            out[tensor.name] = (total[offset : offset + size] / samples).reshape(tensor.shape)
            offset += size
        else:
            out[tensor.name] = np.array(global_weights[tensor.name])
    return out, samples


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"{what} is not base64", 422, "invalid_message") from exc


def _ids(table: dict[str, str], what: str) -> dict[int, bytes]:
    return {int(k): _b64(v, what) for k, v in table.items()}


def _refused(exc: SecAggError) -> ProtocolError:
    return ProtocolError(str(exc), 422, "secagg_invalid")


@dataclass(frozen=True)
class SecureSum:
    """What a finished secure round hands on: the float sum and whose inputs are in it."""

    round: int
    attempt: int
    total: NDArray[np.float64]
    survivors: list[str]  # agent ids


class SecureRound:
    """The state machine of one round's secure aggregation (no HTTP: see `routes`).

    Call the `advertise`/`receive_*` methods as messages arrive and the query methods, which
    answer None while their phase is still open; `wait` long-polls. `run` (a task) closes
    phases at their deadlines; `finish` gets the sum.
    """

    def __init__(
        self,
        number: int,
        settings: SecAggSettings,
        dimension: int,
        needed: Callable[[], int],
        finish: Callable[[SecureSum], Awaitable[None]],
        *,
        min_agents: int = 1,
        boot: bytes | None = None,
    ) -> None:
        self.number = number
        self.settings = settings
        self.dimension = dimension
        self.needed = needed
        self.finish = finish
        self.min_agents = min_agents
        self.boot = boot if boot is not None else os.urandom(16)
        # Attempts start at a random number: an agent still in an attempt of an aggregator
        # process that was restarted is told to start over (secagg_restart), not kept waiting.
        self.attempt = int.from_bytes(os.urandom(3), "big")
        self.closed = False  # the round's global model was committed
        self.failure: str | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._summer: asyncio.Task[None] | None = None
        self._reset()

    # --- lifecycle ------------------------------------------------------------------------
    def _reset(self) -> None:
        self.phase = "keys"
        self.adverts: dict[str, tuple[bytes, bytes]] = {}  # agent id -> (c_pk, s_pk)
        self.ids: dict[str, int] = {}
        self.agents: dict[int, str] = {}
        self.config: SecAggConfig | None = None
        self.server: SecAggServer | None = None
        self.deadline: float | None = None

    def start(self) -> SecureRound:
        """Start the task that closes phases at their deadlines."""
        self._task = asyncio.create_task(self.run())
        return self

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, ready: Callable[[], Any], timeout: float) -> Any:
        """Return ready() once it is not None, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = ready()
            remaining = deadline - time.monotonic()
            if value is not None or remaining <= 0:
                return value
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def run(self) -> None:
        """Close phases at their deadlines until the round's global model is committed."""
        while not self.closed:
            event = self._changed
            timeout = None if self.deadline is None else self.deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                await self._expire()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)

    def _set_deadline(self) -> None:
        self.deadline = time.monotonic() + self.settings.phase_timeout

    def restart(self, reason: str) -> None:
        """Abandon this attempt: every agent starts over at the key phase with fresh keys."""
        log.warning(
            "round %d: secure aggregation attempt %d abandoned (%s); starting over",
            self.number,
            self.attempt,
            reason,
        )
        self.attempt += 1
        self._reset()
        self._notify()

    # --- checks ---------------------------------------------------------------------------
    def _check(self, agent_id: str, attempt: int, phase: str | None = None) -> int:
        if attempt != self.attempt:
            raise ProtocolError(
                f"round {self.number}'s secure aggregation started over (attempt "
                f"{self.attempt}, not {attempt}); advertise new keys",
                409,
                "secagg_restart",
            )
        if agent_id not in self.ids:
            raise ProtocolError(
                f"agent {agent_id} is not in round {self.number}'s secure-aggregation cohort; "
                "it can join the next round",
                409,
                "secagg_closed",
            )
        if phase is not None and self.phase != phase:
            raise ProtocolError(
                f"round {self.number}'s secure aggregation is in phase {self.phase!r}, "
                f"not {phase!r}",
                409,
                "secagg_phase",
            )
        return self.ids[agent_id]

    def _past(self, phase: str) -> bool:
        return PHASES.index(self.phase) > PHASES.index(phase)

    # --- phase 0: keys --------------------------------------------------------------------
    def advertise(self, agent_id: str, c_pk: bytes, s_pk: bytes) -> tuple[int, int]:
        """Take an agent's public keys; return (attempt, its client id)."""
        if self.phase != "keys":
            raise ProtocolError(
                f"round {self.number}'s secure-aggregation cohort is closed; this agent joins "
                "the next round",
                409,
                "secagg_closed",
            )
        if len(c_pk) != 32 or len(s_pk) != 32:
            raise ProtocolError("X25519 public keys are 32 bytes", 422, "secagg_invalid")
        keys = [k for other, pair in self.adverts.items() if other != agent_id for k in pair]
        if c_pk in keys or s_pk in keys or c_pk == s_pk:
            raise ProtocolError("a public key was advertised twice", 422, "secagg_invalid")
        # An agent that restarted within the key phase replaces its keys, keeping its id.
        self.adverts[agent_id] = (c_pk, s_pk)
        if agent_id not in self.ids:
            self.ids[agent_id] = len(self.ids) + 1
            self.agents[self.ids[agent_id]] = agent_id
        if self.deadline is None:
            self._set_deadline()
        if len(self.adverts) >= max(2, self.needed()):
            self._close_keys()
        self._notify()
        return self.attempt, self.ids[agent_id]

    def _close_keys(self) -> None:
        n = len(self.adverts)
        config = SecAggConfig(
            threshold=threshold_for(self.settings.threshold, n),
            dimension=self.dimension,
            num_bits=self.settings.num_bits,
            frac_bits=self.settings.frac_bits,
            session=session_bytes(self.boot, self.number, self.attempt),
        )
        server = SecAggServer(config)
        for agent_id, (c_pk, s_pk) in self.adverts.items():
            server.receive_keys(AdvertiseKeys(self.ids[agent_id], c_pk, s_pk))
        server.key_list()
        self.config, self.server, self.phase = config, server, "shares"
        self._set_deadline()
        log.info(
            "round %d: secure aggregation cohort of %d agents, threshold %d",
            self.number,
            n,
            config.threshold,
        )

    def key_list(self, agent_id: str, attempt: int) -> SecAggKeyList | None:
        """Return the cohort's keys once the key phase closed, else None."""
        if self.phase == "keys" and attempt == self.attempt:
            return None
        self._check(agent_id, attempt)
        assert self.config is not None
        return SecAggKeyList(
            attempt=self.attempt,
            session=base64.b64encode(self.config.session).decode(),
            threshold=self.config.threshold,
            dimension=self.config.dimension,
            num_bits=self.config.num_bits,
            frac_bits=self.config.frac_bits,
            keys={
                str(self.ids[a]): SecAggPublicKeys(
                    c_pk=base64.b64encode(c).decode(), s_pk=base64.b64encode(s).decode()
                )
                for a, (c, s) in self.adverts.items()
            },
        )

    # --- phase 1: shares ------------------------------------------------------------------
    def receive_shares(self, agent_id: str, attempt: int, ciphertexts: dict[int, bytes]) -> None:
        client_id = self._check(agent_id, attempt, "shares")
        assert self.server is not None
        try:
            self.server.receive_shares(ShareKeys(client_id, ciphertexts))
        except SecAggError as exc:
            raise _refused(exc) from exc
        if self.server.received[1] == len(self.adverts):
            self._close_shares()
        self._notify()

    def _close_shares(self) -> None:
        assert self.server is not None
        self.server.close_shares()
        self.phase = "masked"
        self._set_deadline()

    def shares_for(self, agent_id: str, attempt: int) -> SecAggRelayed | None:
        """Return the ciphertexts addressed to this agent once the share phase closed."""
        if self.phase in ("keys", "shares") and attempt == self.attempt:
            return None
        client_id = self._check(agent_id, attempt)
        assert self.server is not None
        if client_id not in self.server.close_shares():
            raise ProtocolError(
                f"agent {agent_id}'s shares did not arrive in time for round {self.number}",
                409,
                "secagg_closed",
            )
        relayed = self.server.shares_for(client_id)
        return SecAggRelayed(
            attempt=self.attempt,
            ciphertexts={str(u): base64.b64encode(c).decode() for u, c in relayed.items()},
        )

    # --- phase 2: masked inputs -----------------------------------------------------------
    def receive_masked(self, agent_id: str, attempt: int, body: bytes | bytearray) -> None:
        client_id = self._check(agent_id, attempt, "masked")
        assert self.server is not None and self.config is not None
        dtype = np.dtype(self.config.dtype).newbyteorder("<")
        if len(body) != self.config.dimension * dtype.itemsize:
            raise ProtocolError(
                f"a masked input of this round is {self.config.dimension} little-endian "
                f"uint{self.config.num_bits} values ({self.config.dimension * dtype.itemsize} "
                f"bytes), not {len(body)} bytes",
                422,
                "secagg_invalid",
            )
        vector = np.frombuffer(body, dtype=dtype).astype(self.config.dtype, copy=False)
        try:
            self.server.receive_masked_input(MaskedInput(client_id, vector))
        except SecAggError as exc:
            raise _refused(exc) from exc
        if self.server.received[2] == len(self.server.close_shares()):
            self._close_masked()
        self._notify()

    def _close_masked(self) -> None:
        assert self.server is not None
        self.server.survivors()
        self.phase = "unmask"
        self._set_deadline()

    def survivors(self, agent_id: str, attempt: int) -> SecAggSurvivors | None:
        """Return U3 once the masked-input phase closed."""
        if not self._past("masked") and attempt == self.attempt:
            return None
        client_id = self._check(agent_id, attempt)
        assert self.server is not None
        alive = self.server.survivors()
        if client_id not in alive:
            raise ProtocolError(
                f"agent {agent_id}'s masked input did not arrive in time for round {self.number}",
                409,
                "secagg_closed",
            )
        return SecAggSurvivors(attempt=self.attempt, survivors=alive)

    # --- phase 3: unmasking ---------------------------------------------------------------
    def receive_unmask(
        self, agent_id: str, attempt: int, b_shares: dict[int, bytes], sk_shares: dict[int, bytes]
    ) -> None:
        client_id = self._check(agent_id, attempt, "unmask")
        assert self.server is not None
        for share in (*b_shares.values(), *sk_shares.values()):
            if len(share) != shamir.SHARE_BYTES:
                raise ProtocolError(
                    f"a share is {shamir.SHARE_BYTES} bytes, not {len(share)}",
                    422,
                    "secagg_invalid",
                )
        try:
            self.server.receive_unmask(UnmaskShares(client_id, b_shares, sk_shares))
        except SecAggError as exc:
            raise _refused(exc) from exc
        if self.server.received[3] == len(self.server.survivors()):
            self._sum()
        self._notify()

    def _sum(self) -> None:
        self.phase = "summing"
        self.deadline = None
        self._summer = asyncio.get_running_loop().create_task(self._summing(self.attempt))

    async def _summing(self, attempt: int) -> None:
        server = self.server
        assert server is not None
        try:
            total = await asyncio.to_thread(server.result)
        except Exception as exc:  # SecAggError, or shares that were wrong in another way
            if not isinstance(exc, SecAggError):
                log.exception("round %d: unmasking failed", self.number)
            if attempt == self.attempt:
                self.restart(str(exc))
            return
        survivors = [self.agents[u] for u in server.survivors()]
        log.info(
            "round %d: secure sum of %d masked inputs (%d in the cohort)",
            self.number,
            len(survivors),
            len(self.adverts),
        )
        self.phase = "done"
        self._notify()
        await self.finish(SecureSum(self.number, attempt, total, survivors))

    def outcome(self, agent_id: str, attempt: int) -> SecAggAccepted | None:
        """Return an acknowledgement once the round's global model is committed."""
        if attempt != self.attempt:
            self._check(agent_id, attempt)
        return SecAggAccepted(attempt=self.attempt) if self.closed else None

    def committed(self) -> None:
        """Note that the aggregator committed the round's global model; wake the waiters."""
        self.closed = True
        self._notify()

    # --- deadlines ------------------------------------------------------------------------
    async def _expire(self) -> None:
        server, config = self.server, self.config
        if self.phase == "keys":
            if len(self.adverts) >= max(2, self.min_agents):
                self._close_keys()
            else:
                self.deadline = None  # wait for a second agent, however long
        elif self.phase == "shares":
            assert server is not None and config is not None
            if server.received[1] >= config.threshold:
                self._close_shares()
            else:
                self.restart("too few agents shared keys in time")
        elif self.phase == "masked":
            assert server is not None and config is not None
            if server.received[2] >= config.threshold:
                self._close_masked()
            else:
                self.restart("too few masked inputs arrived in time")
        elif self.phase == "unmask":
            assert server is not None and config is not None
            if server.received[3] >= config.threshold:
                self._sum()
            else:
                self.restart("too few agents answered the unmasking round in time")
        self._notify()


class SecureAggregation:
    """The aggregator's secure rounds: one `SecureRound` for the current round at a time."""

    def __init__(self, aggregator: Aggregator) -> None:
        check_strategy(aggregator.strategy, aggregator.asynchronous)
        self.agg = aggregator
        self.settings = aggregator.config.secagg
        self.boot = os.urandom(16)  # a restarted aggregator never reuses a session
        self.current: SecureRound | None = None

    def round(self, number: int) -> SecureRound:
        """Return round `number`'s secure round, refusing a round that is not the open one."""
        agg = self.agg
        if agg.finished:
            raise ProtocolError(
                f"the run is finished after round {agg.global_round}", 409, "run_finished"
            )
        if agg.spec is None:
            raise ProtocolError("no model is registered yet", 409, "no_model")
        if number < agg.round or (number == agg.round and agg.closing):
            raise ProtocolError(
                f"round {number} is closed; the current round is {agg.round}", 409, "round_closed"
            )
        if number > agg.round:
            raise ProtocolError(
                f"round {number} is not open yet; the current round is {agg.round}",
                409,
                "round_not_open",
            )
        current = self.current
        if current is None or current.number != number:
            if current is not None:
                current.cancel()
            current = SecureRound(
                number,
                self.settings,
                dimension(agg.spec),
                agg.needed,
                self._finish,
                min_agents=agg.config.min_agents,
                boot=self.boot,
            ).start()
            self.current = current
        return current

    async def _finish(self, result: SecureSum) -> None:
        agg = self.agg
        assert agg.spec is not None and agg.global_model is not None
        try:
            weights, samples = mean_weights(result.total, agg.spec, agg.global_model.weights)
        except SecAggError as exc:
            log.error("round %d: secure aggregation gave no model: %s", result.round, exc)
            if self.current is not None and self.current.number == result.round:
                self.current.restart(str(exc))
            return
        await agg.secure_result(result.round, weights, samples, result.survivors)
        current = self.current
        if current is None or current.number != result.round:
            return
        if agg.round > result.round or agg.finished:
            current.committed()
        else:
            current.restart("the aggregation failed")


# --- HTTP -------------------------------------------------------------------------------------


async def _read(request: Request, limit: int) -> bytearray:
    """Return the request body, refusing it as soon as it passes `limit` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ProtocolError(f"body exceeds the limit of {limit} bytes", 413, "too_large")
    return body


def _reply(message: Message) -> JSONResponse:
    return JSONResponse(message.model_dump())


def _not_yet() -> Response:
    return Response(status_code=204, headers={"x-fedloop-status": "not-yet"})


def routes(agg: Aggregator) -> list[Route]:
    """Return the `/v1/secagg/{round}/…` routes (docs/privacy.md); 409 while secagg is off."""

    def secure() -> SecureAggregation:
        if agg.secure is None:
            raise ProtocolError(
                "secure aggregation is off on this aggregator ([secagg] enabled = false); "
                "upload local models to /v1/updates",
                409,
                "secagg_off",
            )
        return agg.secure

    async def agent(request: Request, agent_id: str) -> None:
        principal = await agg.authenticate(request.headers.get("authorization"))
        agg.require_agent(principal, agent_id)
        agg.known_agent(agent_id)

    def number(request: Request) -> int:
        value = int(request.path_params["round"])
        if value > 2**62:
            raise ProtocolError(f"round {value} is not open yet", 409, "round_not_open")
        return value

    def query(request: Request) -> tuple[str, int, float]:
        params = request.query_params
        agent_id = params.get("agent_id", "")
        if not agent_id or len(agent_id) > 64:
            raise ProtocolError("'agent_id' is required", 400, "bad_request")
        try:
            attempt = int(params.get("attempt", "0"))
            wait = float(params.get("wait", "0"))
        except ValueError as exc:
            raise ProtocolError(
                "'attempt' must be an integer and 'wait' a number", 400, "bad_request"
            ) from exc
        if not math.isfinite(wait):
            raise ProtocolError("'wait' must be a finite number", 400, "bad_request")
        return agent_id, attempt, min(max(wait, 0.0), LONG_POLL_MAX)

    async def poll(request: Request, pick: Callable[[SecureRound, str, int], Any]) -> Response:
        agent_id, attempt, wait = query(request)
        await agent(request, agent_id)
        current = secure().round(number(request))
        answer = await current.wait(lambda: pick(current, agent_id, attempt), wait)
        return _not_yet() if answer is None else _reply(answer)

    async def post_keys(request: Request) -> Response:
        await agg.authenticate(request.headers.get("authorization"))  # before reading a body
        message = parse_message(SecAggAdvertise, bytes(await _read(request, 1024 * 1024)))
        await agent(request, message.agent_id)
        current = secure().round(number(request))
        attempt, client_id = current.advertise(
            message.agent_id, _b64(message.c_pk, "c_pk"), _b64(message.s_pk, "s_pk")
        )
        return _reply(SecAggJoined(attempt=attempt, client_id=client_id))

    async def get_keys(request: Request) -> Response:
        return await poll(request, lambda r, a, t: r.key_list(a, t))

    async def post_shares(request: Request) -> Response:
        await agg.authenticate(request.headers.get("authorization"))
        message = parse_message(SecAggShares, bytes(await _read(request, MAX_SECAGG_JSON)))
        await agent(request, message.agent_id)
        current = secure().round(number(request))
        ciphertexts = _ids(message.ciphertexts, "a ciphertext")
        current.receive_shares(message.agent_id, message.attempt, ciphertexts)
        return _reply(SecAggAccepted(attempt=current.attempt))

    async def get_shares(request: Request) -> Response:
        return await poll(request, lambda r, a, t: r.shares_for(a, t))

    async def post_masked(request: Request) -> Response:
        await agg.authenticate(request.headers.get("authorization"))
        message = parse_message(SecAggMaskedInput, request.headers.get(MESSAGE_HEADER))
        await agent(request, message.agent_id)
        current = secure().round(number(request))
        # Checked before the body is read: a masked input is never larger than this.
        body = await _read(request, current.dimension * 8)
        current.receive_masked(message.agent_id, message.attempt, body)
        agg.stats["bytes_in"] += len(body)
        return _reply(SecAggAccepted(attempt=current.attempt))

    async def get_masked(request: Request) -> Response:
        return await poll(request, lambda r, a, t: r.survivors(a, t))

    async def get_unmask(request: Request) -> Response:
        return await poll(request, lambda r, a, t: r.outcome(a, t))

    async def post_unmask(request: Request) -> Response:
        await agg.authenticate(request.headers.get("authorization"))
        message = parse_message(SecAggUnmask, bytes(await _read(request, MAX_SECAGG_JSON)))
        await agent(request, message.agent_id)
        current = secure().round(number(request))
        current.receive_unmask(
            message.agent_id,
            message.attempt,
            _ids(message.b_shares, "a share"),
            _ids(message.sk_shares, "a share"),
        )
        return _reply(SecAggAccepted(attempt=current.attempt))

    base = "/v1/secagg/{round:int}"
    return [
        Route(f"{base}/keys", post_keys, methods=["POST"]),
        Route(f"{base}/keys", get_keys, methods=["GET"]),
        Route(f"{base}/shares", post_shares, methods=["POST"]),
        Route(f"{base}/shares", get_shares, methods=["GET"]),
        Route(f"{base}/masked", post_masked, methods=["POST"]),
        Route(f"{base}/masked", get_masked, methods=["GET"]),
        Route(f"{base}/unmask", post_unmask, methods=["POST"]),
        Route(f"{base}/unmask", get_unmask, methods=["GET"]),
    ]
