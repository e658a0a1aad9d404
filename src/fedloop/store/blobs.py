"""Bytes stored by their BLAKE3 hash, written atomically so a crash never leaves half a blob.

The content address is the 256-bit BLAKE3 hash in hex (`blob_id`, `new_hasher`): 0.6 ms per
4 MB here against 2.3 ms for SHA-256, and every model that reaches the store is hashed once
(docs/decisions/0007-blake3-content-address.md). Stores written before that keep their SHA-256
names: ids are opaque, only their bytes are looked up.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import blake3
import numpy as np

# Bytes from which one hash uses every core (2 cores: 100 MB in 10 ms instead of 18); under
# it, and for the chunks of a stream, one thread is faster.
_PARALLEL_HASH = 1 << 20
# Pieces from which `put_parts` hashes on every core. BLAKE3's subtrees are aligned to the
# stream, and the safetensors header shifts each tensor off that alignment: a tensor is then
# hashed in a ramp of small subtrees, each a hop between threads. Measured on 2 cores, after a
# 288-byte header: 32 MB in 1 MB tensors 6.2 ms on both cores vs 4.8 on one, in 4 MB tensors
# 3.9 vs 4.8; a 4 MB model in four tensors 0.73 vs 0.55 ms.
_PARALLEL_PART = 4 << 20
# Bytes from which one piece (a global model in one buffer) is hashed on every core. After
# the pause before an aggregation, the other core's hashing thread starts late: 2-32 MB took
# the same time on one core and on two, and the pool's threads then spin on the core that
# simulation workers need (sim 10 × 4 MB, distinct models: aggregation 15.3–17.5 ms a round
# on both cores, 14.2–15.4 ms on one).
_PARALLEL_PIECE = 32 << 20


def new_hasher(parallel: bool = False) -> blake3.blake3:
    """Return a hasher of the content address (`update(...)`, then `hexdigest()`).

    `parallel`: large updates are hashed on all cores (for a model the caller waits on).
    """
    return blake3.blake3(max_threads=blake3.blake3.AUTO) if parallel else blake3.blake3()


def blob_id(
    data: bytes | bytearray | memoryview | mmap.mmap, parallel_from: int = _PARALLEL_HASH
) -> str:
    """Return the content address (BLAKE3-256, hex) of `data`, on all cores from
    `parallel_from` bytes."""
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    return new_hasher(parallel=size >= parallel_from).update(data).hexdigest()


class HashedBody(bytearray):
    """A bytearray with its content address (``digest``, hex) once someone has computed it.

    A small body is hashed chunk by chunk as it streams in; a large one read straight into its
    buffer is hashed by its taker on a worker thread, in the pass that checks its values
    (``digest`` is None until then). `BlobStore.put` uses a digest instead of hashing the bytes
    again. Whoever sets ``digest`` promises not to change the bytes afterwards.
    """

    digest: str | None = None


class PooledBody(mmap.mmap):
    """A `BodyPool` buffer: anonymous memory of a fixed size, starting on a page boundary,
    with the content address of its bytes once someone has computed it (``digest``).

    Page-aligned, a stored model is written from it straight to the disk (`BlobStore`, with
    ``O_DIRECT``) instead of being copied into the page cache first. Whoever sets ``digest``
    promises not to change the bytes afterwards, as for `HashedBody`.
    """

    digest: str | None = None

    def __new__(cls, size: int) -> PooledBody:
        return super().__new__(cls, -1, size)


class MappedBody(mmap.mmap):
    """A read-only memory map of a file, with the content address of its bytes when known
    (``digest``).

    Readers get the file's pages without a copy: arrays decoded from it view the page cache
    (or /dev/shm). The map stays valid after the file is unlinked, until its last view is gone.
    """

    digest: str | None = None
    # Set by fedloop code that checked every floating value of these bytes is finite as it
    # wrote them (a simulation worker, on the arrays still in its cache): the aggregator then
    # checks names, shapes and dtypes only. Bytes from the network never have it.
    finite: bool = False


def map_file(path: str | Path, digest: str | None = None) -> MappedBody | bytes:
    """Return the bytes of the file at `path` mapped read-only (b"" for an empty file)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return b""  # mmap cannot map an empty file
        body = MappedBody(handle.fileno(), 0, access=mmap.ACCESS_READ)
    body.digest = digest
    return body


