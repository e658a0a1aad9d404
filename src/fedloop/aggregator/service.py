"""The aggregator's round logic, independent of HTTP: one instance per process.

All state changes happen under one asyncio lock and are committed to the store before they are
visible, so a process killed at any instant restarts into a state it had already committed.

Two modes, chosen by the strategy's ``asynchronous`` flag (docs/decisions/0003-async-mode.md):
synchronous rounds with a barrier, or asynchronous buffering, where uploads trained on any
global model up to the current one are accepted (stale ones weighted by the strategy) and every
``buffer_size`` of them make the next global model. Either way ``self.round`` is the number the
next global model will get, and a local model's row is filed under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedloop._loading import load_engine
from fedloop.aggregator.secure import SecureAggregation
from fedloop.aggregator.side import ShippedParts, UploadSide
from fedloop.config import AggregatorConfig
from fedloop.errors import ConfigError, ProtocolError
from fedloop.logs import current_agent, set_round_source
from fedloop.protocol import codec
from fedloop.protocol.codec import ModelSpec
from fedloop.protocol.messages import (
    GlobalModelInfo,
    MetricsReport,
    PushMessage,
    RegisterRequest,
    RegisterResponse,
    StatusResponse,
    UploadRequest,
    UploadResponse,
)
from fedloop.security import tokens
from fedloop.store.blobs import BlobStore, BodyPool, PooledBody, new_hasher
from fedloop.store.db import (
    REVOCATIONS_KEY,
    AgentRow,
    DuplicateUpload,
    GlobalModelRow,
    LocalModelRow,
    Store,
    TokenSpent,
    database_url,
)
from fedloop.strategies import RunningMean, Strategy, Update
from fedloop.strategies import load as load_strategy
from fedloop.strategies.dp import privacy_metrics
from fedloop.strategies.fedavg import returns_mean
from fedloop.types import Weights

log = logging.getLogger("fedloop.aggregator")

SPEC_KEY = "model_spec"
# Seconds before a failed aggregation is tried again (a full disk, the database away, an
# evaluator that raised), doubling after each failure up to the second figure.
AGGREGATION_RETRY = (1.0, 30.0)
# Seconds an agent is asked to wait (`Retry-After`) before sending again a local model that
# could not be stored: a full disk stays full until someone makes room, and every try sends
# the whole model again (without it, agents tried every 5 s).
STORAGE_RETRY_AFTER = 10.0
# Seconds between looks at whether `fedloop token revoke` (another process, writing to the
# database) revoked an agent: one read of a meta row, with auth on.
REVOCATION_CHECK = 1.0


# An upload with what checking it gave (its weights and stored blob's id, or the refusal), and
# what filing it gives.
_Checked = tuple[UploadRequest, codec.Bytes, "tuple[Weights, str] | ProtocolError"]
_Outcome = UploadResponse | ProtocolError


@dataclass
class GlobalModel:
    """The latest global model, kept encoded so that serving it costs no work.

    ``parts`` are its safetensors bytes in pieces: the header, then views of the tensors of
    ``weights`` (`codec.encode_parts`), so the model is held once — no joined copy — and the
    HTTP layer streams the pieces as they are.
    """

    round: int
    weights: Weights
    parts: tuple[bytes | memoryview, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    # Its blob's id once stored: same-machine readers (simulation workers) map that file.
    model_id: str | None = None
    # The tensors its strategy ships to agents with it (SCAFFOLD's c, …), encoded; None: none.
    shipped: ShippedParts | None = None

    @classmethod
    def of(
        cls,
        round: int,
        weights: Weights,
        metrics: dict[str, float],
        encoded: codec.Bytes | None = None,
    ) -> GlobalModel:
        """Return the global model holding `weights` (read-only views of them) and their pieces.

        ``encoded``: the buffer `weights` were computed into (`codec.encode_into`). When it
        holds their encoding, it is the model's one piece: hashed, written and sent whole.
        """
        held: Weights = {}
        for name, tensor in weights.items():
            # C order, as encode_parts needs: its pieces are then these very tensors' memory.
            view = np.asarray(tensor, order="C").view()
            view.flags.writeable = False  # the served bytes are these tensors' memory
            held[name] = view
        if encoded is not None and codec.holds_encoding(encoded, held):
            return cls(round, held, (memoryview(encoded).toreadonly(),), metrics)
        return cls(round, held, tuple(codec.encode_parts(held)), metrics)

    @property
    def nbytes(self) -> int:
        """The length of its safetensors bytes."""
        return sum(len(part) for part in self.parts)

    @property
    def data(self) -> bytes:
        """Its safetensors bytes joined: a copy of the model, for callers that need one buffer."""
        return b"".join(self.parts)


@dataclass(frozen=True)
class Principal:
    """Who sent a request, as its bearer token says (auth on): the token's kind and binding."""

    kind: str  # tokens.ENROLLMENT, tokens.CREDENTIAL or tokens.ADMIN
    token_id: int
    name: str  # the agent name an enrollment token or credential is bound to
    agent_id: str | None  # set on credentials


def _unauthenticated(detail: str, code: str = "unauthenticated") -> ProtocolError:
    return ProtocolError(detail, 401, code)


def _forbidden(detail: str, code: str) -> ProtocolError:
    return ProtocolError(detail, 403, code)


def needed_uploads(threshold: float, registered: int, min_agents: int) -> int:
    """Return how many local models close a round: ceil(threshold × agents), at least min_agents."""
    # The epsilon keeps 0.7 × 10 = 7.000000000000001 from needing 8.
    return max(1, min_agents, math.ceil(threshold * registered - 1e-9))


