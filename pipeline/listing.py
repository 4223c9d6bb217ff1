"""A store's folder listed a page at a time, each page's entries made before the next is asked for.

fsspec's listings (`ls`, `find`) return every entry at once, each a dict with the store's dates and
classes, and keep them all in the filesystem's cache: ~1.2 KB of Python an object on S3. A folder of 10M
images listed by one Ray task was ~12 GB in that worker, and a resume's 1M chunk files ~2 GB in the
driver while it surveyed them. On S3 the pages come from ListObjectsV2 (1,000 keys each) and only the
fields the pipeline reads are kept; a local disk (or a shared mount) is read by `os.scandir`, each entry
made by fsspec's own `info` as its `ls` does; other stores are listed by fsspec, whole.

A folder too big for one listing task is cut by the first characters of its names (`cut`): a prefix
lists exactly the keys that start with it, and one-key requests find which prefixes have keys, walking
the names in S3's order (UTF-8 bytes); another order is noticed where it shows in an answer or in the
keys listed before the cut, not always.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import s3fs
from fsspec.implementations.local import LocalFileSystem

from dinat_batch.pipeline.locations import Location
from dinat_batch.pipeline.parallel import in_threads

logger = logging.getLogger(__name__)

PAGE_KEYS = 1000  # S3's most per ListObjectsV2 page
# The most links to folders an input's listing follows on one path (`through_link`): a link farm over
# datasets is one, a dataset's `latest -> v3` a second
FOLDER_LINKS = 4
# A cut finds at least this many prefixes where the names allow (a folder of hexadecimal names: 16 after
# one character), so that the tasks listing them run side by side rather than one cut after another.
CUT_FANOUT = 16
# The most stems a cut gives: past it, it keeps the round before. A place in the names with more
# characters than this (a large alphabet) is not cut at all, rather than walked a request per character.
CUT_MOST = 1024
# Sorts after any character of a name (U+10FFFF, the last one), so that the first name past
# `StartAfter=prefix + c + _LAST` is past those starting `prefix + c`. A folder with a name that holds it
# right there is not cut.
_LAST = "\U0010ffff"


def pages(
    fs, path: str, recursive: bool, stem: str = "", links_of: str | None = None
) -> Iterator[list[dict[str, Any]]]:
    """The entries under folder `path` (without the protocol), a page at a time, in fsspec's shape:
    `name`, `type` (`file` or `directory`), `size`, and what the store tells the content by (S3's `ETag`
    and `LastModified`). One level (subfolders as `directory` entries) or, `recursive`, every file below.
    A folder that does not exist has no entries; the folder itself is never among them (a folder without a
    name, of keys with `//`, is `path/`). A `stem` (S3 only, from `cut`) keeps the entries whose names in
    the folder start with it. A symbolic link on a disk is `other`; in an input's listing (`links_of`: the
    input folder's real path) what it points to (`through_link`)."""
    if stem and not isinstance(fs, s3fs.S3FileSystem):
        raise ValueError(f"only S3 folders are listed by stems; got {type(fs).__name__} and {stem!r}")
    if isinstance(fs, LocalFileSystem):
        yield from _local_pages(fs, fs._strip_protocol(path), recursive, links_of)
        return
    if not isinstance(fs, s3fs.S3FileSystem):
        try:
            listed = fs.find(path, detail=True).values() if recursive else fs.ls(path, detail=True)
        except FileNotFoundError:
            return
        yield [entry for entry in listed if entry["name"].rstrip("/") != path.rstrip("/")]
        return
    bucket, folder = _folder_prefix(fs, path)
    prefix = folder + stem
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
        entries += [_object(bucket, found) for found in page.get("Contents", []) if found["Key"] != folder]
        yield entries
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _local_pages(
    fs: LocalFileSystem, path: str, recursive: bool, links_of: str | None
) -> Iterator[list[dict[str, Any]]]:
    """`pages` of a folder on a disk: what fsspec's `ls` and `find` give (its `info` of each directory
    entry: a symbolic link is `other`, and is not followed), `PAGE_KEYS` at a time, a folder below listed
    after the one holding it; with `links_of`, a link as `through_link` makes it. A folder or entry
    removed since it was seen is left out, as by fsspec; a folder that cannot be read raises (fsspec's
    `find` left it out, and the images in it with it), unless hidden below (`.Trash-1000/`, `_tmp/`: never
    an input's or an output's)."""
    folders, page = [path], []
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        info = fs.info(entry)
                    except FileNotFoundError:
                        continue
                    if links_of is not None and info["islink"]:
                        info = through_link(fs, info, links_of)
                        if info is None:
                            continue
                    if recursive and info["type"] == "directory":
                        folders.append(info["name"])
                        continue
                    page.append(info)
                    if len(page) == PAGE_KEYS:
                        yield page
                        page = []
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            if not hidden(f"{folder}/x", path):
                raise
    if page:
        yield page


