"""Every JSON message of the wire protocol, validated by pydantic before it touches state."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedloop.errors import ProtocolError
from fedloop.protocol.version import PROTOCOL_VERSION, SUPPORTED_VERSIONS

AgentName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.@:-]+$")]
AgentId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
ConfigValue = float | int | str | bool
Metrics = dict[Annotated[str, Field(max_length=128)], float]


class Message(BaseModel):
    """Base of all messages: strict fields, no extras, and the protocol version."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    protocol: int = PROTOCOL_VERSION


class Reply(Message):
    """Base of what the aggregator sends agents: fields an older agent does not know are ignored.

    Requests stay strict (a misspelt field is an error the sender must see); replies may grow
    new optional fields within protocol version 1 without breaking agents already deployed.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)


def _finite_metrics(value: dict[str, float]) -> dict[str, float]:
    if len(value) > 256:
        raise ValueError("at most 256 metrics per message")
    for key, number in value.items():
        if not math.isfinite(number):
            raise ValueError(f"metric {key!r} is {number}; metrics must be finite numbers")
    return value


class RegisterRequest(Message):
    """An agent's *participate* message; its body (if any) holds its initial weights."""

    agent_name: AgentName


class RegisterResponse(Reply):
    """The aggregator's *welcome*: the agent's id and where the run stands.

    ``asynchronous``: the aggregator accepts local models trained on older global models
    (FedAsync, FedBuff), so an agent uploads what it trained even if a newer global model
    appeared meanwhile.

    ``credential``: with auth on, the agent's own secret, sent once, in the answer to the
    registration that spent its enrollment token; the agent keeps it and sends it as
    ``Authorization: Bearer`` on every later request (docs/security.md).

    ``secure_aggregation``: local models go through the ``/v1/secagg`` rounds (masked), never
    to ``/v1/updates`` (docs/privacy.md).
    """

    agent_id: AgentId
    round: int
    global_round: int
    finished: bool = False
    asynchronous: bool = False
    credential: str | None = None
    secure_aggregation: bool = False


class UploadRequest(Message):
    """Metadata of a local model; the body holds its weights."""

    agent_id: AgentId
    round: int = Field(ge=1)
    num_samples: int = Field(ge=0, le=2**53)
    metrics: Metrics = Field(default_factory=dict)

    _check_metrics = field_validator("metrics")(_finite_metrics)


class UploadResponse(Reply):
    """The aggregator accepted a local model for `round`.

    In synchronous mode `round` is the round the agent uploaded for; in asynchronous mode it is
    the global model the local model will be aggregated into, which the agent waits for before
    training again.
    """

    accepted: bool
    round: int
    uploads: int
    needed: int


class SideTensors(BaseModel):
    """What a strategy with side tensors (SCAFFOLD, FedCurv) asks of agents in a round.

    ``extras``: prefixes of the extra tensors each upload must carry in its body besides the
    model (``scaffold.dc/<tensor>``, …); the aggregator checks their exact names, shapes and
    dtypes. ``state``: ``GET /v1/models/global/{round}/state`` serves the tensors the strategy
    ships with this global model (SCAFFOLD's c, FedCurv's sums).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)
    strategy: str
    extras: list[str] = Field(default_factory=list)
    state: bool = False


class GlobalModelInfo(Reply):
    """Sent with a global model: its round and the config for the next round of training.

    ``side``: set when the strategy exchanges side tensors with agents (docs/protocol.md); an
    agent that cannot must not train for it.
    """

    round: int
    config: dict[str, ConfigValue] = Field(default_factory=dict)
    finished: bool = False
    side: SideTensors | None = None


class PushMessage(Reply):
    """Announced on an agent's WebSocket when a new global model exists."""

    type: Literal["global_model"] = "global_model"
    round: int
    finished: bool = False


class ErrorResponse(Reply):
    """Every 4xx/5xx body: a machine code and a sentence for the human."""

    error: str
    detail: str


class MetricsReport(Message):
    """An agent's evaluation of a global model (the book's global-model performance)."""

    agent_id: AgentId
    round: int = Field(ge=0)
    metrics: Metrics

    _check_metrics = field_validator("metrics")(_finite_metrics)