class Aggregator:
    """Registers agents, accepts local models, aggregates, and announces global models."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(database_url(config.data_dir, config.database_url))
        self.blobs = BlobStore(config.data_dir / "blobs", fsync=config.fsync_models)
        # Upload buffers, reused round after round; page-aligned, so that the blob store
        # writes a model from them straight to the disk.
        self.bodies = BodyPool(PooledBody)
        # Global models' buffers (`codec.encode_into`), the same: one is free again once the
        # model after it is current and no download of it is in flight.
        self.global_buffers = BodyPool(PooledBody)
        self.strategy: Strategy = load_strategy(config.strategy.name, **config.strategy.params)
        if self.strategy.min_updates > config.max_agents:
            raise ConfigError(
                f"strategy {self.strategy.name!r} with {config.strategy.params or 'its defaults'} "
                f"aggregates no fewer than {self.strategy.min_updates} local models, but "
                f"max_agents = {config.max_agents}: raise max_agents or change its parameters"
            )
        self.evaluator: Any = (
            load_engine(config.evaluate.engine, **config.evaluate.params)
            if config.evaluate is not None
            else None
        )
        self.lock = asyncio.Lock()
        self.spec: ModelSpec | None = None
        # The strategy's side tensors (SCAFFOLD, FedCurv), once the model is known; None for
        # strategies without (FedAvg, …), whose uploads take the path they always took.
        self.side: UploadSide | None = None
        self.agents: dict[str, str] = {}  # id -> name
        self.agent_ids: dict[str, str] = {}  # name -> id
        self.last_seen: dict[str, float] = {}
        self.connected: set[str] = set()
        # Agents `fedloop token revoke` took out of the run (auth on): not counted by `needed`.
        self.revoked: frozenset[str] = frozenset()
        self._revocations: Any = None  # the store's REVOCATIONS_KEY when last looked at
        self.round = 0  # the round collecting local models; 0 until the model is registered
        self.round_started = 0.0
        self.global_model: GlobalModel | None = None
        self.pending: dict[str, Update] = {}
        # Streaming strategies fold each upload into a running sum as it arrives, so memory is
        # O(model size); `pending` then keeps only the uploads' metadata (weights={}).
        self.running = RunningMean()
        self.asynchronous = bool(self.strategy.asynchronous)
        # Async mode: the newest base model each agent uploaded from, to refuse duplicates.
        self.last_base: dict[str, int] = {}
        self.closing = False
        self.finished = False
        # After a failed aggregation: when (time.monotonic()) to try again, and the last wait.
        self._retry_at: float | None = None
        self._retry_wait = 0.0
        # Each push connection's queue, with its agent.
        self.subscribers: dict[asyncio.Queue[PushMessage], str] = {}
        # Agents with a long poll for the next global model in flight (`wait_for_global`):
        # the model is their answer, and its WebSocket announcement is not sent to them.
        self.waiting: Counter[str] = Counter()
        self._new_global = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # keeps aggregation tasks from being GC'd
        # Checked uploads of a synchronous round waiting to be filed, and the task filing them.
        self._to_file: list[tuple[list[_Checked], asyncio.Future[list[_Outcome]]]] = []
        self._filer: asyncio.Task[None] | None = None
        # Each agent's turn to send a local model over HTTP (`upload_turn`): one at a time.
        self._upload_turns: dict[str, asyncio.Lock] = {}
        # Blobs of local models written but not yet filed, by content address: a refused
        # upload's blob is deleted unless another upload of the same bytes still needs it.
        self._claims: Counter[str] = Counter()
        self._claims_lock = threading.Lock()
        self.stats = {"uploads": 0, "rejected": 0, "bytes_in": 0, "bytes_out": 0}
        self.rejected_by_reason: dict[str, int] = {}
        self.aggregation_seconds: list[float] = []  # per aggregation, for /metrics
        # Secure aggregation ([secagg]): rounds run through /v1/secagg, never /v1/updates.
        self.secure = SecureAggregation(self) if config.secagg.enabled else None

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the committed state (a restart resumes the same round) and start the clock."""
        await asyncio.to_thread(self._load)
        least = self.strategy.min_updates
        if least > self.config.min_agents:
            log.warning(
                "strategy %r aggregates no fewer than %d local models: a round waits for %d "
                "uploads even when aggregation_threshold, min_agents or its deadline would "
                "close it with fewer",
                self.strategy.name,
                least,
                least,
            )
        self._ticker = asyncio.create_task(self._tick())
        set_round_source(lambda: self.round or None)
        # Killed after the last upload of a round committed but before its aggregation did.
        self._maybe_close("threshold")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        await asyncio.to_thread(self.store.close)

    def _load(self) -> None:
        spec = self.store.get_meta(SPEC_KEY)
        self.spec = ModelSpec.from_json(spec) if spec else None
        for agent in self.store.agents():
            self.agents[agent.id] = agent.name
            self.agent_ids[agent.name] = agent.id
            self.last_seen[agent.id] = agent.last_seen
        if self.config.auth:
            self._revocations = self.store.get_meta(REVOCATIONS_KEY)
            self.revoked = frozenset(a for a in self.store.revoked_agents() if a in self.agents)
        latest = self.store.latest_global()
        if latest is not None:
            data = self.blobs.get(latest.model_id)
            # The stored bytes as they are (one piece), the weights as views into them.
            self.global_model = GlobalModel(
                latest.round, codec.decode(data), (data,), dict(latest.metrics), latest.model_id
            )
            if latest.state_id:
                self.strategy = self._committed_strategy(latest)
            self.finished = bool(self.config.rounds) and latest.round >= self.config.rounds
            self._side_for(self.global_model)
        opened = self.store.open_round()
        if opened is None and self.global_model is not None and not self.finished:
            # `rounds` was raised after the run had finished: no round was opened after the
            # final global model (commit_global opens none), so open it now, as the start of
            # the round (its deadline, its `seconds`), and file its uploads under its row.
            opened = self.store.start_round(self.global_model.round + 1)
            log.info(
                "the run goes on after global model %d (rounds = %s)",
                self.global_model.round,
                self.config.rounds or "0, no limit",
            )
        if opened is not None:
            self.round, self.round_started = opened.number, opened.started_at
            dropped: list[int] = []
            for row in self.store.local_models(opened.number):
                if not self.blobs.exists(row.model_id):  # keep_local_models was off
                    log.warning(
                        "round %d: the local model of %s was not kept; it is dropped, and the "
                        "agent may send it again",
                        opened.number,
                        row.agent_id,
                    )
                    dropped.append(row.id)
                    continue
                weights = codec.decode(self.blobs.get(row.model_id))
                extras: Weights = {}
                if self.side is not None:  # the extras are stored with the local model
                    weights, extras = self.side.split(weights)
                self._hold(
                    Update(
                        weights=weights,
                        num_samples=row.num_samples,
                        agent_id=row.agent_id,
                        base_round=row.base_round,
                        metrics=dict(row.metrics),
                        extras=extras,
                    )
                )
            # Its row goes too: it would refuse the agent's re-send as a duplicate, and the
            # round would wait for ever for a model it will never count.
            self.store.drop_local_models(dropped)
        elif self.global_model is not None:  # finished: nothing is filed under this round
            self.round = self.global_model.round + 1
        if self.asynchronous:
            for row in self.store.local_models():
                self.last_base[row.agent_id] = max(
                    row.base_round, self.last_base.get(row.agent_id, -1)
                )
        self._collect_orphans()
        if self.round:
            log.info(
                "resumed round %d with %d agents and %d local models",
                self.round,
                len(self.agents),
                len(self.pending),
            )

    def _collect_orphans(self) -> None:
        """Delete blobs no row names: written by a request that died before its commit."""
        referenced = self.store.referenced_blobs()
        for key in self.blobs.keys() - referenced:
            self.blobs.delete(key)
        for tmp in self.blobs.root.glob("*/*/.tmp-*"):
            tmp.unlink(missing_ok=True)

    # --- queries --------------------------------------------------------------------------
    @property
    def global_round(self) -> int:
        return -1 if self.global_model is None else self.global_model.round

    @property
    def least(self) -> int:
        """The fewest local models an aggregation takes: min_agents, or the strategy's own
        minimum (Krum, Bulyan) when larger, with which its aggregate would fail."""
        return max(self.config.min_agents, self.strategy.min_updates)

    @property
    def agents_in_run(self) -> int:
        """Registered agents that are not revoked: those the threshold is a fraction of."""
        return len(self.agents) - len(self.revoked)

    def needed(self) -> int:
        """Return how many local models close the round (fill the buffer, asynchronous)."""
        if self.asynchronous:
            # An agent waits for a newer global model after each upload, so a buffer larger
            # than the number of agents would never fill; min_agents still bounds it below.
            buffer = min(self.strategy.buffer_size, self.agents_in_run)
            return max(1, self.least, buffer)
        return needed_uploads(self.config.aggregation_threshold, self.agents_in_run, self.least)

    def counted(self) -> int:
        """Return how many of the open round's local models count toward `needed`: those of
        agents in the run. One accepted before its agent was revoked stays in the round and
        its aggregate (it was acknowledged), but does not stand in for an agent in the run."""
        # Looked up in `pending`, not iterated: a worker thread may be filing uploads into it.
        return len(self.pending) - sum(agent in self.pending for agent in self.revoked)

    def status(self) -> StatusResponse:
        timeout = self.config.round_timeout
        deadline = None
        if timeout and self.round and not self.finished:
            deadline = max(0.0, self.round_started + timeout - time.time())
        return StatusResponse(
            round=self.round,
            global_round=self.global_round,
            registered_agents=len(self.agents),
            uploads=self.counted(),
            needed=self.needed(),
            deadline_in=deadline,
            finished=self.finished,
            strategy=self.strategy.name,
            asynchronous=self.asynchronous,
        )

    def global_info(self) -> GlobalModelInfo:
        assert self.global_model is not None
        return GlobalModelInfo(
            round=self.global_model.round,
            config=self.strategy.round_config(self.global_model.round + 1),
            finished=self.finished,
            side=None
            if self.side is None
            else self.side.info(self.global_model.shipped is not None),
        )

    def _side_for(self, model: GlobalModel) -> None:
        """Learn the strategy's side tensors for the model (once it is known), and encode
        what the strategy ships with `model`."""
        assert self.spec is not None
        self.side = UploadSide.of(self.strategy, self.spec, model.weights)
        if self.side is not None:
            model.shipped = self.side.ship(self.strategy, model.weights)

    async def shipped(self, round_number: int) -> ShippedParts:
        """Return the tensors the strategy shipped with global model `round_number`, encoded
        (`GET /v1/models/global/{round}/state`); a 404 ProtocolError when there are none."""
        model = self.global_model
        if model is not None and model.round == round_number:
            parts = model.shipped
        else:
            parts = await asyncio.to_thread(self._shipped_of, round_number)
        if parts is None:
            raise ProtocolError(
                f"strategy {self.strategy.name!r} ships no tensors with global model "
                f"{round_number}",
                404,
                "no_state",
            )
        return parts

    def _shipped_of(self, round_number: int) -> ShippedParts | None:
        """What the strategy shipped with an older global model: from its committed state."""
        row = self.store.global_model(round_number) if round_number <= 2**63 - 1 else None
        if row is None:
            raise ProtocolError(
                f"there is no global model for round {round_number}", 404, "no_such_round"
            )
        if self.side is None:
            return None
        weights = codec.decode(self.blobs.get(row.model_id))
        return self.side.ship(self._committed_strategy(row), weights)

    async def wait_for_global(
        self, after: int, timeout: float, agent_id: str | None = None
    ) -> GlobalModel | None:
        """Return the latest global model if newer than `after`, waiting up to `timeout` s.

        `agent_id`: the agent that waits, which then gets no WebSocket announcement of the
        model while it waits (the answer is the model itself).
        """
        if agent_id is None:
            return await self._wait_for_global(after, timeout)
        self.waiting[agent_id] += 1
        try:
            return await self._wait_for_global(after, timeout)
        finally:
            self.waiting[agent_id] -= 1
            if self.waiting[agent_id] <= 0:
                del self.waiting[agent_id]

    async def _wait_for_global(self, after: int, timeout: float) -> GlobalModel | None:
        deadline = time.monotonic() + timeout
        while True:
            model = self.global_model
            if model is not None and model.round > after:
                return model
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            event = self._new_global
            try:
                # Waited for in this task: `asyncio.wait_for` would wait in a task of its own
                # and wake this one a pass of the loop later, after the announcement's
                # WebSocket senders (deploy 10 × 4 MB: the first download began 1.2 ms after
                # the announcement instead of 0.1 ms).
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                return None

    def known_agent(self, agent_id: str) -> None:
        if agent_id not in self.agents:
            raise ProtocolError(
                f"agent {agent_id!r} is not registered with this aggregator; register first",
                404,
                "unknown_agent",
            )
        current_agent.set(agent_id)  # every log line of this request names the agent
        self.last_seen[agent_id] = time.time()

    # --- identity (auth on) ----------------------------------------------------------------
    async def authenticate(self, authorization: str | None) -> Principal | None:
        """Return who an `Authorization` header says sent a request; None while auth is off.

        Raises a 401 ProtocolError for a missing, unknown, revoked, expired or spent token.
        """
        if not self.config.auth:
            return None
        secret = tokens.bearer(authorization)
        if secret is None:
            raise _unauthenticated(
                "this aggregator requires 'Authorization: Bearer <token>': to register, an "
                "enrollment token from its operator (fedloop token create; give it to the agent "
                "as --token or FEDLOOP_TOKEN), the agent's own credential after that"
            )
        row = await asyncio.to_thread(self.store.token_by_hash, tokens.hash_secret(secret))
        if row is None:
            raise _unauthenticated("the bearer token is not known to this aggregator")
        if row.revoked_at is not None:
            raise _unauthenticated(
                f"the {row.kind} token for {row.name!r} was revoked; ask the operator for a new "
                "enrollment token",
                "token_revoked",
            )
        if row.expires_at is not None and time.time() >= row.expires_at:
            raise _unauthenticated(
                f"the {row.kind} token for {row.name!r} has expired; ask the operator for a new "
                "one",
                "token_expired",
            )
        if row.kind == tokens.ENROLLMENT and row.used_at is not None:
            raise _unauthenticated(
                f"the enrollment token for {row.name!r} was already used; an enrolled agent "
                "authenticates with the credential it received (kept in its workdir)",
                "token_used",
            )
        return Principal(row.kind, row.id, row.name, row.agent_id)

    @staticmethod
    def require_agent(principal: Principal | None, agent_id: str) -> None:
        """Refuse (403) unless the request comes from agent `agent_id`'s own credential."""
        if principal is None:
            return
        if principal.kind != tokens.CREDENTIAL:
            raise _forbidden(
                f"this request needs an agent's credential, not an {principal.kind} token",
                "wrong_token_type",
            )
        if principal.agent_id != agent_id:
            raise _forbidden(
                f"the credential belongs to agent {principal.agent_id} ({principal.name!r}); "
                f"an agent can only act as itself, not as {agent_id}",
                "wrong_agent",
            )

    @staticmethod
    def require_reader(principal: Principal | None) -> None:
        """Refuse (403) an enrollment token where an agent's credential or admin token is due."""
        if principal is not None and principal.kind not in (tokens.CREDENTIAL, tokens.ADMIN):
            raise _forbidden(
                "global models are for enrolled agents: register with the enrollment token, "
                "then use the credential it returns",
                "wrong_token_type",
            )

    @staticmethod
    def require_admin(principal: Principal | None) -> None:
        """Refuse (403) anything but an admin token (fedloop token admin)."""
        if principal is not None and principal.kind != tokens.ADMIN:
            raise _forbidden(
                f"this needs an admin token (fedloop token admin), not an {principal.kind} token",
                "wrong_token_type",
            )

    def check_registrant(self, principal: Principal | None, name: str) -> None:
        """Refuse (403) a token that may not register agent `name`."""
        if principal is None:
            return
        if principal.kind == tokens.ADMIN:
            raise _forbidden(
                "an admin token cannot register an agent; use an enrollment token made by "
                f"fedloop token create --name {name}",
                "wrong_token_type",
            )
        if principal.kind == tokens.ENROLLMENT and principal.name != name:
            raise _forbidden(
                f"the enrollment token is for agent {principal.name!r}, not {name!r}",
                "wrong_agent",
            )
        if principal.kind == tokens.CREDENTIAL and principal.agent_id != self.agent_ids.get(name):
            raise _forbidden(
                f"the credential belongs to agent {principal.name!r}; it cannot register {name!r}",
                "wrong_agent",
            )

    async def _enroll(
        self, principal: Principal | None, agent_id: str, name: str, now: float, new_agent: bool
    ) -> str | None:
        """Spend an enrollment token on `agent_id`; return its new credential (or None)."""
        if principal is None or principal.kind != tokens.ENROLLMENT:
            if new_agent:
                await asyncio.to_thread(self.store.add_agent, agent_id, name, now)
            return None
        credential = tokens.new_secret(tokens.CREDENTIAL_PREFIX)
        try:
            await asyncio.to_thread(
                self.store.enroll,
                principal.token_id,
                agent_id,
                name,
                tokens.hash_secret(credential),
                now,
                new_agent,
            )
        except TokenSpent as exc:
            raise _unauthenticated(
                f"the enrollment token for {name!r} was used or revoked meanwhile", "token_used"
            ) from exc
        log.info("agent %s (%s) enrolled with token #%d", name, agent_id, principal.token_id)
        return credential

    # --- registration ---------------------------------------------------------------------
    async def register(
        self,
        request: RegisterRequest,
        body: codec.Bytes,
        principal: Principal | None = None,
    ) -> RegisterResponse:
        """The book's participate → welcome: the same name always gets the same id.

        With auth on, `principal` is an enrollment token for this name (a new agent, or a known
        one that lost its credential: it gets a new one, the old one is revoked) or the agent's
        own credential (nothing new is issued).
        """
        # Checked before the lock is taken: a large model's values (or a long header) would
        # hold up every other request that needs it meanwhile.
        spec, weights = self.spec, None
        if body:
            weights = await asyncio.to_thread(codec.decode_checked, body, spec)
        async with self.lock:
            self.check_registrant(principal, request.agent_name)
            if weights is not None and spec is None and self.spec is not None:
                # The first model was registered meanwhile: this one must match it.
                codec.check_against(weights, self.spec, finite=False)
            existing = self.agent_ids.get(request.agent_name)
            credential = None
            if existing is not None:
                agent_id = existing
                credential = await self._enroll(
                    principal, agent_id, request.agent_name, time.time(), new_agent=False
                )
                if credential is not None:  # a new credential: a revoked agent is back
                    self._set_revoked(self.revoked - {agent_id})
            else:
                if len(self.agents) >= self.config.max_agents:
                    raise ProtocolError(
                        f"the aggregator already has its maximum of "
                        f"{self.config.max_agents} agents",
                        403,
                        "too_many_agents",
                    )
                if self.spec is None and weights is None:
                    raise ProtocolError(
                        "the first agent must send its initial model: it fixes the model's "
                        "tensor names, shapes and dtypes",
                        422,
                        "initial_model_required",
                    )
                agent_id = uuid.uuid4().hex[:16]
                now = time.time()
                if self.spec is None:
                    assert weights is not None
                    # A crash between the bootstrap and the enrollment leaves the agent known
                    # and the token unspent: the agent's retry with it re-enrolls.
                    await asyncio.to_thread(
                        self._bootstrap, agent_id, request.agent_name, weights, now
                    )
                    self.agents[agent_id] = request.agent_name
                    self.agent_ids[request.agent_name] = agent_id
                    self._announce()
                    credential = await self._enroll(
                        principal, agent_id, request.agent_name, now, new_agent=False
                    )
                else:
                    credential = await self._enroll(
                        principal, agent_id, request.agent_name, now, new_agent=True
                    )
                self.agents[agent_id] = request.agent_name
                self.agent_ids[request.agent_name] = agent_id
                log.info(
                    "agent %s registered as %s (%d agents)",
                    request.agent_name,
                    agent_id,
                    len(self.agents),
                )
            self.last_seen[agent_id] = time.time()
            return RegisterResponse(
                agent_id=agent_id,
                round=self.round,
                global_round=self.global_round,
                finished=self.finished,
                asynchronous=self.asynchronous,
                credential=credential,
                secure_aggregation=self.secure is not None,
            )

    def _bootstrap(self, agent_id: str, name: str, weights: Weights, now: float) -> None:
        """Fix the model from the first agent and store round 0's global model."""
        spec = ModelSpec.of(weights)
        # Views into the registration body, not copies: round 0's model is held once.
        model = GlobalModel.of(0, weights if self.config.init_weights else spec.zeros(), {})
        initial = model.weights
        model_id = self.blobs.put_parts(model.parts)
        self.store.bootstrap(
            {SPEC_KEY: spec.to_json()},
            AgentRow(id=agent_id, name=name, registered_at=now, last_seen=now),
            GlobalModelRow(
                round=0,
                model_id=model_id,
                contributors=[],
                total_samples=0,
                metrics={},
                seconds=0.0,
                state_id=None,
                created_at=now,
            ),
            now,
        )
        self.spec = spec
        metrics = self._evaluate(initial)
        if metrics:
            self.store.set_global_metrics(0, metrics)
        model.metrics, model.model_id = metrics, model_id
        self._side_for(model)
        self.global_model = model
        self.round, self.round_started = 1, now

    # --- uploads --------------------------------------------------------------------------
    def _check_round(self, agent_id: str, round_number: int) -> None:
        if self.finished:
            raise ProtocolError(
                f"the run is finished after round {self.global_round}; no more uploads",
                409,
                "run_finished",
            )
        if self.asynchronous:
            self._check_async(agent_id, round_number)
            return
        if self.side is not None:
            self._check_side_duplicate(agent_id, round_number)
        if round_number < self.round or (round_number == self.round and self.closing):
            raise ProtocolError(
                f"round {round_number} is closed; the current round is {self.round} — fetch "
                "the latest global model and train on it",
                409,
                "round_closed",
            )
        if round_number > self.round:
            raise ProtocolError(
                f"round {round_number} is not open yet; the current round is {self.round}",
                409,
                "round_not_open",
            )
        if agent_id in self.pending:
            raise ProtocolError(
                f"agent {agent_id} already uploaded a local model for round {round_number}",
                409,
                "duplicate_upload",
            )

    def _check_side_duplicate(self, agent_id: str, round_number: int) -> None:
        """Refuse as duplicate_upload an upload whose round already has this agent's local
        model, also after the round closed: with side tensors (SCAFFOLD's c_i) the agent keeps
        what follows from an upload the aggregator took, and a retry whose first answer was
        lost must tell it so, not round_closed."""
        if round_number == self.round:
            mine = agent_id in self.pending
        elif round_number < self.round:
            row = self.store.global_model(round_number) if round_number >= 0 else None
            mine = row is not None and agent_id in row.contributors
        else:
            return
        if mine:
            raise ProtocolError(
                f"agent {agent_id} already uploaded a local model for round {round_number}, "
                "and the aggregator has it",
                409,
                "duplicate_upload",
            )

    def _check_async(self, agent_id: str, round_number: int) -> None:
        """Accept any base model up to the current global one, once per agent and base model."""
        base = round_number - 1
        if base > self.global_round:
            raise ProtocolError(
                f"global model {base} does not exist yet; the latest is {self.global_round}",
                409,
                "round_not_open",
            )
        if agent_id in self.pending:
            raise ProtocolError(
                f"agent {agent_id} already has a local model in the buffer of global model "
                f"{self.round}; wait for that global model and train on it",
                409,
                "duplicate_upload",
            )
        if base <= self.last_base.get(agent_id, -1):
            raise ProtocolError(
                f"agent {agent_id} already uploaded a local model trained on global model "
                f"{self.last_base[agent_id]}; train on a newer global model",
                409,
                "duplicate_upload",
            )

    @property
    def streams(self) -> bool:
        return self.strategy.streaming and not self.asynchronous

    def _hold(self, update: Update) -> None:
        """Keep an accepted upload for aggregation: folded in, or whole for other strategies."""
        self._hold_all([update])

    def _hold_all(self, updates: list[Update]) -> None:
        """Keep accepted uploads for aggregation, in order; uploads filed together are folded
        together (one pass over the sums)."""
        if self.streams:
            # The uploads that close the round are folded by the aggregation, in the pass that
            # divides the sums. Others are folded on all cores too: the round waits on the
            # filing, and a fold on one thread left a core idle while others waited for the lock
            # (deploy 10 × 4 MB 0.066 → 0.064 s a round, sim 10 × 100 MB 0.416 → 0.385 s).
            self.running.add_many(updates, parallel=True, last=self._closes(updates))
            updates = [
                Update(
                    weights={},
                    num_samples=update.num_samples,
                    agent_id=update.agent_id,
                    base_round=update.base_round,
                    metrics=update.metrics,
                )
                for update in updates
            ]
        for update in updates:
            self.pending[update.agent_id] = update

    def _files_inline(self, updates: list[Update]) -> bool:
        """Whether filing `updates` is short enough for the event loop's thread: a row in
        SQLite and no fold of the model (the round's first upload, the one that closes it, a
        strategy that keeps uploads as they are). Each hop to a worker thread and back costs
        66–89 µs of CPU on the reference VM, and the round waits for it (docs/performance.md,
        eighteenth pass). Asynchronous rounds always hop: their aggregations write meanwhile."""
        if self.asynchronous or not self.store.writes_inline:
            return False
        if not self.streams:
            return True
        return not self.running.folds(updates, last=self._closes(updates))

    def _closes(self, updates: list[Update]) -> bool:
        """Whether holding `updates` too makes enough uploads to close the round."""
        more = sum(update.agent_id not in self.revoked for update in updates)
        return self.counted() + more >= self.needed()

    def _file_and_hold(
        self, rows: list[LocalModelRow], updates: list[Update], inline: bool = False
    ) -> list[DuplicateUpload | None]:
        """Store accepted uploads' rows (one transaction), then hold them; an upload whose row
        is a duplicate is not held and gets its DuplicateUpload back, in order. ``inline``:
        the rows are written on the caller's thread (`Store.writes_inline`)."""
        try:
            self.store.add_local_models(rows, inline)
            refused: list[DuplicateUpload | None] = [None] * len(rows)
        except DuplicateUpload:
            if len(rows) == 1:
                raise
            refused = []  # find which: one row at a time
            for row in rows:
                try:
                    self.store.add_local_models([row], inline)
                    refused.append(None)
                except DuplicateUpload as exc:
                    refused.append(exc)
        self._hold_all([u for u, d in zip(updates, refused, strict=True) if d is None])
        return refused

    def _check_and_store(self, body: codec.Bytes) -> tuple[Weights, str] | ProtocolError:
        """Validate a local model and write its blob (outside the lock: uploads overlap);
        return the refusal instead for a body that is not a valid model, or a 5xx one (507
        when the disk is full) for a blob that could not be written."""
        assert self.spec is not None
        # A body hashed as it was filled (`HashedBody.digest`, a simulation worker's
        # `MappedBody`) is not hashed again; a large one from the HTTP layer is hashed here,
        # in the pass that checks its values (`direct`: not on the event loop's thread).
        digest: str | None = getattr(body, "digest", None)
        hasher = new_hasher() if digest is None else None
        spec = self.spec
        if self.side is not None:  # the body holds the strategy's extra tensors too
            refusal = self.side.refusal(body)
            if refusal is not None:
                return refusal
            spec = self.side.spec
        try:
            # A simulation worker checked the values it wrote (`MappedBody.finite`): names,
            # shapes and dtypes are checked here, every value again only for other bodies.
            weights = codec.decode_checked(body, spec, not getattr(body, "finite", False), hasher)
        except ProtocolError as exc:
            return exc
        digest = hasher.hexdigest() if hasher is not None else digest
        assert digest is not None
        if not self.config.keep_local_models:  # the row keeps the content address only
            return weights, digest
        with self._claims_lock:  # before the write: no refused twin may delete it meanwhile
            self._claims[digest] += 1
        try:
            return weights, self.blobs.put(body, key=digest)
        except OSError as exc:
            self._unclaim([digest], [])
            # The aggregator's fault, not the model's: a 5xx, which agents send again later.
            log.error("a local model could not be stored: %s", exc)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            return ProtocolError(
                f"the aggregator could not store the model ({exc.strerror}); send it again later",
                507 if full else 503,
                "storage_full" if full else "storage_error",
                retry_after=STORAGE_RETRY_AFTER,
            )

    async def upload(self, request: UploadRequest, body: codec.Bytes) -> UploadResponse:
        """Accept a local model for the current round, or refuse it with the reason."""
        (outcome,) = await self.upload_many([(request, body)])
        if isinstance(outcome, ProtocolError):
            raise outcome
        return outcome

    def _unclaim(self, filed: list[str], refused: list[str]) -> None:
        """Release the claims on blobs written for uploads now filed or `refused`, and delete
        those of the refused that nothing else names: no row, no upload still in flight (a
        refused upload changes nothing, its blob included)."""
        with self._claims_lock:
            for key in (*filed, *refused):
                self._claims[key] -= 1
                if self._claims[key] <= 0:
                    del self._claims[key]
            unclaimed = {key for key in refused if key not in self._claims}
            if not unclaimed:
                return
            # Under the claims lock: an upload of the same bytes claims it again only after.
            for key in unclaimed - self.store.referenced_among(unclaimed):
                self.blobs.delete(key)

    @contextlib.asynccontextmanager
    async def upload_turn(self, request: UploadRequest) -> AsyncIterator[None]:
        """Hold the agent's turn to upload while its body is read and the upload filed.

        An upload the round would refuse anyway (unknown agent, round closed, a local model
        already in) is refused here, before its body is read. An agent sends one local model at
        a time: a second upload (a retry whose first try is still being read, or a flood of
        them) waits for the first's answer, its body unread (its connection's idle timeout
        does not run meanwhile), then is checked again: refused as duplicate_upload if the
        first was taken, read if it was not.
        """
        refusal = self._refusal(request)
        if refusal is not None:
            raise refusal
        turn = self._upload_turns.setdefault(request.agent_id, asyncio.Lock())
        async with turn:
            refusal = self._refusal(request)
            if refusal is not None:
                raise refusal
            yield

    def _refusal(self, request: UploadRequest) -> ProtocolError | None:
        """Return why an upload is refused before its body is looked at, or None."""
        try:
            self.known_agent(request.agent_id)
            if self.secure is not None:
                raise ProtocolError(
                    "this aggregator runs secure aggregation: local models go masked through "
                    "/v1/secagg, never in the clear; upgrade the agent",
                    409,
                    "secagg_required",
                )
            self._check_round(request.agent_id, request.round)
            if self.spec is None:
                raise ProtocolError("no model is registered yet", 409, "no_model")
        except ProtocolError as exc:
            return exc
        return None

    async def upload_many(
        self, uploads: Sequence[tuple[UploadRequest, codec.Bytes]]
    ) -> list[UploadResponse | ProtocolError]:
        """Accept or refuse each of several local models, in order, with the reason.

        An HTTP upload is a batch of one; the simulation hands over the local models that are
        ready together: one thread hop validates and stores them all, one transaction files
        their rows. Asynchronous rounds take one upload at a time.
        """
        if self.asynchronous and len(uploads) > 1:
            raise ValueError("asynchronous rounds take one upload at a time")
        outcomes: list[UploadResponse | ProtocolError | None] = [
            self._refusal(request) for request, _ in uploads
        ]
        todo = [i for i, outcome in enumerate(outcomes) if outcome is None]
        if not todo:
            return [o for o in outcomes if o is not None]
        # The blobs are written before their rows commit; if the round closes meanwhile, a blob
        # is an orphan that the next start-up deletes.
        checked = await asyncio.to_thread(
            lambda: [self._check_and_store(uploads[i][1]) for i in todo]
        )
        batch = [(*uploads[i], result) for i, result in zip(todo, checked, strict=True)]
        if self.asynchronous:
            async with self.lock:
                filed = await self._file(batch)
        else:
            filed = await self._file_with_others(batch)
        for i, outcome in zip(todo, filed, strict=True):
            outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    async def _file_with_others(self, batch: list[_Checked]) -> list[_Outcome]:
        """File a batch of checked uploads together with those that wait for the lock with it.

        Uploads of a synchronous round that arrive while others are being filed queue here and
        are filed by one task, all together: one thread hop, one transaction for their rows,
        instead of taking the lock one after another (deploy 10 × 4 MB: the last uploads of a
        round waited ≈ 2 ms each for their turn). The filing runs in its own task, so a
        request that goes away does not leave the others unanswered.
        """
        future: asyncio.Future[list[_Outcome]] = asyncio.get_running_loop().create_future()
        self._to_file.append((batch, future))
        if self._filer is None:
            self._filer = asyncio.create_task(self._file_waiting())
        return await future

    async def _file_waiting(self) -> None:
        """File every batch that waits in `_to_file`, each time all of them at once."""
        try:
            while self._to_file:
                waiting, self._to_file = self._to_file, []
                try:
                    async with self.lock:
                        filed = await self._file([c for batch, _ in waiting for c in batch])
                        self._maybe_close("threshold")
                except BaseException as exc:
                    for _, future in waiting:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                at = 0
                for batch, future in waiting:
                    if not future.done():  # its request went away
                        future.set_result(filed[at : at + len(batch)])
                    at += len(batch)
        finally:
            self._filer = None
            for _, future in self._to_file:  # cancelled with uploads still queued
                if not future.done():
                    future.cancel()
            self._to_file = []

    async def _file(self, batch: list[_Checked]) -> list[_Outcome]:
        """File checked uploads (the lock is held): their rows in one transaction, then each
        one held for aggregation and answered, or refused with the reason, in order."""
        outcomes: list[_Outcome | None] = [None] * len(batch)
        now = time.time()
        # Synchronous uploads are trained on the current global model by construction.
        accepted: list[tuple[int, LocalModelRow, Update]] = []
        for i, (request, body, result) in enumerate(batch):
            if isinstance(result, ProtocolError):
                outcomes[i] = result
                continue
            try:  # the round may have changed while decoding
                self._check_round(request.agent_id, request.round)
            except ProtocolError as exc:
                outcomes[i] = exc
                continue
            weights, model_id = result
            extras: Weights = {}
            if self.side is not None:
                weights, extras = self.side.split(weights)
            base = request.round - 1 if self.asynchronous else self.global_round
            row = LocalModelRow(
                agent_id=request.agent_id,
                round=self.round,
                base_round=base,
                model_id=model_id,
                num_samples=request.num_samples,
                metrics=request.metrics,
                nbytes=len(body),
                created_at=now,
            )
            update = Update(
                weights=weights,
                num_samples=request.num_samples,
                agent_id=request.agent_id,
                base_round=base,
                metrics=request.metrics,
                extras=extras,
            )
            accepted.append((i, row, update))
        if accepted:
            rows, updates = [a[1] for a in accepted], [a[2] for a in accepted]
            try:
                if self._files_inline(updates):
                    duplicates = self._file_and_hold(rows, updates, inline=True)
                else:  # one hop to a thread for all: the rows, then their fold (one pass)
                    duplicates = await asyncio.to_thread(self._file_and_hold, rows, updates)
            except DuplicateUpload as exc:
                duplicates = [exc]
            held = len(self.pending) - sum(d is None for d in duplicates)
            for (i, row, _), duplicate in zip(accepted, duplicates, strict=True):
                if duplicate is not None:
                    outcomes[i] = ProtocolError(str(duplicate), 409, "duplicate_upload")
                    continue
                held += 1
                outcomes[i] = await self._accepted(batch[i][0], row, held, len(batch[i][1]))
        if self.config.keep_local_models:
            await self._release_blobs(batch, outcomes)
        return [o for o in outcomes if o is not None]

    async def _release_blobs(self, batch: list[_Checked], outcomes: list[_Outcome | None]) -> None:
        """Release the blobs written for `batch` once its rows are filed; a refused upload's
        blob goes (`_unclaim`), on a worker thread, since that asks the database."""
        filed: list[str] = []
        refused: list[str] = []
        for (_, _, result), outcome in zip(batch, outcomes, strict=True):
            if not isinstance(result, ProtocolError):  # its blob was written
                (refused if isinstance(outcome, ProtocolError) else filed).append(result[1])
        if refused:
            await asyncio.to_thread(self._unclaim, filed, refused)
        elif filed:
            self._unclaim(filed, [])

    async def _accepted(
        self, request: UploadRequest, row: LocalModelRow, uploads: int, nbytes: int
    ) -> UploadResponse:
        """Count, log and answer one accepted upload (the lock is held)."""
        self.stats["uploads"] += 1
        self.stats["bytes_in"] += nbytes
        needed, filed, base = self.needed(), self.round, row.base_round
        log.info(
            "round %d: local model from %s (%d/%d)%s",
            self.round,
            request.agent_id,
            uploads,
            needed,
            f", trained on global model {base}, staleness {self.global_round - base}"
            if self.asynchronous
            else "",
        )
        if self.asynchronous:
            self.last_base[request.agent_id] = base
            if self.counted() >= needed:
                # Aggregated while the lock is still held, so no upload can slip in between
                # the buffer filling and the new global model.
                await self._aggregate_now("buffer full")
        # Async mode: `round` is the global model this upload goes into; the agent waits for
        # it before training again.
        return UploadResponse(
            accepted=True,
            round=filed if self.asynchronous else request.round,
            uploads=uploads,
            needed=needed,
        )

    async def report(self, request: MetricsReport) -> None:
        """Store an agent's evaluation of a global model on its own data."""
        self.known_agent(request.agent_id)
        if request.round > self.global_round:
            raise ProtocolError(
                f"global model {request.round} does not exist yet", 409, "no_such_round"
            )
        try:
            await asyncio.to_thread(
                self.store.add_evaluation, request.agent_id, request.round, request.metrics
            )
        except DuplicateUpload as exc:
            raise ProtocolError(str(exc), 409, "duplicate_report") from exc

    async def secure_result(
        self, round_number: int, mean: Weights, total_samples: int, survivors: list[str]
    ) -> None:
        """Aggregate a secure round from its unmasked weighted mean (aggregator/secure.py).

        The strategy gets the mean as one update with the survivors' total num_samples; the
        survivors are the global model's contributors. Individual counts stay secret, so the
        total is filed under the first survivor and 0 under the others.
        """
        async with self.lock:
            if round_number != self.round or self.closing or self.finished or self.pending:
                log.warning("round %d: secure result arrived too late; dropped", round_number)
                return
            self.closing = True
            base = self.global_round
            for i, agent_id in enumerate(sorted(survivors)):
                update = Update(
                    weights=mean if i == 0 else {},
                    num_samples=total_samples if i == 0 else 0,
                    agent_id=agent_id,
                    base_round=base,
                )
                if i == 0:
                    await asyncio.to_thread(self._hold, update)
                else:
                    self.pending[agent_id] = update
            await self._aggregate_now("secure aggregation")
            if self.round == round_number:  # failed: let the secure round start over
                self.pending, self.running = {}, RunningMean(self.running.max_held)

    # --- aggregation ----------------------------------------------------------------------
    def _maybe_close(self, reason: str) -> None:
        if (
            self.round
            and not self.closing
            and not self.finished
            and self.pending
            and self.counted() >= self.needed()
        ):
            self.closing = True
            self._spawn(self._close_round(reason))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_round(self, reason: str) -> None:
        async with self.lock:
            if not self.pending or self.finished:  # an async upload aggregated them meanwhile
                self.closing = False
                return
            await self._aggregate_now(reason)

    async def _aggregate_now(self, reason: str) -> None:
        """Aggregate the pending local models and announce the result; the lock must be held.

        A failure leaves the round open with its uploads, and the aggregation is tried again
        after `AGGREGATION_RETRY` (`_tick`): the uploads are all in, so no later upload would
        close the round, and the agents wait for its global model.
        """
        try:
            await asyncio.to_thread(self._aggregate, reason)
            self._announce()
            self._retry_wait = 0.0
        except Exception as exc:
            first, most = AGGREGATION_RETRY
            self._retry_wait = min(most, max(first, 2 * self._retry_wait))
            log.error(
                "aggregation of round %d failed (%s); the round stays open, tried again in %.0f s",
                self.round,
                exc,
                self._retry_wait,
                # A full or failing disk is said in one line; anything else (a strategy's or an
                # evaluator's bug, the database) with its traceback.
                exc_info=not isinstance(exc, OSError),
            )
            try:
                # As a restart would: the failed try may have changed the strategy (FedAdam's
                # moments, a privacy accountant), and the retry must not take its step twice.
                self.strategy = await asyncio.to_thread(
                    lambda: self._committed_strategy(self.store.latest_global())
                )
            except Exception:
                log.exception("the strategy's state of the last global model did not reload")
            self._retry_at = time.monotonic() + self._retry_wait
            self.closing = False

    def _committed_strategy(self, latest: GlobalModelRow | None) -> Strategy:
        """Return a new strategy as configured, in the state committed with `latest` (the
        last global model's row)."""
        strategy = load_strategy(self.config.strategy.name, **self.config.strategy.params)
        if latest is not None and latest.state_id:
            strategy.load_state(codec.decode(self.blobs.get(latest.state_id)))
        return strategy

    def _evaluate(self, weights: Weights) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        config = self.config.evaluate.config if self.config.evaluate else {}
        metrics = self.evaluator.evaluate(weights, dict(config))
        return {k: float(v) for k, v in metrics.items()}

    def _aggregate(self, reason: str) -> None:
        assert self.global_model is not None and self.spec is not None
        started = time.perf_counter()
        updates = [self.pending[k] for k in sorted(self.pending)]
        if not any(u.num_samples for u in updates):
            # No local model carries any weight: the global model stays as it is, and so does
            # the strategy's state (docs/decisions/0014-rounds-without-samples.md).
            log.warning(
                "round %d: every local model reports num_samples=0 (trained on no data); "
                "the global model stays as it was",
                self.round,
            )
            self._file_global(reason, started, updates, self.global_model.weights, None, None)
            return
        # FedAvg returns the running mean itself: let it come out in the model's dtypes,
        # divided and cast in one pass, instead of a float64 copy cast back afterwards.
        like = self.global_model.weights if returns_mean(self.strategy) else None
        # The mean goes straight into the new global model's encoding: one buffer, reused
        # from the model before last. Fresh arrays cost page faults every round (deploy 2 ×
        # 4 MB: 183 against 4 minor faults a round; aggregation 3.2 instead of 3.6 ms). One
        # upload is its own mean (its body's views): no buffer is taken for it.
        encoded, out = (
            codec.encode_into(self.spec, self.global_buffers.acquire)
            if like is not None and self.streams and self.running.count > 1
            else (None, None)
        )
        self.strategy.population = len(self.agents)
        # Async strategies take t, the version the updates' staleness is measured against.
        result = self.strategy.aggregate(
            self.global_model.weights,
            [self.running.as_update(self.global_round, like=like, out=out)]
            if self.streams
            else self._with_base_models(updates),
            server_round=self.global_round if self.asynchronous else self.round,
        )
        self._file_global(reason, started, updates, result, like, encoded)

    def _file_global(
        self,
        reason: str,
        started: float,
        updates: list[Update],
        result: Weights,
        like: Weights | None,
        encoded: codec.Bytes | None,
    ) -> None:
        """Store, commit and make current the round's global model `result`, made from
        `updates`. ``like`` is set when `result` is FedAvg's mean of checked uploads (finite
        already); ``encoded`` is the buffer it was computed into, if any."""
        assert self.global_model is not None and self.spec is not None
        new = {
            t.name: np.asarray(result[t.name], dtype=codec._DTYPES[t.dtype])
            for t in self.spec.tensors
        }
        # A weighted mean of finite uploads (each one checked) is finite: it lies between their
        # smallest and largest values. Other strategies' results are checked.
        codec.check_against(new, self.spec, finite=like is None, parallel=True)
        # Held once: the pieces it is served and stored from are views of these tensors (for
        # one FedAvg upload, of the upload's own body), not a joined encoding beside them.
        model = GlobalModel.of(self.round, new, {}, encoded)
        del encoded  # only the model's views keep the buffer from being reused
        new = model.weights
        model_id = self.blobs.put_parts(model.parts)
        state = self.strategy.state()
        state_id = self.blobs.put(codec.encode(state)) if state else None
        if self.side is not None:
            model.shipped = self.side.ship(self.strategy, new)
        metrics = self._evaluate(new)
        # The (ε, δ) spent up to and including this round, kept with its global model for
        # `fedloop history` and the report; a restart reloads the state that produced it.
        metrics.update(privacy_metrics(self.strategy))
        now = time.time()
        finished = bool(self.config.rounds) and self.round >= self.config.rounds
        self.store.commit_global(
            GlobalModelRow(
                round=self.round,
                model_id=model_id,
                contributors=[u.agent_id for u in updates],
                total_samples=sum(u.num_samples for u in updates),
                metrics=metrics,
                seconds=now - self.round_started,
                state_id=state_id,
                created_at=now,
            ),
            next_round=None if finished else self.round + 1,
            now=now,
        )
        elapsed = time.perf_counter() - started
        self.aggregation_seconds.append(elapsed)
        del self.aggregation_seconds[:-1000]  # /metrics needs recent ones, not all forever
        log.info(
            "round %d aggregated (%s) from %d local models in %.3f s%s",
            self.round,
            reason,
            len(updates),
            elapsed,
            f"; {metrics}" if metrics else "",
        )
        model.metrics, model.model_id = metrics, model_id
        self.global_model = model
        self.finished = finished
        self.pending = {}
        # Emptied, not replaced: its float64 sums are reused next round (no fresh 2 × model
        # allocation and its page faults every round).
        self.running.reset()
        self.round += 1
        self.round_started = now
        self.closing = False

    def _with_base_models(self, updates: list[Update]) -> list[Update]:
        """Return the updates, each stale one given the global model it was trained on
        (`Update.base_weights`) when the strategy takes deltas against it (FedBuff).

        The stored global models are read here, once per distinct older base round, and
        dropped with these copies after the aggregation: O(model) per distinct base round,
        only while aggregating. Nothing is kept with the buffer, so uploads that a restart
        reloads (`_load`) need nothing more than their rows' base_round.
        """
        if not self.strategy.needs_base_models:
            return updates
        current = self.global_round
        bases: dict[int, Weights] = {}
        for base_round in sorted({u.base_round for u in updates} - {current}):
            row = self.store.global_model(base_round)
            if row is None:
                raise RuntimeError(f"global model {base_round} is not in the store")
            bases[base_round] = codec.decode(self.blobs.get(row.model_id))
        return [
            replace(u, base_weights=bases[u.base_round]) if u.base_round in bases else u
            for u in updates
        ]

    def _announce(self) -> None:
        message = PushMessage(round=self.global_round, finished=self.finished)
        # The long polls first: their agents wait for this model (`wait_for_global`). The
        # WebSocket announcements, for agents still training, go out after their downloads;
        # an agent whose long poll gets the model is not told twice. Each one cost the event
        # loop ≈ 0.2 ms and the agent two thread wake-ups (deploy 2 × 4 MB, 10 pairs of runs:
        # rounds 0.0172 → 0.0152 s, agents' CPU 3.7 → 3.2 ms a round; docs/performance.md).
        self._new_global.set()
        self._new_global = asyncio.Event()
        for queue, agent_id in list(self.subscribers.items()):
            if not self.waiting.get(agent_id):
                queue.put_nowait(message)

    async def _tick(self) -> None:
        """Close a round at its deadline or retry its failed aggregation, learn of revoked
        agents, and persist last-contact times now and then."""
        flushed: dict[str, float] = {}
        revocations_due = time.monotonic() + REVOCATION_CHECK
        while True:
            await asyncio.sleep(0.2)
            # After a failed aggregation, neither closes the round before its retry is due.
            waiting = self._retry_at is not None and time.monotonic() < self._retry_at
            if self._retry_at is not None and not waiting:
                self._retry_at = None
                self._maybe_close("retry")
            if self.config.auth and time.monotonic() >= revocations_due:
                revocations_due = time.monotonic() + REVOCATION_CHECK
                await self._check_revocations()
            timeout = self.config.round_timeout
            if (
                timeout
                and not waiting
                and self.round
                and not self.closing
                and not self.finished
                and time.time() - self.round_started >= timeout
                and len(self.pending) >= self.least
            ):
                self.closing = True
                self._spawn(self._close_round("deadline"))
            changed = {k: v for k, v in self.last_seen.items() if flushed.get(k) != v}
            if changed:
                try:
                    await asyncio.to_thread(self.store.touch_agents, changed)
                    flushed.update(changed)
                except Exception:  # the store may be briefly locked; try again next tick
                    log.debug("could not persist last contact times", exc_info=True)

    async def _check_revocations(self) -> None:
        """Learn of revocations that `fedloop token revoke` wrote to the database: each one
        changes one meta row, so only then are the revoked agents looked up."""
        try:
            marker = await asyncio.to_thread(self.store.get_meta, REVOCATIONS_KEY)
            if marker == self._revocations:
                return
            revoked = await asyncio.to_thread(self.store.revoked_agents)
        except Exception:  # the store may be briefly locked; look again next time
            log.debug("could not read the revocations", exc_info=True)
            return
        self._revocations = marker
        self._set_revoked(revoked)

    def _set_revoked(self, revoked: set[str] | frozenset[str]) -> None:
        """Take the `revoked` agents out of the run (and put back those no longer revoked);
        close the open round if the uploads of the agents left are now enough."""
        now = frozenset(agent for agent in revoked if agent in self.agents)
        gone, back = now - self.revoked, self.revoked - now
        if not gone and not back:
            return
        self.revoked = now
        for agent_id in sorted(gone):
            log.warning(
                "agent %s (%s) was revoked: it is out of the run; a round now needs %d local "
                "models, %d agents are left",
                self.agents[agent_id],
                agent_id,
                self.needed(),
                self.agents_in_run,
            )
        for agent_id in sorted(back):
            log.info(
                "agent %s (%s) enrolled again: back in the run", self.agents[agent_id], agent_id
            )
        if self._retry_at is None:  # a failed aggregation keeps its backoff
            self._maybe_close("revocation")

    def subscribe(self, agent_id: str) -> asyncio.Queue[PushMessage]:
        queue: asyncio.Queue[PushMessage] = asyncio.Queue()
        self.subscribers[queue] = agent_id
        self.connected.add(agent_id)
        if self.global_model is not None:
            queue.put_nowait(PushMessage(round=self.global_round, finished=self.finished))
        return queue

    def unsubscribe(self, agent_id: str, queue: asyncio.Queue[PushMessage]) -> None:
        self.subscribers.pop(queue, None)
        self.connected.discard(agent_id)

    def agent_rows(self) -> list[AgentRow]:
        return self.store.agents()
