"""`Agent`: drives a user's ML engine through rounds, resuming from its directory after a crash."""

from __future__ import annotations

import dataclasses
import logging
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np

from fedloop.agent.client import (
    POLL_GAP,
    AggregatorClient,
    ModelBody,
    PushListener,
    Refused,
    body_parts,
    retry,
)
from fedloop.agent.keeper import LocalKeeper
from fedloop.agent.side import KeptTensors, StrategySide, kept_file
from fedloop.agent.state import AgentState, Phase, StateDir
from fedloop.errors import EngineError, FedloopError
from fedloop.protocol import codec
from fedloop.protocol.messages import RegisterResponse, SideTensors
from fedloop.types import Weights

log = logging.getLogger("fedloop.agent")
T = TypeVar("T")

# Refusals after which a trained model is dropped: a newer global model overtook it.
_OVERTAKEN = {"round_closed", "round_not_open", "run_finished"}
# Refusals of a local model damaged on disk (e.g. by a power loss): drop it, wait for the next.
_DAMAGED = {"bad_model", "wrong_names", "wrong_shape", "wrong_dtype"}


@runtime_checkable
class Engine(Protocol):
    """A user's ML engine: anything with this `train` (and optionally `evaluate`)."""

    def train(
        self, weights: Weights, config: dict[str, Any]
    ) -> tuple[Weights, int, Mapping[str, float]]: ...