class AgentStatus(BaseModel):
    """One agent as the status endpoint shows it."""

    agent_id: str
    name: str
    last_seen: float
    connected: bool


class StatusResponse(Reply):
    """Where the run stands: round, progress toward aggregation, agents."""

    round: int
    global_round: int
    registered_agents: int
    uploads: int
    needed: int
    deadline_in: float | None
    finished: bool
    strategy: str
    asynchronous: bool = False


# --- secure aggregation (docs/privacy.md, fedloop.aggregator.secure) ---------------------------
# Keys, shares and ciphertexts travel as standard base64 text; ids of the round's clients
# (1..n, the Shamir x-coordinates) as JSON object keys, i.e. decimal strings.

B64 = Annotated[str, Field(max_length=4096, pattern=r"^[A-Za-z0-9+/]*={0,2}$")]
ClientKey = Annotated[str, Field(max_length=10, pattern=r"^[1-9][0-9]{0,9}$")]
Attempt = Annotated[int, Field(ge=0, le=2**31)]


class SecAggAdvertise(Message):
    """An agent joins round ``round``'s secure aggregation: its two X25519 public keys."""

    agent_id: AgentId
    c_pk: B64
    s_pk: B64


class SecAggJoined(Reply):
    """The aggregator's answer to SecAggAdvertise: the attempt joined and the agent's client id."""

    attempt: int
    client_id: int


class SecAggPublicKeys(BaseModel):
    """One client's two public keys in the key list."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    c_pk: B64
    s_pk: B64


class SecAggKeyList(Reply):
    """The closed key round: the cohort's keys and the parameters every client must use."""

    attempt: int
    session: str
    threshold: int
    dimension: int
    num_bits: int
    frac_bits: int
    keys: dict[str, SecAggPublicKeys]


class SecAggShares(Message):
    """Round 1: the agent's encrypted shares, one ciphertext per other client id."""

    agent_id: AgentId
    attempt: Attempt
    ciphertexts: dict[ClientKey, B64] = Field(max_length=100_000)


class SecAggRelayed(Reply):
    """The ciphertexts addressed to one client, by sender id (U2 without the client)."""

    attempt: int
    ciphertexts: dict[str, str]


class SecAggMaskedInput(Message):
    """Round 2's header message; the body is the masked vector, little-endian unsigned ints."""

    agent_id: AgentId
    attempt: Attempt


class SecAggSurvivors(Reply):
    """U3: the clients whose masked input arrived."""

    attempt: int
    survivors: list[int]


class SecAggUnmask(Message):
    """Round 3: shares of b_v for surviving v, of s_v's key for dropped v."""

    agent_id: AgentId
    attempt: Attempt
    b_shares: dict[ClientKey, B64] = Field(max_length=100_000)
    sk_shares: dict[ClientKey, B64] = Field(max_length=100_000)


class SecAggAccepted(Reply):
    """A secure-aggregation message was taken."""

    accepted: bool = True
    attempt: int


M = TypeVar("M", bound=Message)


def parse_message(model: type[M], raw: str | bytes | None) -> M:
    """Return `raw` validated as `model`; a ProtocolError names what is wrong.

    The protocol version is checked before anything else, so a client speaking another
    version learns that and not a confusing field error.
    """
    if raw is None or raw == "" or raw == b"":
        raise ProtocolError(f"missing {model.__name__} message", 400, "missing_message")
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}", 400, "bad_json") from exc
    if not isinstance(data, dict):
        raise ProtocolError("message must be a JSON object", 400, "bad_json")
    version = data.get("protocol")
    # isinstance first: a list or dict is unhashable, and True == 1 must not pass as version 1.
    if (
        not isinstance(version, int)
        or isinstance(version, bool)
        or version not in SUPPORTED_VERSIONS
    ):
        raise ProtocolError(
            f"protocol version {version!r} is not supported; this aggregator speaks "
            f"{sorted(SUPPORTED_VERSIONS)} — upgrade the agent or the aggregator to match",
            400,
            "unsupported_protocol",
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ProtocolError(
            f"invalid {model.__name__}: {problems}", 422, "invalid_message"
        ) from exc
