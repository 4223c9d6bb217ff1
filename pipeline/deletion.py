"""Deleting many files of a store at once, each known to be the pipeline's own (the caller's survey says
so): a run over 1B images leaves ~1M chunk files to remove after its marker, and one request per file from
the driver is hours against S3. On S3 one DeleteObjects request takes 1,000 keys; elsewhere each file is
one request, several at a time. A file already gone is no error; any other failure raises, naming a file
that stayed: a removal that did not happen is never taken for one that did (an overwrite that kept the
old chunks would resume them)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import s3fs

from dinat_batch.pipeline.parallel import in_threads

KEYS_PER_REQUEST = 1000  # S3's limit for DeleteObjects
# keys S3 reports as kept for a passing reason (AWS: retry them); the request as a whole was retried by
# botocore already
_TRANSIENT = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"})
_ATTEMPTS = 5
# DeleteObjects requests at once: S3 deletes ~3,500 keys a second per prefix (a run's chunks share one),
# about what four requests of 1,000 keys give; more would be throttled key by key
_REQUESTS = 4
# whole-request refusals of S3-compatible stores that want Content-MD5 (which botocore >= 1.36 no longer
# sends, a CRC32 instead) or do not take DeleteObjects: such a store deletes one key per request
_NO_BULK = frozenset({"MissingContentMD5", "NotImplemented", "InvalidRequest"})


def delete_files(fs, paths: list[str]) -> None:
    """Delete `paths` (files of `fs`, without the protocol), in bulk where the store can."""
    try:
        if isinstance(fs, s3fs.S3FileSystem):
            requests = [
                (bucket, keys[i : i + KEYS_PER_REQUEST])
                for bucket, keys in _keys_by_bucket(fs, paths).items()
                for i in range(0, len(keys), KEYS_PER_REQUEST)
            ]
            # the first request alone: a store that takes no bulk deletions refuses it, and then all
            bulk = not requests or (
                _delete_objects(fs, *requests[0])
                and all(in_threads(lambda request: _delete_objects(fs, *request), requests[1:], _REQUESTS))
            )
            if bulk:
                return
        in_threads(lambda path: _delete_file(fs, path), paths)
    finally:
        fs.invalidate_cache()


def _keys_by_bucket(fs, paths: list[str]) -> dict[str, list[str]]:
    keys = defaultdict(list)
    for path in paths:
        bucket, key, _ = fs.split_path(path)
        keys[bucket].append(key)
    return keys


def _delete_objects(fs, bucket: str, keys: list[str]) -> bool:
    """Delete `keys` of `bucket` in one request, retrying those kept for a passing reason; False when the
    store takes no DeleteObjects (nothing was deleted)."""
    for attempt in range(_ATTEMPTS):
        try:
            # S3 answers 200 with the keys it kept (Quiet: only those); a key never there counts as deleted
            answer = fs.call_s3(
                "delete_objects",
                Bucket=bucket,
                Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
            )
        except OSError as err:
            if _code(err) in _NO_BULK:
                return False
            raise
        kept = [entry for entry in answer.get("Errors") or [] if entry.get("Code") != "NoSuchKey"]
        if not kept or any(entry.get("Code") not in _TRANSIENT for entry in kept):
            break
        keys = [entry["Key"] for entry in kept]
        if attempt < _ATTEMPTS - 1:
            time.sleep(0.5 * 2**attempt)
    if kept:
        first = kept[0]
        denied = all(entry.get("Code") == "AccessDenied" for entry in kept)
        raise (PermissionError if denied else OSError)(
            f"the store kept {len(kept)} of the files it was asked to delete, e.g. "
            f"s3://{bucket}/{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}. They stay "
            "as they are: let these credentials delete in this output (s3:DeleteObject)"
        )
    return True


def _code(err: OSError) -> str | None:
    """The S3 error code behind an s3fs error (s3fs keeps the server's message, the botocore error its
    code)."""
    return getattr(err.__cause__, "response", {}).get("Error", {}).get("Code")


def _delete_file(fs, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
