"""Pydantic messages: the protocol version first, then each field."""

from __future__ import annotations

import json

import pytest

from fedloop.errors import ProtocolError
from fedloop.protocol.messages import (
    RegisterRequest,
    RegisterResponse,
    UploadRequest,
    parse_message,
)


def test_valid_message_parses() -> None:
    raw = UploadRequest(
        agent_id="abc", round=3, num_samples=10, metrics={"loss": 0.5}
    ).model_dump_json()
    message = parse_message(UploadRequest, raw)
    assert message.round == 3 and message.protocol == 1


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (None, "missing_message"),
        ("not json", "bad_json"),
        ("[1]", "bad_json"),
        (json.dumps({"agent_name": "a"}), "unsupported_protocol"),
        (json.dumps({"protocol": 99, "agent_name": "a"}), "unsupported_protocol"),
        (json.dumps({"protocol": 1}), "invalid_message"),
        (json.dumps({"protocol": 1, "agent_name": "a b/c"}), "invalid_message"),
        (json.dumps({"protocol": 1, "agent_name": "a", "extra": 1}), "invalid_message"),
    ],
)
def test_bad_register_messages(raw: str | None, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(RegisterRequest, raw)
    assert info.value.code == code and 400 <= info.value.status < 500


def test_unsupported_version_says_what_to_do() -> None:
    with pytest.raises(ProtocolError, match="upgrade"):
        parse_message(RegisterRequest, json.dumps({"protocol": 2, "agent_name": "a"}))


@pytest.mark.parametrize(
    "fields",
    [
        {"round": 0},
        {"num_samples": -1},
        {"metrics": {"loss": float("nan")}},
        {"metrics": {"loss": "high"}},
    ],
)
def test_bad_upload_fields(fields: dict[str, object]) -> None:
    data = {"protocol": 1, "agent_id": "a", "round": 1, "num_samples": 1, **fields}
    with pytest.raises(ProtocolError) as info:
        parse_message(UploadRequest, json.dumps(data).replace("NaN", "NaN"))
    assert info.value.code in {"invalid_message", "bad_json"}


def test_replies_tolerate_fields_newer_aggregators_add() -> None:
    # An agent of this version reading a reply from a later aggregator (same protocol version)
    # that carries a field it does not know: taken, the field dropped. Requests stay strict.
    raw = json.dumps({"protocol": 1, "agent_id": "a1", "round": 2, "global_round": 1,
                      "finished": False, "a_field_from_the_future": True})  # fmt: skip
    reply = parse_message(RegisterResponse, raw)
    assert reply.agent_id == "a1" and not hasattr(reply, "a_field_from_the_future")
    with pytest.raises(ProtocolError) as refused:
        parse_message(RegisterRequest, json.dumps({"protocol": 1, "agent_name": "a", "later": 1}))
    assert refused.value.code == "invalid_message"