class Agent:
    """An FL client: register, wait for the global model, train, upload, repeat."""

    def __init__(
        self,
        engine: Any,
        aggregator_url: str,
        name: str,
        workdir: str | Path | None = None,
        *,
        mode: Literal["push", "poll"] = "push",
        initial_weights: Mapping[str, np.ndarray] | None = None,
        max_rounds: int | None = None,
        evaluate_global: bool = True,
        poll_wait: float = 10.0,
        backoff_max: float = 5.0,
        give_up_after: float | None = None,
        tls: ssl.SSLContext | None = None,
        enrollment_token: str | None = None,
        keep_local_after: float = 1.0,
    ) -> None:
        """``keep_local_after``: seconds an upload may take before the local model is written
        to `workdir` for a restart to upload it again (0: always written). An upload answered
        sooner needs no copy on disk; an agent killed before it is written trains again.

        ``poll_wait``: seconds one request for the next global model may wait for it (a long
        poll, in both modes; the aggregator caps it at 60). One that comes back without a
        model is followed by the next no sooner than `POLL_GAP` (0.5 s) after it started, so
        that a `poll_wait` of 0 polls twice a second, not as fast as the network answers.
        `stop()` takes effect once the request in flight returns."""
        if not hasattr(engine, "train"):
            raise FedloopError("the ML engine must have a train(weights, config) method")
        self.engine = engine
        self.url = aggregator_url
        self.name = name
        self.dir = StateDir(workdir or Path(tempfile.gettempdir()) / f"fedloop-agent-{name}")
        self.mode = mode
        self.initial_weights = initial_weights
        self.max_rounds = max_rounds
        self.evaluate_global = evaluate_global and hasattr(engine, "evaluate")
        self.poll_wait = poll_wait
        self.backoff_max = backoff_max
        self.give_up_after = give_up_after
        self.tls = tls
        # With auth on: the one-time enrollment token goes with the first registration, which
        # answers with this agent's own credential; that is kept in `dir` and sent from then on.
        self.enrollment_token = enrollment_token
        self.credential = self.dir.load_credential(name)
        self.client = AggregatorClient(
            aggregator_url,
            verify=tls if tls is not None else True,
            token=self.credential or enrollment_token,
        )
        self.stop_event = threading.Event()
        self.push: PushListener | None = None
        self.state = self.dir.load(name)
        # Set by the aggregator at registration: stale local models are still welcome.
        self.asynchronous = False
        # Set by the aggregator at registration: local models go through secure aggregation.
        self.secure_aggregation = False
        # The global model an accepted upload goes into must exist before training again
        # (async mode: with a buffer, the current global model is not it). Not persisted: after
        # a restart the aggregator refuses the one duplicate this can cause.
        self._wait_after = -1
        # The files in `dir` are for resuming after a crash; while running, the same bytes are
        # kept here so a round does not read back what it has just written.
        # The global bytes are dropped once trained on (and before the next download), and the
        # local model is kept as views of the engine's tensors (`codec.encode_parts`), so a round
        # holds one copy of the model besides the engine's.
        self._global_bytes: tuple[int, bytes | bytearray] | None = None
        self._local: tuple[ModelBody, dict[str, Any]] | None = None
        self._order: list[str] | None = None  # the global model's tensor names, in order
        # The local model of the round being sent, written to `dir` if its upload is slow.
        self._keeper = LocalKeeper(keep_local_after, self._save_local)
        # With a strategy that has side tensors: the extras of the local model being sent.
        self._extras: tuple[int, Weights] | None = None

    @property
    def keep_local_after(self) -> float:
        """Seconds an upload may take before its local model is written (the keeper's)."""
        return self._keeper.after

    # --- helpers --------------------------------------------------------------------------
    def _call(self, action: Callable[[], T]) -> T:
        def note(exc: Exception, delay: float) -> None:
            log.warning("%s; retrying in %.1f s", exc, delay)

        return retry(action, self.stop_event, self.backoff_max, self.give_up_after, note)

    def _enter(self, phase: Phase) -> None:
        # Not fsynced: a killed agent keeps it; see StateDir.save for a power loss.
        self._saved()  # the phase saved with a local model goes first
        self.state.phase = phase
        self.dir.save(self.state, durable=False)

    def _save_local(self, data: ModelBody, meta: dict[str, Any], state: AgentState) -> None:
        self.dir.save_local(data, meta)
        self.dir.save(state, durable=False)

    def _saved(self) -> None:
        """Return once the local model being kept is on disk with its phase (raise its error);
        one whose upload was not answered is written now."""
        self._keeper.finish()

    def _initial_weights(self) -> Weights | None:
        if self.initial_weights is not None:
            return dict(self.initial_weights)
        make = getattr(self.engine, "initial_weights", None)
        return make() if callable(make) else None

    # --- the state machine ----------------------------------------------------------------
    def register(self) -> str:
        """Register (again) and return the agent id; the first time the initial model goes along.

        A directory kept from another run (a new aggregator, or its database replaced) is
        noticed here: the aggregator gives this name another id, asks for the initial model, or
        is behind the round the directory holds. The agent then starts over from the
        aggregator's round instead of waiting for a round that will not come.
        """
        known = self.state.agent_id
        weights = None if known else self._initial_weights()
        try:
            reply = self._register(weights)
        except Refused as exc:
            if exc.code != "initial_model_required" or weights is not None:
                raise
            # The aggregator has no model yet: this directory is from an earlier run.
            weights = self._initial_weights()
            if weights is None:
                raise
            log.warning("the aggregator holds no model yet: a new run; sending the initial model")
            reply = self._register(weights)
        if reply.credential:
            # Before the state: an agent killed in between finds its credential on restart.
            self.dir.save_credential(self.name, reply.credential)
            self.credential = self.client.token = reply.credential
            log.info("enrolled; credential kept in %s", self.dir.credential_file)
        stale = None
        if known is not None and reply.agent_id != known:
            stale = f"it knows this name as agent {reply.agent_id}, not {known}"
        elif self.state.global_round > reply.global_round:
            stale = (
                f"its newest global model is {reply.global_round}, "
                f"this directory holds {self.state.global_round}"
            )
        if stale is not None:
            log.warning(
                "%s is from another run of the aggregator (%s); starting over",
                self.dir.path,
                stale,
            )
            self._start_over()
        elif self.state.finished and not reply.finished:
            # The operator raised the aggregator's `rounds`: the run goes on. The round now open
            # is trained on the final global model this agent holds (it waited for none after
            # it); a newer one, if any, is fetched as usual.
            log.info("the run goes on after global model %d", self.state.global_round)
            self.state.finished = False
            if self.state.global_round == reply.global_round:
                self.state.phase = Phase.GM_READY
        self.state.agent_id = reply.agent_id
        self.asynchronous = reply.asynchronous
        self.secure_aggregation = reply.secure_aggregation  # local models go masked
        self.dir.save(self.state)
        log.info(
            "registered as %s; aggregator at round %d%s",
            reply.agent_id,
            reply.round,
            " (asynchronous)" if reply.asynchronous else "",
        )
        return reply.agent_id

    def _register(self, weights: Weights | None) -> RegisterResponse:
        try:
            return self._call(lambda: self.client.register(self.name, weights))
        except Refused as exc:
            # A stored credential that was revoked (or an aggregator on a new database):
            # enroll again when the operator gave a new token.
            token = self.enrollment_token
            if exc.status != 401 or not token or self.client.token == token:
                raise
            log.warning("stored credential refused (%s); enrolling with the token", exc.code)
            self.client.token = token
            return self._call(lambda: self.client.register(self.name, weights))

    def _start_over(self) -> None:
        """Forget the rounds of another run: wait for the aggregator's newest global model."""
        self.dir.clear_local()
        self._local = None
        self._global_bytes = None
        self._wait_after = -1
        self.state = AgentState(name=self.name)

    def run(self) -> AgentState:
        """Run rounds until the aggregator finishes the run, `max_rounds`, or `stop()`."""
        agent_id = self.register()
        if self.mode == "push":
            self.push = PushListener(
                self.url, agent_id, self.backoff_max, self.tls, token=self.client.token
            ).start()
        try:
            while not self.stop_event.is_set():
                if self.state.phase == Phase.WAITING_GM:
                    if self.state.finished or self._done():
                        break
                    self._wait_for_global()
                elif self.state.phase in (Phase.GM_READY, Phase.TRAINING):
                    self._train()
                elif self.state.phase == Phase.SENDING:
                    self._send()
        finally:
            if self.push is not None:
                self.push.stop()
            self.client.close()
            self._keeper.close()  # an unanswered upload's local model is on disk for a restart
        return self.state

    def stop(self) -> None:
        self.stop_event.set()

    def _done(self) -> bool:
        return self.max_rounds is not None and self.state.rounds_trained >= self.max_rounds

    def _wait_for_global(self) -> None:
        self._global_bytes = None  # not needed any more: never hold two global models
        held = max(self.state.global_round, self._wait_after)
        # Push or poll, the wait is a long poll: the aggregator answers it with the model as
        # soon as the model is committed. Waiting for the push's announcement and only then
        # asking cost a round trip more, and three thread hand-offs in the push listener
        # (deploy 2 × 4 MB on loopback: the download began 0.9 ms after the announcement
        # instead of 0.1 ms, rounds 3.5 % longer). The push connection still tells a training
        # agent that a newer global model overtook its round (`_send`); while this request
        # waits, the aggregator does not announce the model it answers with.
        waiter = self.state.agent_id if self.push is not None else None
        asked = time.monotonic()
        result = self._call(lambda: self.client.latest_global(held, self.poll_wait, waiter))
        if result is None:  # not yet: ask again, but not at once (`POLL_GAP`)
            self.stop_event.wait(max(0.0, asked + POLL_GAP - time.monotonic()))
            return
        info, data = result
        if info.finished:
            # The run's final model stays in the directory for the user. Others are not
            # written: a restarted agent fetches the round it resumes from the aggregator.
            self.dir.save_global(data)
        self._global_bytes = (info.round, data)
        self._order = list(codec.decode(data))  # views: costs no copy
        self.state.global_round, self.state.config = info.round, dict(info.config)
        self.state.side = None if info.side is None else info.side.model_dump()
        self.state.finished = info.finished
        if self.evaluate_global or info.finished:
            self._enter(Phase.GM_READY)
        else:
            # Training follows at once and its `_enter(TRAINING)` saves all this: a kill before
            # that resumes in waiting_gm and fetches this model again. One state write less.
            self.state.phase = Phase.GM_READY
        log.info("global model %d received%s", info.round, " (final)" if info.finished else "")
        if self.evaluate_global:
            self._evaluate_global(info.round)
        if info.finished:
            self._enter(Phase.WAITING_GM)

    def _held_global(self) -> Weights:
        if self._global_bytes is not None and self._global_bytes[0] == self.state.global_round:
            # read-only views, as over `bytes`: an engine cannot change the buffer in place
            return codec.decode(memoryview(self._global_bytes[1]).toreadonly())
        # Resumed in gm_ready/training after a restart: fetch the round it stopped at.
        round_number = self.state.global_round
        weights = self._call(lambda: self.client.global_model(round_number))
        self._order = list(weights)
        return weights

    def global_order(self) -> list[str]:
        """Return the global model's tensor names in its order (the aggregator's spec order)."""
        if self._order is None:  # resumed in sending after a restart
            self._held_global()
        assert self._order is not None
        return self._order

    def _evaluate_global(self, round_number: int) -> None:
        weights = self._held_global()
        metrics = self._engine_call("evaluate", round_number, weights, dict(self.state.config))
        assert self.state.agent_id is not None
        agent_id = self.state.agent_id
        try:
            self._call(lambda: self.client.report(agent_id, round_number, metrics))
        except Refused as exc:
            log.info("evaluation of round %d not stored: %s", round_number, exc)

    def _side(self) -> StrategySide | None:
        """This round's side of a strategy with side tensors (SCAFFOLD, …), or None."""
        if self.state.side is None:
            return None
        info = SideTensors.model_validate(self.state.side)
        assert self.state.agent_id is not None
        return StrategySide(
            info, KeptTensors(kept_file(self.dir.path, info.strategy, self.state.agent_id))
        )

    def _train(self) -> None:
        self._enter(Phase.TRAINING)
        weights = self._held_global()
        config = {**self.state.config, "round": self.state.global_round + 1}
        side = self._side()
        if side is not None:
            round_number = self.state.global_round
            shipped = (
                self._call(lambda: self.client.strategy_state(round_number))
                if side.info.state
                else {}
            )
            config = side.engine_config(config, shipped, round_number)
            del shipped
        new, num_samples, metrics = self._engine_call(
            "train", self.state.global_round + 1, weights, config
        )
        extras: Weights = {}
        if side is not None:
            new, extras = side.split(new, self.global_order(), self.engine)
            self._extras = (self.state.global_round + 1, extras)
        self._check_trained(new, weights)
        del weights, config
        if extras:
            new = {**new, **extras}
        self._global_bytes = None  # trained on: its buffer goes unless `new` views it
        meta = {
            "round": self.state.global_round + 1,
            "num_samples": int(num_samples),
            "metrics": {k: float(v) for k, v in dict(metrics).items()},
        }
        data = codec.encode_parts(new)  # views of `new`: written and uploaded without a copy
        self._local = (data, meta)
        if side is not None:
            # What the agent keeps depends on this upload being accepted: the model goes to
            # `dir` before it is sent, so that a restart sends these very bytes again and a
            # duplicate_upload then means the aggregator has them.
            self.state.phase = Phase.SENDING
            self._save_local(data, meta, dataclasses.replace(self.state))
            return
        # The upload starts at once. If it is not answered within `keep_local_after`, the local
        # model goes to `dir`, on a thread, and only then is `sending` saved: a restart resumes
        # the upload from the file. An agent killed before that trains again, and if its first
        # upload got through the aggregator refuses the second as duplicate_upload. A quick
        # upload spares the copy to disk (deploy 10 × 4 MB: 20 % of the agents' CPU).
        self.state.phase = Phase.SENDING
        self._keeper.start(data, meta, dataclasses.replace(self.state))

    def _engine_call(self, method: str, round_number: int, *args: Any) -> Any:
        """Call the engine's `method`; what it raises comes back as an EngineError naming it."""
        try:
            return getattr(self.engine, method)(*args)
        except Exception as exc:
            raise EngineError(
                f"the ML engine's {method} raised {type(exc).__name__} in round "
                f"{round_number}: {exc}"
            ) from exc

    def _check_trained(self, new: Mapping[str, Any], weights: Weights) -> None:
        """Raise a FedloopError if the engine's model does not match the global model's tensors.

        The aggregator would refuse it as wrong_names/wrong_shape/wrong_dtype, refusals that
        otherwise mean a local model damaged on disk and are dropped: the agent would go on
        without ever contributing.
        """
        try:
            codec.check_against(
                {name: np.asarray(value) for name, value in new.items()},
                codec.ModelSpec.of(weights),
                finite=False,
            )
        except FedloopError as exc:
            raise FedloopError(
                f"the ML engine's train returned a model that does not match the global model "
                f"of round {self.state.global_round}: {exc}"
            ) from exc

    def _side_accepted(self, data: ModelBody, round_number: int) -> None:
        """Keep what the strategy's agent side keeps once the upload of `round_number` is in."""
        side = self._side()
        if side is None:
            return
        if self._extras is not None and self._extras[0] == round_number:
            extras = self._extras[1]
        else:  # resumed after a restart: the body read back from `dir`
            joined = data if isinstance(data, bytes | bytearray) else b"".join(body_parts(data))
            extras = side.extras_of(codec.decode(joined))
        side.accepted(extras, round_number)

    def _send(self) -> None:
        pending, self._local = self._local or self.dir.load_local(), None
        if pending is not None and not {"round", "num_samples", "metrics"} <= pending[1].keys():
            log.warning("%s is incomplete; its local model is not sent", self.dir.local_meta)
            pending = None
        if pending is None:  # killed between clearing the model and saving the phase
            self._enter(Phase.WAITING_GM)
            return
        data, meta = pending
        if (
            not self.asynchronous
            and self.push is not None
            and self.push.announced > self.state.global_round
        ):
            log.info(
                "local model of round %d overtaken by a newer global model; discarded",
                meta["round"],
            )
        elif self.secure_aggregation:
            from fedloop.agent.secure import send_secure

            send_secure(self, data, meta)
        else:
            assert self.state.agent_id is not None
            agent_id = self.state.agent_id
            try:
                reply = self._call(
                    lambda: self.client.upload(
                        agent_id, meta["round"], data, meta["num_samples"], meta["metrics"]
                    )
                )
                self.state.rounds_trained += 1
                if self.asynchronous:
                    self._wait_after = max(self._wait_after, reply.round - 1)
                log.info("round %d: uploaded (%d/%d)", reply.round, reply.uploads, reply.needed)
                self._side_accepted(data, meta["round"])
            except Refused as exc:
                if exc.code == "duplicate_upload":
                    # An earlier attempt got through (its answer was lost, or this agent was
                    # restarted after sending): the aggregator holds this agent's local model
                    # of the round.
                    self.state.rounds_trained += 1
                    log.info("round %d: already uploaded", meta["round"])
                    self._side_accepted(data, meta["round"])  # what follows is kept once
                elif exc.code in _OVERTAKEN | _DAMAGED:
                    log.info("local model of round %d discarded: %s", meta["round"], exc)
                else:
                    raise  # kept for a restart (an unreachable aggregator is retried in _call)
        self._extras = None
        self._keeper.answered()  # answered, refused, overtaken or sent securely: nothing to keep
        self._saved()
        self.dir.clear_local()
        self._enter(Phase.WAITING_GM)
