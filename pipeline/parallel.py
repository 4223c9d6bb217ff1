"""Many small requests to a store at once (footers, deletions, per-source records): a thread pool whose
pending calls stay bounded, since each holds ~2 KB until it runs and a run's chunk files number ~1M."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# requests in flight from one process: s3fs's connection pool holds 10 unless the storage options'
# `config_kwargs.max_pool_connections` says more; a few more threads keep it full while others parse
STORE_THREADS = 16
_WINDOW = 1024  # calls handed to the pool at a time


def in_threads(fn: Callable[[T], R], items: Sequence[T], threads: int = STORE_THREADS) -> list[R]:
    """`fn` over `items`, `threads` at a time, results in order. The first failure raises; calls not
    started by then are dropped."""
    results: list[R] = []
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(items), _WINDOW):
            results.extend(pool.map(fn, items[start : start + _WINDOW]))
    return results
