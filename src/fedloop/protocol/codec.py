"""Weights to and from safetensors bytes, and the checks a received model must pass.

The format is the standard safetensors layout (8-byte little-endian header length, a JSON
header, then raw little-endian tensor data), so any stored or transferred model opens with the
`safetensors` library or PyTorch. Decoding is zero-copy (`numpy.frombuffer` views over the
received bytes) and refuses any header whose offsets do not tile the data exactly.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np

from fedloop.errors import ProtocolError
from fedloop.parallel import split, split_tensors
from fedloop.types import Weights

_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
Bytes = bytes | bytearray | memoryview | mmap.mmap
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
# The header a received model may have when no model is registered yet (the first agent's).
# Parsing JSON costs up to ≈ 25 × its size in Python objects, with the GIL held (a 63 MB
# header of `[]`s: 1.6 GB, the event loop stalled for seconds). Real models need ≈ 100 bytes a
# tensor (a 720-tensor Llama-70B layout: 70 KB): 1 MiB is ≈ 10,000 tensors.
MAX_RECEIVED_HEADER = 1024 * 1024
# Once the model is registered, a received header may be twice the length of the model's own
# (spacing, the order of the offsets, escapes) plus this much `__metadata__`.
METADATA_SLACK = 64 * 1024


def dtype_name(dtype: np.dtype[Any]) -> str:
    """Return the safetensors name of a numpy dtype (F32, I64, …)."""
    key = dtype.newbyteorder("<") if dtype.byteorder not in ("|", "=", "<") else dtype
    for name, candidate in _DTYPES.items():
        if candidate == key:
            return name
    raise ProtocolError(f"dtype {dtype} cannot travel as safetensors", 422, "bad_dtype")


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor of the model."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSpec:
    """The model every agent must send: fixed by the first registered agent."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, weights: Mapping[str, np.ndarray]) -> ModelSpec:
        return cls(
            tuple(TensorSpec(n, dtype_name(a.dtype), tuple(a.shape)) for n, a in weights.items())
        )

    def to_json(self) -> list[dict[str, Any]]:
        return [t.to_json() for t in self.tensors]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> ModelSpec:
        return cls(tuple(TensorSpec(d["name"], d["dtype"], tuple(d["shape"])) for d in data))

    def zeros(self) -> Weights:
        return {t.name: np.zeros(t.shape, dtype=_DTYPES[t.dtype]) for t in self.tensors}

    @property
    def nbytes(self) -> int:
        return sum(
            int(np.prod(t.shape, dtype=np.int64)) * _DTYPES[t.dtype].itemsize for t in self.tensors
        )

    @functools.cached_property
    def header_limit(self) -> int:
        """The longest safetensors header a model of this spec may come with (`decode`)."""
        entries = [
            (t.name, t.dtype, t.shape, math.prod(t.shape) * _DTYPES[t.dtype].itemsize)
            for t in self.tensors
        ]
        return 2 * (len(_header(entries)) - 8) + METADATA_SLACK


def encode(weights: Mapping[str, np.ndarray]) -> bytes:
    """Return `weights` as safetensors bytes, tensors in the mapping's order."""
    return b"".join(encode_parts(weights))


def encode_parts(weights: Mapping[str, np.ndarray]) -> list[bytes | memoryview]:
    """Return `weights` as safetensors bytes in pieces: the header, then a view of each tensor.

    Joined, the pieces are `encode(weights)`; unjoined they cost no copy of the model (only a
    tensor that is not C-contiguous little-endian in a safetensors dtype is converted). Whoever
    keeps them must not change the tensors.
    """
    entries: list[tuple[str, str, tuple[int, ...], int]] = []
    arrays: list[np.ndarray] = []
    for name, value in weights.items():
        array = np.asarray(value)
        kind = dtype_name(array.dtype)
        # asarray, not ascontiguousarray: the latter turns 0-d scalars into 1-d arrays
        array = np.asarray(array, dtype=_DTYPES[kind], order="C")
        entries.append((name, kind, tuple(array.shape), array.nbytes))
        arrays.append(array)
    parts: list[bytes | memoryview] = [_header(entries)]
    parts.extend(a.reshape(-1).data.cast("B") for a in arrays if a.nbytes)
    return parts