B = TypeVar("B", HashedBody, PooledBody)


class BodyPool(Generic[B]):
    """Reuses the buffers request bodies are read into, once nothing views them any more.

    A fresh 100 MB ``bytearray`` costs its zero-fill plus 25,600 page faults (the kernel zeroes
    each page again), and unmapping it when freed; an aggregator receives the same model size
    every round. A pooled buffer is handed out again only when the pool's own reference is the
    last one: decoded tensors, running sums and global models view their body through
    memoryviews, and each of those holds a reference to it. The free buffers kept are capped
    (`keep_bytes`); others are freed as usual.
    """

    def __init__(self, make: Callable[[int], B], keep_bytes: int = 512 * 1024 * 1024) -> None:
        # `make(size)` is a new buffer: `HashedBody` (a bytearray), or `PooledBody` for bodies
        # that go to a `BlobStore`, which writes those page-aligned buffers to the disk directly
        # (not of size 0: no memory map is empty).
        self.make: Callable[[int], B] = make
        self.keep_bytes = keep_bytes
        self._buffers: list[B] = []
        self._lock = threading.Lock()

    def acquire(self, size: int) -> B:
        """Return a body buffer of `size` bytes (its old contents: the caller fills all of it)."""
        with self._lock:
            for buffer in self._buffers:
                # 3: the list, the loop variable and getrefcount's own argument.
                if len(buffer) == size and sys.getrefcount(buffer) == 3:
                    buffer.digest = None
                    return buffer
            held = sum(len(b) for b in self._buffers)
            if held + size > self.keep_bytes:  # make room: forget free buffers of other sizes
                self._buffers = [
                    b for b in self._buffers if len(b) == size or sys.getrefcount(b) > 3
                ]
                held = sum(len(b) for b in self._buffers)
            body = self.make(size)
            if held + size <= self.keep_bytes:
                self._buffers.append(body)
            return body


def known_digest(data: object) -> str | None:
    """Return the content address that came with `data` (a `HashedBody`), or None."""
    digest = getattr(data, "digest", None)
    return digest if isinstance(digest, str) else None


