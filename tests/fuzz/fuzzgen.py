"""Input generators and per-input checks shared by the fuzz tests and bench/fuzz.py.

Each target is a hypothesis strategy plus a `check_*` function that raises AssertionError (or
lets an unexpected exception escape) when one input breaks the rule "bad input is refused with
a ProtocolError, never a crash". The tests run each target for a bounded number of examples;
bench/fuzz.py runs them longer and counts inputs and failures.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from typing import Any

import numpy as np
import safetensors.numpy
from hypothesis import strategies as st

from fedloop.errors import ProtocolError
from fedloop.protocol import codec, messages
from fedloop.protocol.codec import ModelSpec

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

# The model the HTTP fuzz registers first; mutated bodies start from its encoding.
REFERENCE = {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}
REFERENCE_SPEC = ModelSpec.of(REFERENCE)
REFERENCE_BYTES = codec.encode(REFERENCE)


def examples(default: int) -> int:
    """Return how many examples a target runs: `default`, or FEDLOOP_FUZZ_EXAMPLES if set."""
    value = os.environ.get("FEDLOOP_FUZZ_EXAMPLES")
    return int(value) if value else default


def deep() -> bool:
    """A deeper run (FEDLOOP_FUZZ_EXAMPLES set) explores new seeds; CI runs are repeatable."""
    return bool(os.environ.get("FEDLOOP_FUZZ_EXAMPLES"))


# --- JSON values, including the odd ones ----------------------------------------------------
ODD_NUMBERS = [
    0,
    -1,
    1,
    2**31,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    1.5,
    -0.0,
    1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    True,
    False,
    None,
]
ODD_STRINGS = ["", "1", "-1", "F32", "f32", "\x00", "\ud800", "é", "a" * 300, "1e999", "NaN"]

scalars = st.one_of(
    st.sampled_from(ODD_NUMBERS),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=20),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=20,
)


def _dumps(value: Any) -> bytes:
    """JSON with NaN/Infinity allowed (a sender need not follow the standard)."""
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def odd_json_text(draw: st.DrawFn) -> bytes:
    """JSON texts that stress a parser: deep nesting, huge numbers, bad encodings, duplicates."""
    kind = draw(st.integers(0, 7))
    depth = draw(st.sampled_from([10, 500, 1000, 5000, 100_000]))
    if kind == 0:
        return b"[" * depth + b"]" * depth
    if kind == 1:
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == 2:
        return b"1" * draw(st.sampled_from([4300, 4301, 10_000]))
    if kind == 3:
        return draw(st.sampled_from([b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity"]))
    if kind == 4:
        return b"\xef\xbb\xbf{}" if draw(st.booleans()) else b'{"a":"\xff\xfe"}'
    if kind == 5:
        return b'{"protocol":1,"protocol":2}'
    if kind == 6:
        return '{"x":1}'.encode(draw(st.sampled_from(["utf-16", "utf-32", "utf-16-le"])))
    return b'{"a":"\\ud800"}'


# --- safetensors --------------------------------------------------------------------------
names = st.text(min_size=1, max_size=12).filter(lambda n: n != "__metadata__")
shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)


@st.composite
def weights(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """A small valid model of any accepted dtype (values may be NaN/Inf)."""
    out: dict[str, np.ndarray] = {}
    for name in draw(st.lists(names, min_size=1, max_size=4, unique=True)):
        dtype = np.dtype(DTYPES[draw(st.sampled_from(sorted(DTYPES)))])
        shape = draw(shapes)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = draw(st.binary(min_size=size, max_size=size))
        out[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    return out


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _frame(header_bytes: bytes, body: bytes, declared: int | None = None) -> bytes:
    size = len(header_bytes) if declared is None else declared
    return struct.pack("<Q", size % 2**64) + header_bytes + body


@st.composite
def mutated_header(draw: st.DrawFn, base: bytes) -> bytes:
    """A valid model's bytes with its header entries mutated (offsets, dtypes, shapes, keys)."""
    header, body = _split(base)
    tensors = [k for k in header if k != "__metadata__"]
    offsets = {k: list(header[k]["data_offsets"]) for k in tensors}
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(tensors))
        entry = header[name]
        if not isinstance(entry, dict):
            continue
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "extra"]))
        if field == "dtype":
            entry["dtype"] = draw(st.one_of(st.sampled_from(sorted(DTYPES)), json_values))
        elif field == "shape":
            entry["shape"] = draw(
                st.one_of(
                    st.lists(st.one_of(st.integers(), st.sampled_from(ODD_NUMBERS)), max_size=4),
                    st.lists(st.sampled_from([2**62, 2**63, 2**32, 2**31, -1]), max_size=4),
                    json_values,
                )
            )
        elif field == "data_offsets":
            begin, end = offsets[name]
            entry["data_offsets"] = draw(
                st.one_of(
                    st.tuples(st.integers(begin - 3, begin + 3), st.integers(end - 3, end + 3)).map(
                        list
                    ),
                    st.lists(st.one_of(st.integers(), st.sampled_from(ODD_NUMBERS)), max_size=3),
                    st.just([end, begin]),
                    json_values,
                )
            )
        elif field == "entry":
            header[name] = draw(json_values)
        else:
            entry[draw(st.text(max_size=8))] = draw(json_values)
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    raw = _dumps(header)
    declared = draw(
        st.one_of(
            st.none(),
            st.just(len(raw)),
            st.integers(0, len(raw) + 16),
            st.sampled_from([2**64 - 1, 2**63, codec.MAX_HEADER_BYTES + 1, 2**32]),
        )
    )
    return _frame(raw, body, declared)


