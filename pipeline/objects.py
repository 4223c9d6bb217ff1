"""An object's bytes in one request. s3fs (its `max_concurrency` above 1, the default) asks for an
object's size with a HEAD before a plain `cat_file`, to split large downloads; an image, a marker or a
record is small, and the HEAD was half the requests of reading one: against the local S3 server ~370
objects/s where a range from byte 0, one GET, gave ~690 (benchmarks/RESULTS.md)."""

from __future__ import annotations

import errno


def read_object(fs, path: str, size: int | None = None, limit: int | None = None) -> bytes:
    """The bytes of `path` (without the protocol): all of them, or at most `limit`. `size`: as listed,
    when known (an empty object is then no request)."""
    if size == 0:
        return b""
    try:
        return fs.cat_file(path, start=0, end=limit)
    except OSError as err:
        # an empty object has no byte 0 for a range to start at: S3 answers 416, InvalidRange
        if err.errno != errno.EINVAL or "range" not in str(err).lower():
            raise
        return fs.cat_file(path)[:limit]
