"""Deleting many files of a store at once, each known to be the pipeline's own (the caller's survey says
so): a run over 1B images leaves ~1M chunk files to remove after its marker, and one request per file from
the driver is hours against S3. On S3 one DeleteObjects request takes 1,000 keys; elsewhere each file is
one request, several at a time. A file already gone is no error; any other failure raises, naming a file
that stayed: a removal that did not happen is never taken for one that did (an overwrite that kept the
old chunks would resume them)."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import s3fs

KEYS_PER_REQUEST = 1000  # S3's limit for DeleteObjects
_THREADS = 16  # requests in flight at once


def delete_files(fs, paths: list[str]) -> None:
    """Delete `paths` (files of `fs`, without the protocol), in bulk where the store can."""
    if isinstance(fs, s3fs.S3FileSystem):
        requests = [
            (bucket, keys[i : i + KEYS_PER_REQUEST])
            for bucket, keys in _keys_by_bucket(fs, paths).items()
            for i in range(0, len(keys), KEYS_PER_REQUEST)
        ]
        with ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(lambda request: _delete_objects(fs, *request), requests))
        fs.invalidate_cache()
    else:
        with ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(lambda path: _delete_file(fs, path), paths))


def _keys_by_bucket(fs, paths: list[str]) -> dict[str, list[str]]:
    keys = defaultdict(list)
    for path in paths:
        bucket, key, _ = fs.split_path(path)
        keys[bucket].append(key)
    return keys


def _delete_objects(fs, bucket: str, keys: list[str]) -> None:
    # S3 answers 200 with a list of the keys it could not delete (access denied, a lock): Quiet lists
    # only those. A key that was never there counts as deleted.
    answer = fs.call_s3(
        "delete_objects", Bucket=bucket, Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True}
    )
    failed = answer.get("Errors") or []
    if failed:
        first = failed[0]
        raise OSError(
            f"the store kept {len(failed)} of {len(keys)} files it was asked to delete, e.g. "
            f"s3://{bucket}/{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}. They are "
            "left as they are: let these credentials delete in this output (s3:DeleteObject), then run again"
        )


def _delete_file(fs, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
