"""Where a URI points, as one canonical form, so that two spellings of one place compare equal.

`file:///data/x/`, `/data/x`, `./x` (run from /data) and `/data/y/../x` are one location; so are
`s3://b/k`, `s3a://b/k/` and `s3n://b//k`. Comparing these forms, not strings, is what lets the
pipeline refuse an output that overlaps its input however either is written, and refuse table URIs that
point outside the places a job may read. What is checked is what is opened: every URI the pipeline reads
or writes is opened through `filesystem`, which takes it as one name, as `resolve` does.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import fsspec
import yarl
from fsspec.implementations.local import LocalFileSystem

GLOB_CHARS = "*?["
# spellings of one protocol; the canonical one is what fsspec registers
_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "local": "file", "abfss": "abfs", "az": "abfs"}
_WEB = ("http", "https")
# a URI scheme (RFC 3986) of two letters or more: `C://x` is a Windows drive, as fsspec reads it
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+")


def split_protocol(uri: str) -> tuple[str | None, str]:
    """The protocol a URI starts with (`s3` of `s3://b/k`) and the rest, or None and the whole for a plain
    path. Only the first `://` counts: keys may hold URLs (`s3://b/crawl/https://host/a.jpg`)."""
    head, separator, rest = uri.partition("://")
    return (head, rest) if separator and _SCHEME.fullmatch(head) else (None, uri)


_PROTOCOLS = frozenset(fsspec.available_protocols()) | _ALIASES.keys()


def canonical_protocol(protocol: str) -> str:
    """The protocol fsspec registers for a spelling of it (`s3` for `S3A`)."""
    return _ALIASES.get(protocol.lower(), protocol.lower())


def protocol_entry(name: str, value: Any) -> bool:
    """Whether `storage_options[name]` holds the options of one protocol (`{"https": {"headers": ...}}`)
    rather than an option."""
    return isinstance(value, dict) and name.lower() in _PROTOCOLS


def options_for(uri: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """The fsspec options to open `uri` with: the entry of its protocol in `storage_options` when there is
    one (an alias counts as its protocol: `s3` serves `s3a://`), else the options outside such entries.
    Web URLs never get those: an object store's client settings break aiohttp's session (a table on a
    custom S3 endpoint listing https URLs failed every row), and its credentials are not for other hosts.
    A chained model URI (`simplecache::s3://...`) gets them all: fsspec gives each link its own entry."""
    scheme = split_protocol(uri)[0]
    if scheme is None and "::" in uri:
        return storage_options
    protocol = canonical_protocol(scheme or "file")
    shared = {}
    for name, value in storage_options.items():
        if not protocol_entry(name, value):
            shared[name] = value
        elif canonical_protocol(name) == protocol:
            return value
    return {} if protocol in _WEB else shared


def filesystem(
    uri: str, storage_options: dict[str, Any], redirects: bool = False
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of `uri`, taken as one name. fsspec's own `url_to_fs` and `open` split a URI
    at `::` to chain filesystems: `s3://b/a::b/x.jpg` would open `b/a`, and a table's cell
    `s3://other/k.jpg::/../../allowed/x.jpg`, which `resolve` places under `allowed/`, would open
    `other/k.jpg`. `storage_options`: the run's, of which it takes what `options_for` gives `uri`."""
    protocol = split_protocol(uri)[0] or "file"
    kind = fsspec.get_filesystem_class(protocol)
    options = {**kind._get_kwargs_from_urls(uri), **options_for(uri, storage_options)}
    if protocol.lower() in _WEB and not redirects:
        # a redirect would take the read past the place `inside` checked (an allowed host's open
        # redirect to the cloud's instance credentials): refused (`redirects` for URLs no list limits)
        client = {**(options.get("client_kwargs") or {}), "raise_for_status": _no_redirect}
        options = {**options, "allow_redirects": False, "client_kwargs": client}
    return fsspec.filesystem(protocol, **options), kind._strip_protocol(uri)


class Redirected(OSError):
    """A web server answered with a redirect, which reads do not follow."""


async def _no_redirect(response) -> None:
    if 300 <= response.status < 400:
        raise Redirected("the server redirects elsewhere; not followed")


