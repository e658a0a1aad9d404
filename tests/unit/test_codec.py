"""The safetensors codec: round trips, interop with the reference library, refusals."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
import safetensors.numpy as st
from hypothesis import given, settings
from hypothesis import strategies as hs
from hypothesis.extra import numpy as hnp

from fedloop.errors import ProtocolError
from fedloop.protocol import codec
from fedloop.protocol.codec import ModelSpec, check_against, decode, decode_checked, encode
from fedloop.store.blobs import blob_id, new_hasher

DTYPES = ["float64", "float32", "float16", "int64", "int32", "int8", "uint8", "bool"]


def test_round_trip_keeps_order_dtypes_shapes_and_scalars() -> None:
    weights = {
        "z": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a": np.array([1, 2, 3], dtype=np.int64),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 4), dtype=np.float16),
        "mask": np.array([True, False]),
    }
    out = decode(encode(weights))
    assert list(out) == list(weights)
    for name, value in weights.items():
        assert out[name].dtype == value.dtype and out[name].shape == value.shape
        np.testing.assert_array_equal(out[name], value)


@settings(max_examples=40, deadline=None)
@given(
    hs.dictionaries(
        hs.text("abcdefghij._", min_size=1, max_size=8),
        hs.sampled_from(DTYPES).flatmap(
            lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
        ),
        min_size=1,
        max_size=5,
    )
)
def test_round_trip_property(weights: dict[str, np.ndarray]) -> None:
    out = decode(encode(weights))
    assert list(out) == list(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(out[name], value)
        assert out[name].dtype == value.dtype


def test_interoperates_with_the_safetensors_library() -> None:
    weights = {"w": np.ones((3, 2), np.float32), "n": np.array(7, np.int64)}
    theirs = st.load(encode(weights))
    np.testing.assert_array_equal(theirs["w"], weights["w"])
    ours = decode(st.save(weights))
    np.testing.assert_array_equal(ours["n"], weights["n"])


def _raw(header: dict[str, object], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "shorter"),
        (struct.pack("<Q", 10**6) + b"{}", "exceeds"),
        (struct.pack("<Q", 2) + b"[]", "JSON object"),
        (struct.pack("<Q", 3) + b"{x}", "not JSON"),
        (_raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "need 8"),
        (_raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "cover 4"),
        (_raw({"w": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, b"\0" * 2), "BF16"),
        (
            _raw({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "negative",
        ),
        (_raw({"w": {"shape": [1]}}, b""), "malformed"),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                b"\0" * 8,
            ),
            "overlaps",
        ),
    ],
)
def test_malformed_bodies_are_protocol_errors(body: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        decode(body)


@settings(max_examples=200, deadline=None)
@given(hs.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_protocol_error(body: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(body)


SPEC = ModelSpec.of({"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)})


@pytest.mark.parametrize(
    ("weights", "code"),
    [
        ({"w": np.zeros((2, 2), np.float32)}, "wrong_names"),
        (
            {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32), "x": np.zeros(1)},
            "wrong_names",
        ),
        ({"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}, "wrong_shape"),
        ({"w": np.zeros((2, 2), np.float64), "b": np.zeros(2, np.float32)}, "wrong_dtype"),
        ({"w": np.full((2, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)}, "not_finite"),
        ({"w": np.zeros((2, 2), np.float32), "b": np.array([0, np.inf], np.float32)}, "not_finite"),
    ],
)
def test_check_against_names_the_problem(weights: dict[str, np.ndarray], code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        check_against(weights, SPEC)
    assert info.value.code == code and info.value.status == 422


def test_decode_checked_accepts_a_matching_model() -> None:
    model = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
    assert set(decode_checked(encode(model), SPEC)) == {"w", "b"}
    assert ModelSpec.from_json(SPEC.to_json()) == SPEC
    assert SPEC.nbytes == 24


def _mixed_model(bad: tuple[str, int] | None = None) -> dict[str, np.ndarray]:
    """Tensors of several dtypes, one spanning many check blocks; `bad`: (name, index) → inf."""
    rng = np.random.default_rng(7)
    model = {
        "big": rng.standard_normal(3 * codec._FINITE_BLOCK + 123).astype(np.float32),
        "steps": np.arange(5, dtype=np.int64),
        "half": rng.standard_normal((7, 3)).astype(np.float16),
        "empty": np.zeros((0, 2), np.float32),
        "last": rng.standard_normal(11),
    }
    if bad is not None:
        name, index = bad
        model[name].reshape(-1)[index] = np.inf
    return model


def test_decode_checked_hashes_every_byte_in_order_in_the_checking_pass() -> None:
    data = b"".join(bytes(p) for p in codec.encode_parts(_mixed_model()))
    for finite in (True, False):
        hasher = new_hasher()
        decode_checked(bytearray(data), None, finite, hasher)
        assert hasher.hexdigest() == blob_id(data)


@pytest.mark.parametrize(
    "bad",
    [("big", 0), ("big", 2 * codec._FINITE_BLOCK + 5), ("big", -1), ("half", 20), ("last", 3)],
)
def test_decode_checked_with_a_hasher_names_the_first_tensor_not_finite(
    bad: tuple[str, int],
) -> None:
    model = _mixed_model(bad)
    model["last"][0] = np.nan  # a later tensor is bad too: the first one is named
    data = b"".join(bytes(p) for p in codec.encode_parts(model))
    with pytest.raises(ProtocolError) as info:
        decode_checked(data, None, True, new_hasher())
    assert info.value.code == "not_finite" and repr(bad[0]) in str(info.value)
    # Without the check, the same bytes hash as a whole.
    hasher = new_hasher()
    decode_checked(data, None, False, hasher)
    assert hasher.hexdigest() == blob_id(data)


def _framed(text: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text + data


W4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    "body",
    [
        _raw({"w": {**W4, "shape": ["4"]}}, b"\0" * 16),
        _raw({"w": {**W4, "shape": [4.0]}}, b"\0" * 16),
        _raw({"w": {**W4, "shape": [True, 4]}}, b"\0" * 16),
        _raw({"w": {**W4, "data_offsets": ["0", 16]}}, b"\0" * 16),
        _raw({"w": {**W4, "data_offsets": [0, 16.0]}}, b"\0" * 16),
        _raw({"w": {**W4, "data_offsets": [0, 16, 16]}}, b"\0" * 16),
        _raw({"w": [4]}, b"\0" * 16),
        _raw({"__metadata__": 123, "w": W4}, b"\0" * 16),
        _raw({"__metadata__": {"a": [1, 2]}, "w": W4}, b"\0" * 16),
        _framed(json.dumps({"w": W4}).encode("utf-16-le"), b"\0" * 16),
        _framed(b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 16]}}', b"\0" * 16),
        _raw({"\ud800": W4}, b"\0" * 16),
        _raw({"__metadata__": {"a": "\udc00"}, "w": W4}, b"\0" * 16),
    ],
    ids=[
        "shape-string",
        "shape-float",
        "shape-bool",
        "offset-string",
        "offset-float",
        "three-offsets",
        "entry-not-object",
        "metadata-number",
        "metadata-list-value",
        "utf16",
        "nan",
        "lone-surrogate-name",
        "lone-surrogate-metadata",
    ],
)
def test_headers_the_safetensors_library_refuses_are_refused(body: bytes) -> None:
    # Stored as received, a model must open with the reference library (DESIGN.md).
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error types
        st.load(body)
    with pytest.raises(ProtocolError) as info:
        decode(body)
    assert info.value.code == "bad_model"


def test_entries_with_fields_of_their_own_are_refused() -> None:
    # The reference library takes them; stored, they would go to every reader: not taken.
    with pytest.raises(ProtocolError, match="exactly a dtype"):
        decode(_raw({"w": {**W4, "x": [[[1]]]}}, b"\0" * 16))


def test_headers_the_safetensors_library_takes_are_taken() -> None:
    weights = {"wé": np.ones(4, np.float32), "b": np.arange(3, dtype=np.int64)}
    saved = st.save(weights, metadata={"format": "pt", "note": "x" * 1000})
    spec = ModelSpec.of(weights)
    for body in (saved, _raw({"__metadata__": None, "w": W4}, b"\0" * 16)):
        assert st.load(body).keys() == decode(body).keys()
    out = decode_checked(saved, spec)
    np.testing.assert_array_equal(out["b"], weights["b"])


def _bomb(header_bytes: int, weights: dict[str, np.ndarray]) -> bytes:
    """A valid model of `weights` whose header carries `header_bytes` of `[]` in __metadata__."""
    head, _ = codec.read_header(encode(weights))
    filler = b"[]," * (header_bytes // 3)
    text = b'{"__metadata__":[' + filler + b"[]]," + json.dumps(head).encode()[1:]
    return _framed(text, b"".join(bytes(a.data) for a in weights.values()))


def test_a_header_longer_than_the_model_needs_is_refused_before_it_is_parsed() -> None:
    weights = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
    spec = ModelSpec.of(weights)
    assert spec.header_limit < 100_000
    bomb = _bomb(2 * spec.header_limit, weights)
    with pytest.raises(ProtocolError, match="__metadata__"):  # parsed: no limit for stored models
        decode(bomb)
    with pytest.raises(ProtocolError, match="at most") as info:  # not parsed
        decode_checked(bomb, spec)
    assert info.value.code == "bad_model"
    # The first model, before any spec: a fixed limit.
    with pytest.raises(ProtocolError, match="at most"):
        decode_checked(_bomb(codec.MAX_RECEIVED_HEADER, weights), None)


def test_the_header_limits_fit_large_real_models() -> None:
    # 5,000 tensors with Llama-style names: ≈ 450 KB of header, under the first model's limit.
    weights = {
        f"model.layers.{i // 7}.self_attn.proj_{i % 7}.weight": np.zeros(i % 5 + 1, np.float16)
        for i in range(5000)
    }
    body = encode(weights)
    spec = ModelSpec.of(weights)
    assert len(decode_checked(body, None)) == 5000
    assert len(decode_checked(st.save(weights, metadata={"format": "pt"}), spec)) == 5000