def _drop_cached(fd: int) -> None:
    """Let the kernel drop a file's pages from its cache once they are on disk.

    A stored model is written once and seldom read again (a restart, a fetch of an old round),
    and every round adds more: cached, they grow the page cache by each model stored, which a
    container's memory limit counts. Dropped, their pages are reused for the next model's
    writes. On the reference VM that also made a 4 MB blob's write + fsync 12.4 → 2.4 ms: pages
    the guest never used before cost the hypervisor a fault each (≈ 2.5 ms per MB).
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


# O_DIRECT's alignment of memory, file offset and length: the page, which every Linux
# filesystem that takes O_DIRECT accepts (most need only the logical block, 512 bytes).
_PAGE = mmap.PAGESIZE
# Bytes from which a model is written with O_DIRECT. Measured on the reference VM (ext4 on
# virtio), write + fsync from a page-aligned buffer, wall time and CPU through the page cache
# against direct: 256 KiB 0.49-0.51 and 0.19 ms against 0.54-0.58 and 0.19-0.23 ms (slower);
# 1 MiB 0.99-1.06 and 0.42-0.44 ms against 0.82-0.92 and 0.25-0.26 ms; 4 MB 2.8-3.6 and
# 1.3-1.9 ms against 2.5-2.7 and 0.4-0.5 ms; 100 MB 53-59 and 27-31 ms against 38-41 and 3-4 ms.
_DIRECT_MIN = 1024 * 1024


def _write_direct(fd: int, parts: Sequence[bytes | bytearray | memoryview | mmap.mmap]) -> int:
    """Write the page-aligned start of a one-piece blob to `fd` (at offset 0) with O_DIRECT;
    return how many bytes were written, 0 where nothing can be (the caller writes the rest
    through the page cache, from the offset returned).

    The disk reads the bytes from the caller's memory: no copy into the page cache, and no
    cached pages to drop afterwards. That needs the piece's memory to start on a page (a
    `PooledBody`, a file's memory map) and a filesystem that takes O_DIRECT; elsewhere (tmpfs
    before Linux 6.6, macOS, Windows) everything goes through the page cache as before.
    """
    direct = getattr(os, "O_DIRECT", 0)
    if not direct or len(parts) != 1:
        return 0
    with memoryview(parts[0]) as view:
        if not view.c_contiguous or view.nbytes < _DIRECT_MIN:
            return 0
        with view.cast("B") as data:
            if np.frombuffer(data, np.uint8).__array_interface__["data"][0] % _PAGE:
                return 0
            aligned = data.nbytes - data.nbytes % _PAGE
            import fcntl  # POSIX only, as O_DIRECT

            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | direct)
            except OSError:  # the filesystem does not take O_DIRECT
                return 0
            done = 0
            try:
                while done < aligned:
                    done += os.write(fd, data[done:aligned])
            except OSError as exc:
                # EINVAL: the filesystem wants another alignment (or refuses O_DIRECT only
                # now); what was written stays, the rest goes through the page cache.
                if exc.errno != errno.EINVAL:
                    raise
            finally:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            return done


class BlobStore:
    """A directory of immutable blobs, `ab/cd/<content address>.safetensors`."""

    def __init__(self, root: str | Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Off: a blob survives the process being killed (the page cache keeps it), not
        # necessarily a power loss.
        self.fsync = fsync
        self._made: set[Path] = set()  # blob directories known to exist

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise KeyError(f"not a blob id: {key!r}")
        return self.root / key[:2] / key[2:4] / f"{key}.safetensors"

    def put(self, data: bytes | bytearray | memoryview | mmap.mmap, key: str | None = None) -> str:
        """Store `data` (fsynced unless `fsync` is off), return its id; the same bytes twice is
        a no-op.

        `key` must be `blob_id(data)` when given (e.g. computed while it streamed in).
        """
        key = key or known_digest(data) or blob_id(data)
        return self._write(key, [data])

    def put_parts(self, parts: Sequence[bytes | bytearray | memoryview | mmap.mmap]) -> str:
        """Store the concatenation of `parts` like `put`, without joining them in memory."""
        if len(parts) == 1:  # one piece from its start: aligned for BLAKE3's subtrees
            return self._write(blob_id(parts[0], _PARALLEL_PIECE), parts)
        sizes = [memoryview(part).nbytes for part in parts]
        big = sum(size for size in sizes if size >= _PARALLEL_PART)
        hasher = new_hasher(parallel=2 * big >= sum(sizes) >= _PARALLEL_HASH)
        for part in parts:
            hasher.update(part)
        return self._write(hasher.hexdigest(), parts)

    def _write(self, key: str, parts: Sequence[bytes | bytearray | memoryview | mmap.mmap]) -> str:
        target = self.path(key)
        if target.exists():
            return key
        if target.parent not in self._made:  # one mkdir per directory, not one per blob
            target.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(target.parent)
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        except FileNotFoundError:  # the directory was removed behind the store's back
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            try:
                done = _write_direct(fd, parts) if self.fsync else 0
                for part in parts:
                    with memoryview(part) as view, view.cast("B") as data:
                        skip = min(done, data.nbytes)
                        done -= skip
                        while skip < data.nbytes:
                            skip += os.write(fd, data[skip:])
                if self.fsync:
                    os.fsync(fd)
                    _drop_cached(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def keys(self) -> set[str]:
        return {p.stem for p in self.root.glob("*/*/*.safetensors")}

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
