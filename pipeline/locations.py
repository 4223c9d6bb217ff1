"""Where a URI points, as one canonical form, so that two spellings of one place compare equal.

`file:///data/x/`, `/data/x`, `./x` (run from /data) and `/data/y/../x` are one location; so are
`s3://b/k`, `s3a://b/k/` and `s3n://b//k`. Comparing these forms, not strings, is what lets the
pipeline refuse an output that overlaps its input however either is written, and refuse table URIs that
point outside the places a job may read.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

GLOB_CHARS = "*?["
# spellings of one protocol; the canonical one is what fsspec registers
_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "local": "file", "abfss": "abfs", "az": "abfs"}


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
    if text.startswith("file:") and not text.startswith("file://"):  # file:/x, as some writers spell it
        text = "file://" + text.removeprefix("file:")
    prefix = glob_prefix(text) if pattern else text
    partial = prefix != text and not prefix.endswith("/")
    protocol, _, rest = prefix.rpartition("://")
    protocol = _ALIASES.get(protocol.lower(), protocol.lower()) or "file"
    if protocol == "file":
        # realpath: `..`, `.`, relative paths and symlinked folders all end at the same absolute path
        rest = os.path.expanduser(rest)
        if partial:
            path = os.path.join(os.path.realpath(os.path.dirname(rest) or "."), os.path.basename(rest))
        else:
            path = os.path.realpath(rest or ".")
    else:
        path = posixpath.normpath("/" + rest).lstrip("/")
    return Location(protocol, path, partial)
