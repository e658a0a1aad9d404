"""Dataset loaders: the real MNIST files when present, and hand-written files for every error."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from fedloop.errors import FedloopError
from fedloop.ml import data

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"
MNIST = SHARED / "mnist"
FASHION = SHARED / "fashion-mnist"


def write_idx(path: Path, magic: int, shape: tuple[int, ...], body: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    raw = header + body
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_mnist(directory: Path, n_images: int = 3, n_labels: int = 3, split: str = "t10k") -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 28, 28), dtype=np.uint8)
    write_idx(directory / f"{split}-images-idx3-ubyte.gz", 2051, images.shape, images.tobytes())
    labels = (np.arange(n_labels) % 10).astype(np.uint8)
    write_idx(directory / f"{split}-labels-idx1-ubyte.gz", 2049, labels.shape, labels.tobytes())


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST files not found at {MNIST}")
def test_real_mnist_matches_its_published_counts() -> None:
    images, labels = data.load_mnist(MNIST, "test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    train_images, train_labels = data.load_mnist(MNIST, "train")
    assert train_images.shape == (60_000, 28, 28)
    assert np.bincount(train_labels)[0] == 5923


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"Fashion-MNIST files not found at {FASHION}")
def test_real_fashion_mnist_is_balanced() -> None:
    images, labels = data.load_fashion_mnist(FASHION, "test")
    assert images.shape == (10_000, 28, 28)
    assert np.bincount(labels).tolist() == [1000] * 10


def test_small_written_mnist_loads_gzipped_or_not(tmp_path: Path) -> None:
    write_mnist(tmp_path, 5, 5)
    images, labels = data.load_mnist(tmp_path, "test")
    assert images.shape == (5, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4]
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in tmp_path.glob("*.gz"):
        (plain / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
    images2, _ = data.load_mnist(plain, "test")
    np.testing.assert_array_equal(images, images2)


def test_missing_file_names_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(FedloopError, match=r"file not found: .*train-images-idx3-ubyte\.gz"):
        data.load_mnist(tmp_path, "train")
    with pytest.raises(FedloopError, match="data directory not found"):
        data.load_mnist(tmp_path / "nope")


def test_bad_magic_number(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2051, (3,), bytes(3))
    with pytest.raises(FedloopError, match="magic number 2051, expected 2049"):
        data.load_mnist(tmp_path, "test")


def test_truncated_file(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, (3, 28, 28), bytes(28 * 28 * 2))
    with pytest.raises(FedloopError, match=r"truncated.*2352 bytes.*found 1568"):
        data.load_mnist(tmp_path, "test")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08"))
    with pytest.raises(FedloopError, match="truncated"):
        data.load_mnist(tmp_path, "test")


def test_corrupt_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(FedloopError, match="not a valid gzip file"):
        data.load_mnist(tmp_path, "test")


def test_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_images=3, n_labels=4)
    with pytest.raises(FedloopError, match=r"holds 3 images but .* holds 4 labels"):
        data.load_mnist(tmp_path, "test")


def test_bad_split(tmp_path: Path) -> None:
    with pytest.raises(FedloopError, match="split"):
        data.load_mnist(tmp_path, "valid")  # type: ignore[arg-type]


def write_cifar(path: Path, labels: list[int]) -> np.ndarray:
    rng = np.random.default_rng(len(labels))
    images = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    records = np.concatenate(
        [np.asarray(labels, np.uint8)[:, None], images.reshape(len(labels), -1)], axis=1
    )
    path.write_bytes(records.tobytes())
    return images


def test_cifar10_binary_batches(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    expected = [write_cifar(root / f"data_batch_{i}.bin", [i, 9, 0]) for i in range(1, 6)]
    test_images = write_cifar(root / "test_batch.bin", [3, 4])
    images, labels = data.load_cifar10(tmp_path, "train")  # the parent works too
    assert images.shape == (15, 3, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, np.concatenate(expected))
    assert labels.tolist()[:6] == [1, 9, 0, 2, 9, 0]
    images, labels = data.load_cifar10(root, "test")
    np.testing.assert_array_equal(images, test_images)
    assert labels.tolist() == [3, 4]


def test_cifar10_errors(tmp_path: Path) -> None:
    with pytest.raises(FedloopError, match=r"file not found: .*test_batch\.bin"):
        data.load_cifar10(tmp_path, "test")
    (tmp_path / "test_batch.bin").write_bytes(bytes(3073 + 10))
    with pytest.raises(FedloopError, match="not a whole number of 3073-byte records"):
        data.load_cifar10(tmp_path, "test")
    write_cifar(tmp_path / "test_batch.bin", [42])
    with pytest.raises(FedloopError, match="label 42"):
        data.load_cifar10(tmp_path, "test")


def test_sklearn_embedded_sets() -> None:
    pytest.importorskip("sklearn")
    images, labels = data.load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0 and labels.dtype == np.int64
    x, y = data.load_breast_cancer()
    assert x.shape == (569, 30) and set(np.unique(y)) == {0, 1}


def test_csv_numeric_and_string_labels(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("a,label,b\n1,0,2.5\n3,1,4\n\n5,1,6\n")
    x, y = data.load_csv(p, "label")
    np.testing.assert_array_equal(x, [[1, 2.5], [3, 4], [5, 6]])
    assert y.dtype == np.int64 and y.tolist() == [0, 1, 1]
    p.write_text("a,b,kind\n1,2,dog\n3,4,cat\n")
    x, y = data.load_csv(p, -1)
    assert x.shape == (2, 2) and y.tolist() == [1, 0]  # sorted: cat=0, dog=1
    p.write_text("a,t\n1,0.5\n2,1.5\n")
    assert data.load_csv(p, "t")[1].dtype == np.float64


def test_csv_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    with pytest.raises(FedloopError, match=r"file not found: .*d\.csv"):
        data.load_csv(p, "y")
    p.write_text("a,y\n")
    with pytest.raises(FedloopError, match="no data rows"):
        data.load_csv(p, "y")
    p.write_text("a,y\n1,2\n")
    with pytest.raises(FedloopError, match="no column 'label'"):
        data.load_csv(p, "label")
    with pytest.raises(FedloopError, match="out of range"):
        data.load_csv(p, 5)
    p.write_text("a,y\n1,2\n3\n")
    with pytest.raises(FedloopError, match="line 3 has 1 fields"):
        data.load_csv(p, "y")
    p.write_text("a,y\n1,2\nx,3\n")
    with pytest.raises(FedloopError, match="line 3, column 'a': 'x' is not a number"):
        data.load_csv(p, "y")


def test_images_to_float() -> None:
    u8 = np.full((2, 4, 4), 255, np.uint8)
    out = data.images_to_float(u8)
    assert out.shape == (2, 1, 4, 4) and out.dtype == np.float32 and out.max() == 1.0
    assert data.images_to_float(np.ones((1, 3, 2, 2)), scale=2.0).max() == 0.5
    with pytest.raises(FedloopError, match="shape"):
        data.images_to_float(np.zeros((3, 4)))