def _header(entries: Sequence[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """Return the safetensors header (its length, then its JSON) for tensors laid out one
    after another: (name, dtype name, shape, bytes) each, in order."""
    header: dict[str, Any] = {}
    offset = 0
    for name, kind, shape, nbytes in entries:
        header[name] = {
            "dtype": kind,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def encode_into(
    spec: ModelSpec, acquire: Callable[[int], bytearray | mmap.mmap] = bytearray
) -> tuple[bytearray | mmap.mmap, Weights]:
    """Lay out the safetensors bytes of a model of `spec` in one buffer, to be filled in place.

    Returns the buffer, from ``acquire(size)`` (e.g. a `BodyPool`'s), with the header written,
    and writable arrays viewing the places of the tensors in it, in the spec's order. Once
    they are filled, the buffer is ``encode`` of them, in one piece.
    """
    entries = [
        (t.name, t.dtype, t.shape, math.prod(t.shape) * _DTYPES[t.dtype].itemsize)
        for t in spec.tensors
    ]
    header = _header(entries)
    buffer = acquire(len(header) + sum(nbytes for *_, nbytes in entries))
    buffer[: len(header)] = header
    weights: Weights = {}
    offset = len(header)
    for name, kind, shape, nbytes in entries:
        dtype = _DTYPES[kind]
        array = np.frombuffer(buffer, dtype, nbytes // dtype.itemsize, offset)
        weights[name] = array.reshape(shape)
        offset += nbytes
    return buffer, weights


def holds_encoding(buffer: Bytes, weights: Mapping[str, np.ndarray]) -> bool:
    """Return whether `buffer` is ``encode(weights)`` in place: it starts with their header
    and each tensor is an array over its own place in it (as `encode_into` lays them out)."""
    parts = encode_parts(weights)
    head = bytes(parts[0])
    if len(buffer) != sum(len(part) for part in parts) or bytes(buffer[: len(head)]) != head:
        return False
    base = np.frombuffer(buffer, np.uint8).__array_interface__["data"][0]
    offset = len(parts[0])
    for value in weights.values():
        array = np.asarray(value)
        if array.nbytes and array.__array_interface__["data"][0] != base + offset:
            return False
        offset += array.nbytes
    return True


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def read_header(data: Bytes, limit: int = MAX_HEADER_BYTES) -> tuple[dict[str, Any], int]:
    """Return the JSON header of safetensors bytes and where its data section starts.

    A header longer than `limit` bytes is refused before it is parsed, as is one that is not
    UTF-8 (the safetensors library refuses those too).
    """
    if len(data) < 8:
        raise ProtocolError("model body is shorter than a safetensors header", 400, "bad_model")
    (size,) = struct.unpack("<Q", bytes(data[:8]))
    if size > limit:
        raise ProtocolError(
            f"the safetensors header is {size} bytes; at most {limit} are accepted here (a "
            "model needs about 100 bytes a tensor, plus its __metadata__)",
            400,
            "bad_model",
        )
    if 8 + size > len(data):
        raise ProtocolError("safetensors header length exceeds the body", 400, "bad_model")
    try:
        text = bytes(data[8 : 8 + size]).decode("utf-8")
        header = json.loads(text, parse_constant=_no_constant)
        if "\\" in text:  # one memchr; fedloop's and the library's headers have no escapes
            # A lone surrogate escape ("\ud800") Python keeps as it is, the safetensors library
            # refuses: look for one in every string of the header.
            json.dumps(header, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(
            f"safetensors header is not JSON in UTF-8: {exc}", 400, "bad_model"
        ) from exc
    if not isinstance(header, dict):
        raise ProtocolError("safetensors header must be a JSON object", 400, "bad_model")
    return header, 8 + size


def _ints(value: object, length: int | None = None) -> tuple[int, ...] | None:
    """`value` as a tuple of ints if it is a JSON list of integers (of `length`), else None.

    JSON integers only, as the safetensors library takes: not "4", 4.0 or true.
    """
    if not isinstance(value, list) or (length is not None and len(value) != length):
        return None
    if not all(type(item) is int for item in value):
        return None
    return tuple(value)


def decode(data: Bytes, max_header: int = MAX_HEADER_BYTES) -> Weights:
    """Return the tensors in safetensors bytes as read-only arrays viewing `data`.

    Every offset is checked: tensors must tile the data section exactly, each of the size its
    dtype and shape give, and the header must be one the safetensors library opens (UTF-8;
    shapes and offsets JSON integers; ``__metadata__`` a map of strings to strings), at most
    `max_header` bytes. Anything else is a ProtocolError, never an IndexError.
    """
    header, start = read_header(data, max_header)
    body = memoryview(data)[start:]
    entries: list[tuple[int, int, str, np.dtype[Any], tuple[int, ...]]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (
                isinstance(info, dict) and all(isinstance(value, str) for value in info.values())
            ):
                raise ProtocolError(
                    "the safetensors __metadata__ must map names to strings", 400, "bad_model"
                )
            continue
        # Exactly the three fields the safetensors library writes (three, each found below):
        # anything else would be stored along with the model, for every reader to parse.
        entry = info if isinstance(info, dict) and len(info) == 3 else {}
        kind = entry.get("dtype")
        shape = _ints(entry.get("shape"))
        offsets = _ints(entry.get("data_offsets"), 2)
        if kind is None or shape is None or offsets is None:
            raise ProtocolError(
                f"tensor {name!r} has a malformed header entry (it needs exactly a dtype, a "
                "shape and two data_offsets, in JSON integers)",
                400,
                "bad_model",
            )
        begin, end = offsets
        if not isinstance(kind, str) or kind not in _DTYPES:
            raise ProtocolError(
                f"tensor {name!r} has dtype {kind!r}, which fedloop does not accept "
                f"(accepted: {', '.join(_DTYPES)})",
                422,
                "bad_dtype",
            )
        if any(s < 0 for s in shape):
            raise ProtocolError(f"tensor {name!r} has a negative dimension", 400, "bad_model")
        dtype = _DTYPES[kind]
        # Python ints: an int64 product of huge dimensions would overflow or wrap around.
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise ProtocolError(
                f"tensor {name!r} spans {end - begin} bytes but dtype and shape need {expected}",
                400,
                "bad_model",
            )
        entries.append((begin, end, name, dtype, shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            raise ProtocolError(f"tensor {name!r} overlaps or leaves a gap", 400, "bad_model")
        position = end
    if position != len(body):
        raise ProtocolError(
            f"data section is {len(body)} bytes but the tensors cover {position}", 400, "bad_model"
        )
    weights: Weights = {}
    for begin, end, name, dtype, shape in entries:
        weights[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
    return weights


_FINITE_BLOCK = 1 << 18  # elements per block: a small reused bool buffer, stays in cache


def all_finite(array: np.ndarray, parallel: bool = False) -> bool:
    """Return True if no element is NaN or ±Inf, checked in blocks (no model-sized temporary).

    ``parallel``: a large array is checked in ranges on several threads (`fedloop.parallel`).
    """
    flat = array.reshape(-1)  # a view for the contiguous arrays decode returns
    if flat.size <= _FINITE_BLOCK:
        return bool(np.isfinite(flat).all())
    ranges = split(flat.size, partial(_finite_range, flat), _FINITE_BLOCK, parallel)
    return all(ranges)


def _finite_range(flat: np.ndarray, start: int, stop: int) -> bool:
    mask = np.empty(_FINITE_BLOCK, dtype=bool)
    for at in range(start, stop, _FINITE_BLOCK):
        block = flat[at : min(at + _FINITE_BLOCK, stop)]
        out = mask[: block.size]
        np.isfinite(block, out=out)
        if not out.all():
            return False
    return True


def check_against(
    weights: Mapping[str, np.ndarray],
    spec: ModelSpec,
    finite: bool = True,
    parallel: bool = False,
) -> None:
    """Raise a ProtocolError naming the first tensor that differs from `spec` or is not finite.

    ``finite=False`` leaves out the finiteness pass, for tensors finite by construction;
    ``parallel`` runs it on several threads (for a model others wait on).
    """
    expected = {t.name: t for t in spec.tensors}
    missing = [n for n in expected if n not in weights]
    unexpected = [n for n in weights if n not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}")
        raise ProtocolError(
            f"model does not match the registered model: {'; '.join(parts)}", 422, "wrong_names"
        )
    for name, array in weights.items():
        want = expected[name]
        got_dtype = dtype_name(array.dtype)
        if got_dtype != want.dtype:
            raise ProtocolError(
                f"tensor {name!r} has dtype {got_dtype}, the registered model has {want.dtype}",
                422,
                "wrong_dtype",
            )
        if tuple(array.shape) != want.shape:
            raise ProtocolError(
                f"tensor {name!r} has shape {tuple(array.shape)}, "
                f"the registered model has {want.shape}",
                422,
                "wrong_shape",
            )
    if not finite:
        return
    # Every floating tensor in one run of elements, checked in ranges on a few threads.
    floats = [(n, a.reshape(-1)) for n, a in weights.items() if a.dtype.kind == "f"]
    checked = split_tensors(
        [a.size for _, a in floats],
        lambda i, start, stop: (i, _finite_range(floats[i][1], start, stop)),
        _FINITE_BLOCK,
        parallel,
    )
    bad = [i for i, ok in checked if not ok]
    if bad:
        raise _not_finite(floats[min(bad)][0])


class Hasher(Protocol):
    def update(self, data: memoryview, /) -> object: ...


def _not_finite(name: str) -> ProtocolError:
    return ProtocolError(
        f"tensor {name!r} contains NaN or Inf; fix the training that produced it",
        422,
        "not_finite",
    )


def _hash_checking(data: Bytes, weights: Weights, hasher: Hasher, finite: bool) -> None:
    """Feed every byte of `data` to `hasher`, in order, and check the floating tensors of
    `weights` (views of `data`, in its order) for NaN and Inf in the same pass: each block is
    hashed, then checked while it is in cache. Raises for the first tensor not finite."""
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    position = view.nbytes - sum(a.nbytes for a in weights.values())  # the header's end
    hasher.update(view[:position])
    mask = np.empty(_FINITE_BLOCK, dtype=bool)
    for name, array in weights.items():
        if not (finite and array.dtype.kind == "f"):
            hasher.update(view[position : position + array.nbytes])
            position += array.nbytes
            continue
        flat = array.reshape(-1)
        for at in range(0, flat.size, _FINITE_BLOCK):
            block = flat[at : at + _FINITE_BLOCK]
            hasher.update(view[position : position + block.nbytes])
            position += block.nbytes
            out = mask[: block.size]
            np.isfinite(block, out=out)
            if not out.all():
                raise _not_finite(name)


def decode_checked(
    data: Bytes, spec: ModelSpec | None, finite: bool = True, hasher: Hasher | None = None
) -> Weights:
    """Return the decoded model after checking it against `spec` (or only for finiteness).

    For received bytes: the header may be only as long as a model of `spec` needs
    (`ModelSpec.header_limit`), or `MAX_RECEIVED_HEADER` without a spec.

    ``finite=False`` leaves out the pass over the values, for bytes whose writer checked them.
    ``hasher``: every byte of `data` is fed to it, in the pass that checks the values (one
    read of a large model from memory instead of two); it is complete unless this raises.
    """
    limit = spec.header_limit if spec is not None else MAX_RECEIVED_HEADER
    weights = decode(data, limit)
    if not weights:
        raise ProtocolError("model has no tensors", 422, "empty_model")
    spec = spec if spec is not None else ModelSpec.of(weights)
    check_against(weights, spec, finite=finite and hasher is None)
    if hasher is not None:
        _hash_checking(data, weights, hasher, finite)
    return weights
