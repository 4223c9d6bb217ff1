"""An object's bytes in one request. s3fs (its `max_concurrency` above 1, the default) asks for an
object's size with a HEAD before a plain `cat_file`, to split large downloads; an image, a marker or a
record is small, and the HEAD was half the requests of reading one: against the local S3 server ~330
objects/s where a range from byte 0, one GET, gave ~640 (benchmarks/RESULTS.md). Other stores are read as
before: fsspec's HTTP filesystem, for one, reads a whole answer whatever range it asked for, so a limit
there is kept by reading through a file."""

from __future__ import annotations

import errno
import json
from typing import Any

import s3fs


def read_object(fs, path: str, size: int | None = None, limit: int | None = None) -> bytes:
    """The bytes of `path` (without the protocol): all of them, or at most `limit`. `size`: as listed,
    when known (an empty object is then no request)."""
    if size == 0:
        return b""
    if not isinstance(fs, s3fs.S3FileSystem):
        if limit is None:
            return fs.cat_file(path)
        with fs.open(path, "rb") as f:
            return f.read(limit)
    try:
        return fs.cat_file(path, start=0, end=limit)
    except OSError as err:
        # an empty object has no byte 0 for a range to start at: S3 answers 416 (InvalidRange), which s3fs
        # raises as EINVAL; any other failure, or an object not empty, is the read's error
        if err.errno != errno.EINVAL:
            raise
        try:
            empty = fs.size(path) == 0
        except OSError:
            empty = False
        if empty:
            return b""
        raise


def read_json(fs, path: str) -> Any | None:
    """The JSON document at `path` (a marker, a manifest), or None when there is none."""
    try:
        return json.loads(read_object(fs, path))
    except FileNotFoundError:
        return None
