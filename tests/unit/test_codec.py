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