@dataclass(frozen=True)
class Cut:
    """A folder's entries whose names start with a stem, cut into longer stems: each entry is one of
    `exact` (the files named by a stem that was cut further), or below exactly one of `stems` (a stem
    ending in `/` is the folder of that name), all of them sorted."""

    exact: list[dict[str, Any]]
    stems: list[str]

    def covers(self, folder: str, names: Iterable[str]) -> bool:
        """Whether each of these keys (in `folder`, a folder's as `name/`) is one of `exact` or starts
        with one of `stems`. The stems start with no other stem, so the last one before a name is the
        only one it may start with."""
        exact = {entry["name"].split("/", 1)[1] for entry in self.exact}
        for name in names:
            rest = name[len(folder) :]
            below = bisect.bisect_right(self.stems, rest) - 1
            if name not in exact and not (below >= 0 and rest.startswith(self.stems[below])):
                return False
        return True


def cut(fs, path: str, stem: str, listed: Iterable[str]) -> Cut | None:
    """The entries of `pages(fs, path, ..., stem)` cut into at least `CUT_FANOUT` longer stems where the
    names allow, so that tasks can list them side by side; None where they cannot be cut: not S3, a
    folder without a name (keys with `//`), a store whose `StartAfter` does not follow S3's order (UTF-8
    bytes) in an answer, or whose stems miss one of the keys `listed` so far ("bucket/key", a folder's
    with a `/` at its end), or an error in a request (the folder is listed whole then, as before)."""
    if not isinstance(fs, s3fs.S3FileSystem):
        return None
    bucket, folder = _folder_prefix(fs, path)
    exact: list[dict[str, Any]] = []
    stems = [stem]
    try:
        while len(stems) < CUT_FANOUT:
            # a stem ending in `/` is a folder, cut no further, unless it is the one to cut
            parts = [part for part in stems if not part.endswith("/") or part == stem]
            if not parts:
                break
            asked = in_threads(lambda part: _beginnings(fs, bucket, folder, part), parts)
            if None in asked:
                return None
            longer = {part + c for part, (found, _) in zip(parts, asked, strict=True) for c in found}
            if stems != [stem] and len(stems) - len(parts) + len(longer) > CUT_MOST:
                break
            exact += [file for _, files in asked for file in files]
            stems = sorted({*stems} - {*parts} | longer)
    except OSError:
        return None
    found = Cut(sorted(exact, key=lambda entry: entry["name"]), stems)
    return found if found.covers(folder, (name.split("/", 1)[1] for name in listed)) else None


def _folder_prefix(fs, path: str) -> tuple[str, str]:
    """The bucket of `path`, and the prefix of its keys (the folder's own marker key)."""
    bucket, key, _ = fs.split_path(path)
    return bucket, f"{key.rstrip('/')}/" if key else ""


def _beginnings(fs, bucket: str, folder: str, part: str) -> tuple[set[str], list[dict[str, Any]]] | None:
    """The characters that follow `folder + part` in the names below it, and the file named by `part`
    itself if any; None as `cut` says. The walk is one request after another; the rest go beside it."""
    prefix = folder + part
    request = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", **fs.req_kw}
    # Stores sort a folder named by `part` in different places: S3 as `part/`, after `part!`; SeaweedFS as
    # `part`, before it. So `/` is asked apart, by its prefix, and the walk starts past `part`, which both
    # take as past the key and the folder of that name. (Not where `part` starts a folder's names, at its
    # own level or a folder below, where `/` would be a folder without a name, met by the walk on S3;
    # SeaweedFS folds `//` and answers a prefix ending in it with folders that are not there.)
    named_by_part = bool(part) and not part.endswith("/")
    jobs = [lambda: _walk(fs, request | {"MaxKeys": 1}, prefix, named_by_part)]
    if named_by_part:
        jobs.append(lambda: _named(fs, request))
        jobs.append(lambda: {"/"} if _first(fs, request | {"Prefix": prefix + "/", "MaxKeys": 1}) else set())
    walked, *named = in_threads(lambda job: job(), jobs)
    if walked is None:
        return None
    return (walked | named[1], named[0]) if named else (walked, [])


