"""Models written to the blob store from page-aligned buffers with O_DIRECT (no copy into the
page cache), and the page cache as before wherever that cannot be: on real files in tmp_path.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import numpy as np
import pytest

from fedloop.store import blobs as blobs_module
from fedloop.store.blobs import BlobStore, BodyPool, PooledBody, blob_id

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT here")

SIZE = 3 * blobs_module._DIRECT_MIN + 1234  # whole pages, then a tail of 1234 bytes


def _model(size: int = SIZE, seed: int = 0) -> PooledBody:
    body = PooledBody(size)
    body[:] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    return body


def _takes_direct(directory: Path) -> bool:
    """Whether the filesystem of `directory` accepts an O_DIRECT write of one page."""
    path = directory / "probe"
    page = PooledBody(blobs_module._PAGE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.write(fd, page)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        path.unlink()


class _Writes:
    """Records each os.write: its length and whether its file was open with O_DIRECT."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[tuple[int, bool]] = []
        self.real = os.write
        monkeypatch.setattr(os, "write", self)

    def __call__(self, fd: int, data: bytes | memoryview) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        self.seen.append((memoryview(data).nbytes, direct))
        return self.real(fd, data)


def test_a_page_aligned_model_goes_to_the_disk_directly_and_its_tail_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _takes_direct(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} does not take O_DIRECT writes")
    writes = _Writes(monkeypatch)
    store = BlobStore(tmp_path / "blobs")
    body = _model()
    key = store.put(body)
    tail = SIZE % blobs_module._PAGE
    assert writes.seen == [(SIZE - tail, True), (tail, False)]
    assert key == blob_id(body) and store.get(key) == bytes(body)
    # A global model's one piece is a read-only view of its buffer: the same.
    writes.seen.clear()
    other = _model(seed=1)
    key = store.put_parts([memoryview(other).toreadonly()])
    assert writes.seen == [(SIZE - tail, True), (tail, False)]
    assert store.get(key) == bytes(other)
    assert not list((tmp_path / "blobs").glob("*/*/.tmp-*"))


def test_the_page_cache_takes_what_o_direct_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = _Writes(monkeypatch)
    pages = np.random.default_rng(2).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    # bytes (not page-aligned), a model split in pieces, a small one, an unsynced store
    split = memoryview(_model(seed=3))
    cases: list[tuple[BlobStore, list[bytes | memoryview | PooledBody]]] = [
        (BlobStore(tmp_path / "a"), [pages]),
        (BlobStore(tmp_path / "b"), [split[:1000], split[1000:]]),
        (BlobStore(tmp_path / "c"), [_model(blobs_module._DIRECT_MIN - 1, seed=4)]),
        (BlobStore(tmp_path / "d", fsync=False), [_model(seed=5)]),
    ]
    for store, parts in cases:
        writes.seen.clear()
        key = store.put_parts(parts)
        assert writes.seen and not any(direct for _, direct in writes.seen)
        assert store.get(key) == b"".join(bytes(p) for p in parts)


def test_a_filesystem_that_refuses_o_direct_gets_the_whole_model_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fcntl.fcntl

    def refuse(fd: int, command: int, arg: int = 0) -> int:
        if command == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, command, arg)

    monkeypatch.setattr(fcntl, "fcntl", refuse)
    store = BlobStore(tmp_path / "blobs")
    body = _model(seed=6)
    key = store.put(body)
    assert key == blob_id(body) and store.get(key) == bytes(body)


def test_a_direct_write_refused_halfway_is_finished_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # E.g. a device that wants a larger alignment than the page past some point.
    if not _takes_direct(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} does not take O_DIRECT writes")
    real = os.write
    calls = {"direct": 0}

    def write(fd: int, data: bytes | memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls["direct"] += 1
            if calls["direct"] > 1:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, memoryview(data)[: blobs_module._PAGE])  # one page, then refused
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    store = BlobStore(tmp_path / "blobs")
    body = _model(seed=7)
    key = store.put(body)
    assert calls["direct"] == 2
    assert key == blob_id(body) and store.get(key) == bytes(body)


def test_an_aggregator_pool_hands_out_page_aligned_buffers() -> None:
    pool = BodyPool(PooledBody)
    for size in (1, 4096, SIZE):
        body = pool.acquire(size)
        address = np.frombuffer(body, np.uint8).__array_interface__["data"][0]
        assert len(body) == size and address % blobs_module._PAGE == 0
