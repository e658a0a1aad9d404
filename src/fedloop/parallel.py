"""Element-wise work on large arrays, cut into ranges that a few threads run at once.

NumPy releases the GIL inside a ufunc's loop, and BLAKE3 hashes on its own threads, so one
model-sized pass (a fold, a division, a finiteness check) can use the cores that are idle
while the aggregator closes a round. On the 2-core VM of docs/performance.md, adding 100 MB
of float32 into float64 sums takes 28 ms on one thread and 14 ms on two. Each element is
computed by the same operation whatever range it falls in, so results are bit-identical to
one pass. Arrays under `MIN_SPLIT` elements run in one call: a thread hop costs more there.

Only work that others wait on, with their cores idle, is split: an aggregator closing a round
is; one checking an upload while others stream in is not (with 10 agents × 100 MB on 2
cores, splitting every upload's check and fold made rounds 10–15 % slower).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# Elements, 4 MiB of float32: under it, thread hops cost more than they save. Measured on the
# 2-core VM, simulation 2 × 4 MB (1 M elements): 10.4 → 9.5 ms/round at 1 M instead of 2 M;
# at 512 K (an earlier pass, before the last fold joined the division) 17 → 20 ms.
MIN_SPLIT = 1 << 20
MAX_THREADS = 4  # model-sized passes are bound by memory bandwidth past a few cores

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def threads() -> int:
    """Return how many threads one pass uses: the CPUs this process may run on, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_THREADS))


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="fedloop-split")
        return _pool


def ranges(size: int, parts: int, align: int) -> list[tuple[int, int]]:
    """Cut ``[0, size)`` into at most `parts` ranges whose inner bounds are multiples of align."""
    if size <= 0:
        return [(0, 0)]
    step = -(-size // max(1, parts))  # ceil
    step = -(-step // align) * align
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def split_tensors(
    sizes: Sequence[int],
    work: Callable[[int, int, int], T],
    align: int = 1 << 16,
    parallel: bool = True,
) -> list[T]:
    """Return ``work(i, start, stop)`` for pieces covering every element of tensors of `sizes`.

    The tensors are cut as one run of ``sum(sizes)`` elements, so a model of many tensors
    (each under `MIN_SPLIT`) is shared out as evenly as one large tensor. Pieces come back in
    tensor order, and each tensor's pieces in element order; an empty tensor has none.
    ``parallel=False`` runs them all on the caller's thread.
    """
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)

    def run(first: int, last: int) -> list[tuple[int, int, T]]:
        done = []
        for i, size in enumerate(sizes):
            start, stop = max(first - offsets[i], 0), min(last - offsets[i], size)
            if start < stop:
                done.append((i, start, work(i, start, stop)))
        return done

    # Cut on `align` multiples of the whole run; a tensor shorter than one piece stays whole.
    pieces = [p for part in split(offsets[-1], run, align, parallel) for p in part]
    pieces.sort(key=lambda p: (p[0], p[1]))
    return [result for _, _, result in pieces]


def split(
    size: int, work: Callable[[int, int], T], align: int = 1 << 16, parallel: bool = True
) -> list[T]:
    """Return ``[work(start, stop), ...]`` over ranges covering `size` elements, in order.

    Ranges run at once on a shared pool, and the caller's thread runs the first one. `work`
    must only touch its own range of any output. Under `MIN_SPLIT` elements, with one CPU, or
    with ``parallel=False`` (the cores are busy with other work), it is a single call
    ``work(0, size)``.
    """
    count = threads() if parallel else 1
    if size < MIN_SPLIT or count == 1:
        return [work(0, size)]
    cuts = ranges(size, count, align)
    pool = _executor(count - 1)
    futures = [pool.submit(work, start, stop) for start, stop in cuts[1:]]
    try:
        first = work(*cuts[0])
    finally:
        rest = [future.result() for future in futures]  # never leave a range running
    return [first, *rest]
