"""The codec and every message parser answer any input with a result or a ProtocolError."""

from __future__ import annotations

import pytest
from fuzzgen import (
    MESSAGE_CLASSES,
    REFERENCE,
    check_codec,
    check_message,
    deep,
    examples,
    message_raw,
    model_bytes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedloop.protocol import codec
from fedloop.protocol.messages import Message

FUZZ = settings(
    max_examples=examples(400),
    deadline=None,
    derandomize=not deep(),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REFERENCE_BYTES = codec.encode(REFERENCE)


@FUZZ
@given(model_bytes())
def test_codec_any_model(data: bytes) -> None:
    check_codec(data)


@FUZZ
@given(model_bytes(REFERENCE_BYTES))
def test_codec_mutated_reference_model(data: bytes) -> None:
    check_codec(data)


@settings(FUZZ, max_examples=examples(150))
@given(st.binary(max_size=256))
def test_codec_random_bytes(data: bytes) -> None:
    check_codec(data)


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda cls: cls.__name__)
@settings(FUZZ, max_examples=examples(120))
@given(data=st.data())
def test_parse_message(cls: type[Message], data: st.DataObject) -> None:
    check_message(cls, data.draw(message_raw(cls)))