def _walk(fs, request: dict[str, Any], prefix: str, named_by_part: bool) -> set[str] | None:
    """The characters after `prefix` in the names past it: a request of one key each, the first key past
    the names that start with the last character found. A `/` right after a prefix that ends a folder's
    path (not `named_by_part`) is a folder without a name: None, as for another order than S3's."""
    found: set[str] = set()
    after = prefix
    for _ in range(CUT_MOST + 1):  # each finds a character or ends the walk
        first = _first(fs, request | {"StartAfter": after})
        if first is None:
            return found
        if first <= after:  # not S3's order
            return None
        character = first[len(prefix)]
        if character == "/" and not named_by_part:
            return None
        if after != prefix and character == after[len(prefix)]:  # a name holding `_LAST` right after it
            return None
        found.add(character)
        after = prefix + character + _LAST
    return None


def _first(fs, request: dict[str, Any]) -> str | None:
    """The first key or folder (`prefix/`) that a ListObjectsV2 request answers, if any."""
    page = fs.call_s3("list_objects_v2", **request)
    names = [found["Key"] for found in page.get("Contents", [])]
    names += [found["Prefix"] for found in page.get("CommonPrefixes", [])]
    return min(names, default=None)


def _named(fs, request: dict[str, Any]) -> list[dict[str, Any]]:
    """The file named by the request's prefix itself ([] if none). Asked by a listing of two entries: the
    key and the folder of that name come first, in whichever order."""
    page = fs.call_s3("list_objects_v2", **request, MaxKeys=2)
    return [
        _object(request["Bucket"], found)
        for found in page.get("Contents", [])
        if found["Key"] == request["Prefix"]
    ]


def through_link(fs: LocalFileSystem, link: dict[str, Any], root: str) -> dict[str, Any] | None:
    """The entry of what a symbolic link in the input folder `root` (its real path) points to, under the
    link's own name, as `find -L`, PIL and torchvision's ImageFolder take it: a file's size, and as its
    version its modification time and inode (a link pointed at another file is a changed input); a folder
    to be listed below the link's name. A link that cannot be followed (to nothing, as git-annex leaves a
    file not fetched; or to what this process may not read) stays a file of its own size, whose read
    fails: an error row naming it. None for a link removed since it was seen, and for a link to a folder
    that is not followed: one in `root` but for its hidden folders (its files are listed by their own
    names: links between the input's folders would list them again and again), one to a folder holding a
    folder on the link's path or being one, and one below `FOLDER_LINKS` others, logged (folders outside
    linking to each other would be listed along every path through them: ten, millions of times)."""
    try:
        target = fs.info(link["name"])
    except OSError:
        try:
            return link | {"type": "file", "size": os.lstat(link["name"]).st_size}
        except OSError:
            return None
    if target["type"] == "directory":
        real, input_folder = Location("file", os.path.realpath(link["name"])), Location("file", root)
        # each folder on the link's path, at its real place: a walk reaches the link only through them
        above = [(folder, Location("file", os.path.realpath(folder))) for folder in _above(link["name"])]
        if input_folder.covers(real) and not hidden(f"{real.path}/x", root):
            return None  # listed by its own name
        if any(real.covers(place) for _, place in above):
            return None  # following it would come to the link again, and list below it without end
        links = sum(os.path.islink(folder) for folder, place in above if not place.covers(input_folder))
        if links >= FOLDER_LINKS:
            logger.warning(
                "%s: a symbolic link to a folder below %d others is not followed; give the folder it "
                "points to (%s) as an input of its own to read it",
                link["name"],
                FOLDER_LINKS,
                real.path,
            )
            return None
    return target | {"mtime": f"{target['mtime']}:{target['ino']}"}


def _above(path: str) -> Iterator[str]:
    """The folders holding `path`, nearest first."""
    while (folder := os.path.dirname(path)) != path:
        yield folder
        path = folder


def hidden(path: str, root: str) -> bool:
    """In a folder below `root` whose name starts with `_` or `.` (_staging/, _runs/, .git/: bookkeeping,
    as Hive and Spark treat them; and `.` or `..` themselves, names on an object store, which a path
    library would fold away). Files are never hidden by their own name: `_cat.jpg` is an image."""
    below = root.rstrip("/") + "/"
    folders = path[len(below) :].split("/")[:-1] if path.startswith(below) else []
    return any(name.startswith(("_", ".")) for name in folders)


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
