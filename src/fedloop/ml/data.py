"""Dataset loaders from local files (numpy only; scikit-learn for its embedded datasets).

Every loader checks what it reads and raises ``FedloopError`` saying what is wrong: a missing
file (naming the expected path), a bad magic number, a truncated file, or counts that
disagree. Nothing here downloads anything and nothing unpickles anything.
"""

from __future__ import annotations

import csv
import gzip
import importlib
import zlib
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np

from fedloop.errors import FedloopError

__all__ = [
    "images_to_float",
    "load_breast_cancer",
    "load_cifar10",
    "load_csv",
    "load_digits",
    "load_fashion_mnist",
    "load_idx",
    "load_mnist",
]

Split = Literal["train", "test"]

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FedloopError(f"file not found: {path}") from None
    except OSError as exc:
        raise FedloopError(f"cannot read {path}: {exc}") from exc
    if path.suffix == ".gz":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise FedloopError(f"{path} is not a valid gzip file ({exc}).") from exc
    return raw


def load_idx(path: str | Path, magic: int, dims: int) -> np.ndarray:
    """Return the uint8 array stored in an IDX file (gzip'd if its name ends in .gz).

    ``magic`` is the expected header magic number (2051 images, 2049 labels) and ``dims`` the
    number of big-endian uint32 sizes after it (3 for images, 1 for labels).
    """
    p = Path(path)
    data = _read_bytes(p)
    header = 4 * (1 + dims)
    if len(data) < header:
        raise FedloopError(f"{p} is truncated: {len(data)} bytes, shorter than its header.")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise FedloopError(
            f"{p} has magic number {found}, expected {magic}; is it the right IDX file?"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = int(np.prod(shape, dtype=np.int64))
    body = len(data) - header
    if body != expected:
        kind = "truncated" if body < expected else "longer than its header says"
        raise FedloopError(
            f"{p} is {kind}: header {shape} needs {expected} bytes of data, found {body}."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FedloopError(f"file not found: {directory / (stem + '.gz')} (or uncompressed {stem})")


def load_mnist(data_dir: str | Path, split: Split = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 N x 28 x 28, labels int64 N) of MNIST's train or test split.

    ``data_dir`` holds the four standard IDX files (``train-images-idx3-ubyte.gz``, ...),
    gzip'd or not.
    """
    if split not in _IDX_FILES:
        raise FedloopError(f"split must be 'train' or 'test', got {split!r}.")
    directory = Path(data_dir)
    if not directory.is_dir():
        raise FedloopError(f"data directory not found: {directory}")
    images_stem, labels_stem = _IDX_FILES[split]
    images_path = _find(directory, images_stem)
    labels_path = _find(directory, labels_stem)
    images = load_idx(images_path, _IMAGES_MAGIC, 3)
    labels = load_idx(labels_path, _LABELS_MAGIC, 1).astype(np.int64)
    if len(images) != len(labels):
        raise FedloopError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels."
        )
    if labels.size and labels.max() > 9:
        raise FedloopError(f"{labels_path} has label {labels.max()}, expected 0-9.")
    return images, labels


def load_fashion_mnist(
    data_dir: str | Path, split: Split = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 N x 28 x 28, labels int64 N) of Fashion-MNIST (same files as MNIST)."""
    return load_mnist(data_dir, split)


_CIFAR_RECORD = 1 + 3 * 32 * 32


def load_cifar10(data_dir: str | Path, split: Split = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 N x 3 x 32 x 32, labels int64 N) from CIFAR-10's binary version.

    ``data_dir`` is the ``cifar-10-batches-bin`` directory or its parent; train reads
    ``data_batch_1.bin`` .. ``data_batch_5.bin``, test ``test_batch.bin``. Images keep the
    file's channel-first layout, which is what PyTorch convolutions take.
    """
    if split not in _IDX_FILES:
        raise FedloopError(f"split must be 'train' or 'test', got {split!r}.")
    directory = Path(data_dir)
    if (directory / "cifar-10-batches-bin").is_dir():
        directory = directory / "cifar-10-batches-bin"
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    images, labels = [], []
    for name in names:
        path = directory / name
        raw = _read_bytes(path)
        if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
            raise FedloopError(
                f"{path} has {len(raw)} bytes, not a whole number of {_CIFAR_RECORD}-byte "
                "records; the file is truncated or not CIFAR-10 binary."
            )
        records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
        if records[:, 0].max() > 9:
            raise FedloopError(
                f"{path} has label {records[:, 0].max()}, expected 0-9; is it CIFAR-100?"
            )
        labels.append(records[:, 0].astype(np.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32).copy())
    return np.concatenate(images), np.concatenate(labels)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's embedded 8x8 digits: (images float32 N x 8 x 8 in [0, 1], labels)."""
    datasets = _sklearn_datasets()
    bunch = datasets.load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).astype(np.float32)
    return images, np.asarray(bunch.target, dtype=np.int64)


def load_breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's embedded breast-cancer set: (features float64 N x 30, labels)."""
    datasets = _sklearn_datasets()
    bunch = datasets.load_breast_cancer()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def _sklearn_datasets() -> ModuleType:
    try:
        return importlib.import_module("sklearn.datasets")
    except ImportError as exc:
        raise FedloopError(
            "this dataset ships with scikit-learn; install it with `pip install fedloop[sklearn]`."
        ) from exc


def load_csv(
    path: str | Path, label_column: str | int, delimiter: str = ","
) -> tuple[np.ndarray, np.ndarray]:
    """Return (features float64 N x D, labels) from a CSV file with a header row.

    ``label_column`` is a header name or a 0-based column index; every other column must be
    numeric. Labels are int64 when every label is an integer, float64 when numeric otherwise,
    and, when any label is not a number, int64 indices into the sorted distinct label strings.
    """
    p = Path(path)
    try:
        with p.open(newline="") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
    except FileNotFoundError:
        raise FedloopError(f"file not found: {p}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FedloopError(f"cannot read {p} as CSV: {exc}") from exc
    rows = [r for r in rows if r]
    if len(rows) < 2:
        raise FedloopError(f"{p} has no data rows; expected a header row and at least one row.")
    header = [h.strip() for h in rows[0]]
    if isinstance(label_column, str):
        if label_column not in header:
            raise FedloopError(f"{p} has no column {label_column!r}; its columns are {header}.")
        col = header.index(label_column)
    else:
        col = label_column
        if not -len(header) <= col < len(header):
            raise FedloopError(
                f"{p} has {len(header)} columns; label column {col} is out of range."
            )
        col %= len(header)
    features: list[list[float]] = []
    raw_labels: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise FedloopError(
                f"{p} line {line} has {len(row)} fields, the header has {len(header)}."
            )
        values = []
        for j, cell in enumerate(row):
            if j == col:
                continue
            try:
                values.append(float(cell))
            except ValueError:
                raise FedloopError(
                    f"{p} line {line}, column {header[j]!r}: {cell!r} is not a number."
                ) from None
        features.append(values)
        raw_labels.append(row[col].strip())
    return np.asarray(features, dtype=np.float64), _encode_labels(raw_labels)


def _encode_labels(raw: list[str]) -> np.ndarray:
    try:
        numeric = np.asarray([float(v) for v in raw], dtype=np.float64)
    except ValueError:
        classes = sorted(set(raw))
        index = {c: i for i, c in enumerate(classes)}
        return np.asarray([index[v] for v in raw], dtype=np.int64)
    if np.all(np.isfinite(numeric)) and np.all(numeric == np.round(numeric)):
        return numeric.astype(np.int64)
    return numeric


def images_to_float(images: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Return images as float32 N x C x H x W for a CNN: a channel axis is added to N x H x W,
    and values are divided by ``scale`` (default 255 for uint8 input, else 1).
    """
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    if arr.ndim != 4:
        raise FedloopError(f"expected images N x H x W or N x C x H x W, got shape {arr.shape}.")
    if scale is None:
        scale = 255.0 if arr.dtype == np.uint8 else 1.0
    return (arr.astype(np.float32) / np.float32(scale)).astype(np.float32)