def redirected(err: BaseException) -> bool:
    """Whether a read failed on a refused redirect (fsspec raises FileNotFoundError from it when it was
    asking for the size)."""
    return isinstance(err, Redirected) or isinstance(err.__cause__, Redirected)


def glob_prefix(pattern: str) -> str:
    """The part of a path or glob before its first wildcard (all of it when it has none)."""
    for wildcard in GLOB_CHARS:
        pattern = pattern.split(wildcard)[0]
    return pattern


@dataclass(frozen=True)
class Location:
    """A protocol and a normalised path: `bucket/key` on object stores, an absolute real path locally.

    `partial` is set for the fixed prefix of a glob that ends inside a name (`s3://b/img*`): it covers
    every name that starts with it, not only what lies below it as a folder."""

    protocol: str
    path: str
    partial: bool = False

    def covers(self, other: Location) -> bool:
        """Whether `other` is this location or lies inside it."""
        if self.protocol != other.protocol:
            return False
        if self.partial:
            return other.path.startswith(self.path)
        return other.path == self.path or other.path.startswith(self.path.rstrip("/") + "/")

    def overlaps(self, other: Location) -> bool:
        return self.covers(other) or other.covers(self)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"


def resolve(uri: str, pattern: bool = True) -> Location:
    """The canonical location of a URI, a local path or the fixed prefix of a glob. `pattern=False` for the
    URI of one object (a table's cell, a row's key): taken whole, as it will be opened, wildcards and spaces
    included, so that `/in/[x]/../../etc` is not checked as `/in/`."""
    text = uri.strip() if pattern else uri
    scheme, rest = split_protocol(text)
    protocol = canonical_protocol(scheme or "file")
    if protocol == "file":
        # the path fsspec opens (`file:/x`, `local:/x`, `~`, relative paths: `filesystem`), made whole
        # before the glob's prefix is cut (`*.jpg` is the working folder's, not a name beside it)
        rest = LocalFileSystem._strip_protocol(text)
    prefix = glob_prefix(rest) if pattern else rest
    partial = prefix != rest and not prefix.endswith("/")
    if protocol == "file":
        # realpath: `..`, `.` and symlinked folders all end at the same absolute path
        if partial:
            path = os.path.join(os.path.realpath(os.path.dirname(prefix)), os.path.basename(prefix))
        else:
            path = os.path.realpath(prefix)
        return Location(protocol, path, partial)
    sent = _sent(f"{protocol}://{prefix}") if protocol in _WEB else None
    if sent is not None and sent.raw_host is not None:
        prefix = sent.host_port_subcomponent + sent.raw_path
    return Location(protocol, posixpath.normpath("/" + prefix).lstrip("/"), partial)


def _sent(url: str) -> yarl.URL | None:
    """A web URL as fsspec's HTTP filesystem sends it (yarl: the host lowercased, its default port,
    userinfo, query and fragment no part of where it goes, `%2e%2e` decoded into a step up and taken), or
    None where it cannot be sent."""
    try:
        return yarl.URL(url, encoded=False)
    except ValueError:
        return None


def inside(places: Iterable[Location], uri: str) -> bool:
    """Whether the one object `uri` (a table's cell, a row's key) lies in one of `places` as it will be
    opened: whole, wildcards and spaces included, so that `/in/[x]/../../etc` is not checked as `/in/`.
    Elsewhere than on a disk, a path with an empty, `.` or `..` name lies nowhere: stores and their HTTP
    clients read them differently (kept in the key, folded, refused, or taken as a step up, over the
    bucket's name too). A web URL is checked as its client sends it (yarl, under fsspec's HTTP
    filesystem: `%2e%2e` decoded into a step up and taken), with no name that decodes into a `/`."""
    try:
        where = resolve(uri, pattern=False)
    except ValueError:  # a NUL byte in a local path (realpath refuses it): nothing is opened there
        return False
    if where.protocol in _WEB:
        sent = _sent(uri)
        if sent is None or sent.raw_host is None:
            return False
        names = [unquote(name) for name in sent.raw_path.split("/")[1:]]
        if any(name in ("", ".", "..") or "/" in name or "\\" in name for name in names):
            return False
    elif where.protocol != "file" and {"", ".", ".."} & set(split_protocol(uri)[1].split("/")):
        return False
    return any(place.covers(where) for place in places)