@st.composite
def byte_mutation(draw: st.DrawFn, base: bytes) -> bytes:
    """A valid model's bytes truncated, extended, or with bytes flipped or spliced."""
    data = bytearray(base)
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return bytes(data[: draw(st.integers(0, max(0, len(data) - 1)))])
    if kind == 1:
        return bytes(data) + draw(st.binary(min_size=1, max_size=16))
    if kind == 2:
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == 3:
        i = draw(st.integers(0, len(data)))
        j = draw(st.integers(i, len(data)))
        return bytes(data[:i]) + draw(st.binary(max_size=16)) + bytes(data[j:])
    # a header that is some other JSON text, framed correctly
    text = draw(st.one_of(odd_json_text(), json_values.map(_dumps)))
    return _frame(text, draw(st.binary(max_size=32)))


@st.composite
def model_bytes(draw: st.DrawFn, base: bytes | None = None) -> bytes:
    """Bytes for a model body: valid, structurally mutated, byte-mutated, or random."""
    if base is None:
        base = codec.encode(draw(weights()))
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return base
    if kind == 1:
        return draw(byte_mutation(base))
    if kind == 2:
        return draw(st.binary(max_size=64))
    return draw(mutated_header(base))


def check_codec(data: bytes, spec: ModelSpec | None = REFERENCE_SPEC) -> None:
    """`read_header`, `decode` and `decode_checked` answer `data` with a model or ProtocolError;
    a decoded model re-encodes to one that decodes equal, and the safetensors library opens the
    bytes as they are (what the aggregator stores) to the same tensors."""
    with contextlib.suppress(ProtocolError):
        codec.read_header(data)
    try:
        decoded = codec.decode(data)
    except ProtocolError:
        decoded = None
    if decoded is not None:
        _, start = codec.read_header(data)
        assert sum(a.nbytes for a in decoded.values()) == len(data) - start
        theirs = safetensors.numpy.load(bytes(data))
        assert theirs.keys() == decoded.keys()
        for name, array in decoded.items():
            assert theirs[name].dtype == array.dtype and theirs[name].shape == array.shape
        again = codec.decode(codec.encode(decoded))
        assert list(again) == list(decoded)
        for name, array in decoded.items():
            assert again[name].dtype == array.dtype and again[name].shape == array.shape
            assert again[name].tobytes() == array.tobytes()
    for target in (spec, None):
        try:
            checked = codec.decode_checked(data, target)
        except ProtocolError:
            continue
        assert checked and all(
            np.isfinite(a).all() for a in checked.values() if a.dtype.kind == "f"
        )


# --- JSON messages ------------------------------------------------------------------------
MESSAGE_CLASSES: list[type[messages.Message]] = sorted(
    (
        value
        for value in vars(messages).values()
        if isinstance(value, type)
        and issubclass(value, messages.Message)
        and value is not messages.Message
    ),
    key=lambda cls: cls.__name__,
)


@st.composite
def message_dict(draw: st.DrawFn, cls: type[messages.Message]) -> dict[str, Any]:
    """A dict with the message's own field names (and the protocol) holding odd values."""
    fields = list(cls.model_fields)
    data: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(fields), unique=True)):
        data[name] = draw(json_values)
    if draw(st.integers(0, 3)):
        data["protocol"] = draw(st.one_of(st.just(1), json_values))
    if draw(st.integers(0, 4)) == 0:
        data[draw(st.text(max_size=8))] = draw(json_values)
    return data


@st.composite
def message_raw(draw: st.DrawFn, cls: type[messages.Message]) -> str | bytes | None:
    """Header or body text for a `cls` message: mostly near-valid, sometimes anything."""
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return draw(st.one_of(st.none(), st.just(""), st.just(b"")))
    if kind == 1:
        return draw(st.binary(max_size=64))
    if kind == 2:
        return draw(st.text(max_size=64))
    if kind == 3:
        return draw(odd_json_text())
    if kind == 4:
        return _dumps(draw(json_values))
    raw = _dumps(draw(message_dict(cls)))
    return raw.decode("utf-8", "surrogatepass") if draw(st.booleans()) else raw


def check_message(cls: type[messages.Message], raw: str | bytes | None) -> None:
    """`parse_message` answers `raw` with a `cls` or a ProtocolError; what it accepts
    serializes back to JSON that parses to the same message."""
    try:
        message = messages.parse_message(cls, raw)
    except ProtocolError as exc:
        assert 400 <= exc.status < 500 and exc.code, exc
        return
    assert isinstance(message, cls)
    text = message.model_dump_json()
    text.encode("utf-8")  # must be sendable: no lone surrogates
    assert messages.parse_message(cls, text) == message
