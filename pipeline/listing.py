"""A store's folder listed a page at a time, each page's entries made before the next is asked for.

fsspec's listings (`ls`, `find`) return every entry at once, each a dict with the store's dates and
classes, and keep them all in the filesystem's cache: ~1.2 KB of Python an object on S3. A folder of 10M
images listed by one Ray task was ~12 GB in that worker, and a resume's 1M chunk files ~2 GB in the
driver while it surveyed them. On S3 the pages come from ListObjectsV2 (1,000 keys each) and only the fields the pipeline
reads are kept; other stores are listed by fsspec, whole, as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import s3fs

PAGE_KEYS = 1000  # S3's most per ListObjectsV2 page


def pages(fs, path: str, recursive: bool) -> Iterator[list[dict[str, Any]]]:
    """The entries under folder `path` (without the protocol), a page at a time, in fsspec's shape:
    `name`, `type` (`file` or `directory`), `size`, and what the store tells the content by (S3's `ETag`
    and `LastModified`). One level (subfolders as `directory` entries) or, `recursive`, every file below.
    A folder that does not exist has no entries; the folder itself is never among them (a folder without a
    name, of keys with `//`, is `path/`)."""
    if not isinstance(fs, s3fs.S3FileSystem):
        try:
            listed = fs.find(path, detail=True).values() if recursive else fs.ls(path, detail=True)
        except FileNotFoundError:
            return
        yield [entry for entry in listed if entry["name"].rstrip("/") != path.rstrip("/")]
        return
    bucket, key, _ = fs.split_path(path)
    prefix = f"{key.rstrip('/')}/" if key else ""
    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE_KEYS, **fs.req_kw}
    if not recursive:
        request["Delimiter"] = "/"
    while True:
        try:
            page = fs.call_s3("list_objects_v2", **request)
        except FileNotFoundError:  # no such bucket: as fsspec's listing of a missing folder
            if "ContinuationToken" in request:
                raise
            return
        entries = [_folder(bucket, found["Prefix"]) for found in page.get("CommonPrefixes", [])]
        entries += [_object(bucket, found) for found in page.get("Contents", []) if found["Key"] != prefix]
        yield entries
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def unnamed(name: str, path: str) -> bool:
    """Whether the entry `name` of `pages(fs, path, ...)` is the folder without a name there (keys with
    `//`): it is `path/`, a path that fsspec reads as `path` itself, so it cannot be listed by its name."""
    return name.rstrip("/") == path.rstrip("/")


def _folder(bucket: str, prefix: str) -> dict[str, Any]:
    # one `/` off, as s3fs does: a folder without a name (keys with `//`) is `folder/`, not the folder
    return {"name": f"{bucket}/{prefix.removesuffix('/')}", "type": "directory", "size": 0}


def _object(bucket: str, found: dict[str, Any]) -> dict[str, Any]:
    if found["Key"].endswith("/"):  # a folder's marker object, as consoles create them
        return _folder(bucket, found["Key"])
    return {
        "name": f"{bucket}/{found['Key']}",
        "type": "file",
        "size": found["Size"],
        "ETag": found.get("ETag"),
        "LastModified": found.get("LastModified"),
    }
