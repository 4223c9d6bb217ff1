"""The reading stage: inputs -> a Ray dataset of `(key, data, error)` rows, one per input image, never fewer.

Three input kinds, any fsspec URI (s3://, local paths, ...):
- image files under a prefix or matching a glob;
- WebDataset `.tar` shards (one row per image member, keyed `shard_uri#sample_key`);
- Parquet tables with a column of image bytes (keyed `table_uri#row_index`) or of image URIs.

A source that cannot be read becomes a row with `error` set instead of failing the run. Listing walks the
top-level folders of a prefix in parallel Ray tasks rather than one object at a time on the driver.
"""

from __future__ import annotations

import math
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from fsspec.implementations.local import LocalFileSystem

from dinat_batch.pipeline.config import IMAGE_EXTENSIONS, ConfigError, RunConfig
from dinat_batch.pipeline.errors import error_text, read_error
from dinat_batch.pipeline.listing import Cut, cut, hidden, pages, through_link, unnamed
from dinat_batch.pipeline.locations import (
    GLOB_CHARS,
    Location,
    filesystem,
    glob_prefix,
    inside,
    redirected,
    resolve,
    split_protocol,
)
from dinat_batch.pipeline.objects import read_object
from dinat_batch.pipeline.output import VerificationFailed, record_source
from dinat_batch.pipeline.selection import ROWS_PER_PARTITION, attach, each_group, without
from dinat_batch.pipeline.stages import CPU_TASK, Stage

ROWS = pa.schema([("key", pa.string()), ("data", pa.binary()), ("error", pa.string())])
LOCATED = pa.schema(
    [("key", pa.string()), ("uri", pa.string()), ("error", pa.string()), ("size", pa.int64())]
)
LISTING = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("version", pa.string())])
# A level of fewer folders is listed one level deeper (an input of one `2024/` folder is not one task's
# listing); the folders of a level with more go to at most four times as many tasks (a task and a block
# per folder were 100k of each for a tree of 100k folders). Four: folders differ in size, and a CPU whose
# task ended early starts one of the others.
LISTING_TASKS = 64
# The most folder names a level hands the driver (~100 bytes each: 100 MB), each of its N folders at most
# 1/N of them; a folder with more is listed whole by its task, not a level at a time: with a folder per
# image (`2024/ID/image.jpg`) the names would be per-image state in the driver.
FOLDERS_PER_LEVEL = 1_000_000
# A listing task that has listed more entries of one span stops and cuts it (`Span`): a flat folder
# of 100M images is 100k requests, hours for one task. What it listed is listed again by the parts: ~15 s
# at S3's pace (~7k keys a second), against a part's share of the folder.
SPAN_ENTRIES = 100_000
_KIND_EXTENSIONS = {"files": IMAGE_EXTENSIONS, "webdataset": (".tar",), "parquet": (".parquet",)}
# a container's row key, `SHARD#sample` or `TABLE#row`: the container ends at the first `#` after its
# extension, so that a `#` in its own URI stays in it
_CONTAINER_KEY = re.compile(
    "^(.*?(?:{}))#".format(
        "|".join(re.escape(e) for k in ("webdataset", "parquet") for e in _KIND_EXTENSIONS[k])
    ),
    re.IGNORECASE,
)
DONE = "done"  # a listing column: the keys of a container that earlier attempts finished
UNREADABLE = "<unreadable"  # the key of a shard's error row: `SHARD#<unreadable from its start>`, ...
_ROWS_PER_BLOCK = 1024  # rows emitted at a time while expanding shards and tables
# The most images one read task takes from a listing of files. Fewer, larger tasks are fewer for the
# split (`split`) to emit and for the driver to start.
MAX_IMAGES_PER_TASK = 1024
# See `split`. 32 blocks of at most MAX_IMAGES_PER_TASK listing rows (~100 bytes each): ~3 MB per task.
SPLIT_AHEAD_BLOCKS = 32
# read tasks fuse with the decode tasks after them, which needs the same resources
STAGE = Stage("read", consumes=tuple(LISTING.names), produces=tuple(ROWS.names), resources=CPU_TASK)


def _rows(keys: list[str], data: list[bytes | None], errors: list[str | None]) -> pa.Table:
    return pa.table(
        [pa.array(keys, pa.string()), pa.array(data, pa.binary()), pa.array(errors, pa.string())], schema=ROWS
    )


def container_of(key: str) -> str:
    """The shard or table whose row `key` is (see `_CONTAINER_KEY`)."""
    found = _CONTAINER_KEY.match(key)
    return found.group(1) if found else key.split("#", 1)[0]


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Spelling:
    """How to turn fsspec's protocol-less paths back into the URIs users gave (s3://b/k, or a plain path)."""

    protocol: str | None

    @classmethod
    def of(cls, uri: str) -> Spelling:
        return cls(split_protocol(uri)[0])

    def uri(self, path: str) -> str:
        return f"{self.protocol}://{path}" if self.protocol else path


def _version(info: dict[str, Any]) -> str:
    """What changes when the object's content changes: the ETag on object stores, else the mtime."""
    for field in ("ETag", "etag", "md5Hash", "LastModified", "mtime", "last_modified", "created"):
        if info.get(field) is not None:
            return str(info[field]).strip('"')
    return ""


def _listing(infos: list[dict[str, Any]], where: Spelling, root: str) -> pa.Table:
    infos = [i for i in infos if i.get("type", "file") == "file" and not hidden(i["name"], root)]
    return pa.table(
        {
            "uri": [where.uri(i["name"]) for i in infos],
            "size": [int(i.get("size") or 0) for i in infos],
            "version": [_version(i) for i in infos],
        },
        schema=LISTING,
    )


def _fresh(uri: str, storage_options: dict[str, Any]):
    """The filesystem and path of `uri`, without listings cached by an earlier run in this (reused)
    worker process."""
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache()
    return fs, path


@dataclass(frozen=True)
class Span:
    """What a listing task is given: the entries of folder `uri` whose names there start with `stem` (all
    of them: ""). A folder too big for one task is cut into spans of longer stems (`listing.cut`). `root`:
    on a disk, the real path of the input folder the span is part of, whose symbolic links are followed
    (`listing.through_link`)."""

    uri: str
    stem: str = ""
    root: str | None = None


class _Parts(NamedTuple):
    """What a cut span is listed as: the files its cut names exactly, and the spans to list instead."""

    files: pa.Table
    spans: list[Span]


class _Paged:
    """The pages of a span, until it has more than `wide` entries and can be cut (`listing.cut`): then
    `parts` says what to list instead, and what was listed of it is to be dropped. One level at a time,
    a cut's folders are folders of the next level; below, spans of the same folder, whose stems are never
    made back into URIs (s3fs would read `?versionId=` in a name as a version)."""

    def __init__(self, span: Span, storage_options: dict[str, Any], recursive: bool, wide: int):
        self.span, self.recursive, self.wide = span, recursive, wide
        self.fs, self.path = _fresh(span.uri, storage_options)
        self.where = Spelling.of(span.uri)
        self.parts: _Parts | None = None

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        names: list[str] | None = []  # what a cut must cover, until it is tried
        for page in pages(self.fs, self.path, self.recursive, self.span.stem, self.span.root):
            yield page
            if names is None:
                continue
            names += [e["name"] + ("/" if e["type"] == "directory" else "") for e in page]
            if len(names) > self.wide:
                parts = cut(self.fs, self.path, self.span.stem, names)
                if parts is not None:
                    self.parts = self._spans(parts)
                    return
                names = None

    def _spans(self, parts: Cut) -> _Parts:
        root = self.path.rstrip("/")
        stems = [stem for stem in parts.stems if not hidden(f"{root}/{stem}x", self.path)]
        if self.recursive:
            spans = [replace(self.span, stem=stem) for stem in stems]
        else:
            spans = [
                replace(self.span, uri=self.where.uri(f"{root}/{stem[:-1]}"), stem="")
                if stem.endswith("/")
                else replace(self.span, stem=stem)
                for stem in stems
            ]
        return _Parts(_listing(parts.exact, self.where, self.path), spans)


def _below(spans: list[Span], storage_options: dict[str, Any], wide: int) -> tuple[pa.Table, list[Span]]:
    """Every file below each of these spans, listed page by page; and the spans still to list, where a
    span had more than `wide` entries and was cut (what had been listed of it is not kept)."""
    tables, more = [], []
    for span in spans:
        paged = _Paged(span, storage_options, recursive=True, wide=wide)
        listed = [_listing(page, paged.where, paged.path) for page in paged]
        if paged.parts is not None:
            listed, more = [paged.parts.files], more + paged.parts.spans
        tables += listed
    return pa.concat_tables(tables or [LISTING.empty_table()]).combine_chunks(), more


# Listing tasks return their rows as one block, not a stream of blocks: Ray replays a generator whose
# worker died from its start and keeps the blocks already handed on, so a folder written to meanwhile
# would shift rows across blocks, a key listed twice or not at all. A retried task lists its spans anew;
# one that Ray runs again to rebuild a lost block may cut where the first did not (the folder grew), and
# give other rows: a run refuses a listing whose rows differ from those first read (`choose_kind`, and
# `run.execute` for the stages); a nightly selection made from a rebuilt block goes unseen.
_find = ray.remote(num_cpus=0.25, num_returns=2)(_below)


@ray.remote(num_cpus=0.25)
def _glob(uri: str, storage_options: dict[str, Any]) -> pa.Table:
    fs, path = _fresh(uri, storage_options)
    matched, root = fs.glob(path, detail=True).values(), _glob_root(path)
    if isinstance(fs, LocalFileSystem):  # a glob enters no linked folder (fsspec's): a link to a file is one
        real = os.path.realpath(root)
        matched = [through_link(fs, info, real) if info["islink"] else info for info in matched]
    return _listing([info for info in matched if info is not None], Spelling.of(uri), root)


@ray.remote(num_cpus=0.25, num_returns=2)
def _top(
    span: Span, storage_options: dict[str, Any], most: int, wide: int
) -> tuple[pa.Table, tuple[list[Span], list[Span]]]:
    """The files directly in a span of a folder, and the spans of the next level (its folders, or where
    it had more than `wide` entries, the parts it was cut into) and those to list whole. A span holding
    more than `most` folders, or one without a name (keys with `//`, which no path names apart from this
    one), is listed whole (by `_below`), not a level at a time."""
    paged = _Paged(span, storage_options, recursive=False, wide=wide)
    tables, folders = [], []
    for page in paged:
        tables.append(_listing(page, paged.where, paged.path))
        found = [
            i["name"] for i in page if i["type"] == "directory" and not hidden(f"{i['name']}/x", paged.path)
        ]
        folders += found
        if len(folders) > most or any(unnamed(folder, paged.path) for folder in found):
            return LISTING.empty_table(), ([], [span])
    if paged.parts is not None:
        return paged.parts.files, (paged.parts.spans, [])
    files = pa.concat_tables(tables or [LISTING.empty_table()])  # an empty folder on a disk has no page
    return files.combine_chunks(), ([replace(span, uri=paged.where.uri(f), stem="") for f in folders], [])


def _glob_root(pattern: str) -> str:
    """The folder a glob pattern starts from."""
    return glob_prefix(pattern).rsplit("/", 1)[0]


def list_objects(uri: str, storage_options: dict[str, Any]) -> ray.data.MaterializedDataset:
    """Every object under a prefix, matching a glob, or the one file named: `uri`, `size`, `version`.
    Listed in Ray tasks, page by page; the rows stay in Ray's object store. A prefix is listed a level at
    a time, a task for each folder, until a level has `LISTING_TASKS` folders or more; those are shared
    among at most four times as many tasks, each listing every file below its folders. A folder of more
    than `SPAN_ENTRIES` entries is cut by the first characters of its names, for tasks side by side."""
    fs, path = _fresh(uri, storage_options)
    if any(c in path for c in GLOB_CHARS):
        return ray.data.from_arrow_refs([_glob.remote(uri, storage_options)])
    if fs.isfile(path):
        return ray.data.from_arrow(_listing([fs.info(path)], Spelling.of(uri), path))
    if not fs.isdir(path):
        raise ConfigError(f"input {uri!r} does not exist (no object or prefix of that name); check the URI")
    blocks: list[ray.ObjectRef] = []
    level, whole = [Span(uri, root=os.path.realpath(path) if isinstance(fs, LocalFileSystem) else None)], []
    while level and len(level) < LISTING_TASKS:
        most = FOLDERS_PER_LEVEL // len(level)
        listed = [_top.remote(span, storage_options, most, SPAN_ENTRIES) for span in level]
        blocks += [files for files, _ in listed]
        level = []
        for deeper, below in ray.get([rest for _, rest in listed]):
            level, whole = level + deeper, whole + below
    # At most four tasks per wanted one at a time, each given a share of the spans waiting: a cut span's
    # parts start as soon as its task ends, not after the slowest of the others, and the driver waits on
    # a bounded list however many spans a big folder is cut into.
    queue, waiting = whole + level, []
    while queue or waiting:
        tasks = min(len(queue), 4 * LISTING_TASKS)
        groups = [queue[i::tasks] for i in range(tasks)]
        free = 4 * LISTING_TASKS - len(waiting)
        for group in groups[:free]:
            files, more = _find.remote(group, storage_options, SPAN_ENTRIES)
            blocks.append(files)
            waiting.append(more)
        queue = [span for group in groups[free:] for span in group]
        ray.wait(waiting, num_returns=1)
        done, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0)
        queue += [span for spans in ray.get(done) for span in spans]
    return ray.data.from_arrow_refs(blocks)


def _has_extension(uris: pa.ChunkedArray, ext: tuple[str, ...]) -> pa.ChunkedArray:
    names = pc.utf8_lower(uris)
    keep = pc.ends_with(names, ext[0])
    for e in ext[1:]:
        keep = pc.or_(keep, pc.ends_with(names, e))
    return keep


def _kind_counts(batch: pa.Table) -> pa.Table:
    uris = batch.column("uri")
    counts = {
        kind: [pc.sum(_has_extension(uris, ext)).as_py() or 0] for kind, ext in _KIND_EXTENSIONS.items()
    }
    return pa.table({"objects": [batch.num_rows], **counts})


def _of_kind(batch: pa.Table, ext: tuple[str, ...]) -> pa.Table:
    return batch.filter(_has_extension(batch.column("uri"), ext))


def choose_kind(config: RunConfig, listing: ray.data.Dataset) -> tuple[str, ray.data.MaterializedDataset]:
    """The input kind (configured, or guessed from the extensions found) and the listing rows it reads."""
    # tasks of at least a hash partition's rows (Ray Data bundles whole blocks, splitting none): the driver
    # keeps memory for each block an execution is given (benchmarks/RESULTS.md), and a listing has a block
    # per folder
    tasks = {"batch_format": "pyarrow", "batch_size": ROWS_PER_PARTITION, **STAGE.resources}
    counts = Counter[str]()
    for row in listing.map_batches(_kind_counts, **tasks).take_all():
        counts.update(row)
    unchanged(counts["objects"], listing.count(), "objects", "nothing was written")
    kind = config.input_format
    if kind == "auto":
        kind = next((k for k in _KIND_EXTENSIONS if counts[k]), None)
        if kind is None:
            raise ConfigError(
                f"found {counts['objects']} objects under {config.input!r} and none is an image "
                f"({', '.join(IMAGE_EXTENSIONS)}), a .tar shard or a .parquet table; check --input"
            )
    ext = _KIND_EXTENSIONS[kind]
    if counts[kind] == 0:
        raise ConfigError(
            f"input_format is {kind!r} but no {'/'.join(ext)} objects are under {config.input!r}"
        )
    chosen = listing.map_batches(_of_kind, fn_kwargs={"ext": ext}, **tasks).materialize()
    unchanged(chosen.count(), counts[kind], f"{'/'.join(ext)} objects", "nothing was written")
    return kind, chosen


def unchanged(now: int, before: int, what: str, done: str) -> None:
    """Refuse a listing whose rows are not the ones counted before: Ray rebuilt a lost block of it by
    listing again (see `_below`), and the input had changed since (a listing task may then cut a folder
    it listed whole, and give none of its rows). `what`: what was counted; `done`: what the run did not
    do, for the message."""
    if now != before:
        raise VerificationFailed(
            f"the input's listing held {before} {what} and holds {now} now: Ray listed a part of it again "
            f"after a node was lost, and the input had changed; {done}; run the same command again"
        )


def _too_large(size: int, limit: int) -> str:
    return error_text("TooLarge", f"{size} bytes or more, above max_bytes_per_image ({limit}); not read")


@dataclass(frozen=True)
class ReadRules:
    """What a read task may fetch: at most `max_bytes` per object, and, for URIs taken from a table's
    cells, only under `allowed` (None: anywhere, for objects the input listing itself found)."""

    storage_options: dict[str, Any]
    max_bytes: int
    allowed: tuple[Location, ...] | None = None

    @classmethod
    def of(cls, config: RunConfig, from_table: bool = False) -> ReadRules:
        allowed = None
        if from_table:
            prefixes = config.allowed_uri_prefixes
            if prefixes is None:
                # default: the input's own scheme and bucket; nothing local, no other bucket, no web
                source = resolve(config.input)
                prefixes = (
                    [] if source.protocol == "file" else [f"{source.protocol}://{source.path.split('/')[0]}"]
                )
            allowed = tuple(resolve(prefix) for prefix in prefixes)
        return cls(config.storage_options, config.max_bytes_per_image, allowed)

    def refusal(self, uri: str) -> str | None:
        if self.allowed is None or inside(self.allowed, uri):
            return None
        where = ", ".join(str(place) for place in self.allowed) or "nowhere (local input)"
        return error_text(
            "ForbiddenURI",
            f"the table points outside the places it may read ({where}); list the location in "
            "allowed_uri_prefixes to read it",
        )


def _fetch(
    uri: str | None, error: str | None, size: int | None, rules: ReadRules
) -> tuple[bytes | None, str | None]:
    if error is not None:
        return None, error
    if uri is None:
        return None, error_text("MissingImage", "the row has no image URI (null)")
    refused = rules.refusal(uri)
    if refused is not None:
        return None, refused
    if size is not None and size > rules.max_bytes:
        return None, _too_large(size, rules.max_bytes)
    try:
        fs, path = filesystem(uri, rules.storage_options)
        # listed: its size is known and within the limit; else one byte past the limit tells "too large"
        # without reading the rest (/dev/zero ends)
        data = read_object(fs, path, size, None if size is not None else rules.max_bytes + 1)
    except Exception as err:  # any failure to read is this image's row, not the run's end
        if redirected(err):  # final, as a refusal: the same URL redirects the next time too
            return None, error_text(
                "ForbiddenURI", "the server redirects elsewhere, which may lie outside the places it may read"
            )
        return None, read_error(uri, err)
    if len(data) > rules.max_bytes:
        return None, _too_large(len(data), rules.max_bytes)
    return data, None


def read_objects(batch: pa.Table, rules: ReadRules, threads: int = 16) -> pa.Table:
    """`(key, uri, error, size)` rows -> `(key, data, error)`: fetched concurrently, each failure one
    error row."""
    uris = batch.column("uri").to_pylist()
    errors = batch.column("error").to_pylist()
    sizes = batch.column("size").to_pylist()
    with ThreadPoolExecutor(min(threads, max(1, len(uris)))) as pool:
        fetched = list(pool.map(lambda u, e, n: _fetch(u, e, n, rules), uris, errors, sizes))
    return _rows(batch.column("key").to_pylist(), [f[0] for f in fetched], [f[1] for f in fetched])


def read_listed(listing: pa.Table, rules: ReadRules) -> pa.Table:
    """Listed image files -> `(key, data, error)`, each keyed by its own URI."""
    uris = listing.column("uri")
    located = pa.table([uris, uris, pa.nulls(len(uris), pa.string()), listing.column("size")], schema=LOCATED)
    return read_objects(located, rules)


def _sample_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: `dir/0001.seg.png` is sample `dir/0001`, field `seg.png`."""
    folder, _, base = member_name.rpartition("/")
    stem, dot, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field if dot else ""


Row = tuple[str, bytes | None, str | None]
Member = tuple[str, bytes | None, str | None]  # field, data, error


def _sample_rows(shard: str, sample: str, members: list[Member]) -> Iterator[Row]:
    """One row per image member of a sample (keyed by the sample, or sample.field when it has several);
    one error row for a sample without any image."""
    images = [member for member in members if is_image_name("." + member[0])]
    if not images:
        fields = ", ".join(field or "(no extension)" for field, _, _ in members)
        yield (
            f"{shard}#{sample}",
            None,
            error_text("NoImage", f"the sample has no image member (fields: {fields})"),
        )
    for field, data, error in images:
        yield (f"{shard}#{sample}" if len(images) == 1 else f"{shard}#{sample}.{field}"), data, error


def _tar_rows(shard: str, rules: ReadRules) -> Iterator[Row]:
    """Rows of one shard in stream order. Member names are data, never paths: nothing is extracted to disk.
    A shard that breaks off gives rows for what was read and one error row for the rest. A sample name
    seen before in the shard (not next to its first members) is keyed `name~2`, `name~3`, ...: one key,
    one row."""
    sample, key, members, last = None, "", [], None
    seen: Counter[str] = Counter()
    fs, path = filesystem(shard, rules.storage_options)
    try:
        with (
            fs.open(path, "rb") as f,
            tarfile.open(fileobj=f, mode="r|") as tar,
        ):
            for member in tar:
                if not member.isfile():
                    continue
                name, field = _sample_key(member.name)
                if name != sample:
                    if members:
                        yield from _sample_rows(shard, key, members)
                        members = []
                    seen[name] += 1
                    key = name if seen[name] == 1 else f"{name}~{seen[name]}"
                sample = name
                if member.size > rules.max_bytes:  # the stream skips the member's data unread
                    members.append((field, None, _too_large(member.size, rules.max_bytes)))
                else:
                    members.append((field, tar.extractfile(member).read(), None))
                last = member.name
    except (tarfile.TarError, OSError, EOFError) as err:
        if members:
            yield from _sample_rows(shard, key, members)
        where = f"after member {last}" if last else "from its start"
        yield (
            f"{shard}#{UNREADABLE} {where}>",
            None,
            error_text("ShardError", f"the shard cannot be read {where}: {type(err).__name__}: {err}"),
        )
        return
    if members:
        yield from _sample_rows(shard, key, members)


def read_shards(batch: pa.Table, rules: ReadRules) -> Iterator[pa.Table]:
    for shard in batch.column("uri").to_pylist():
        yield from _chunked(_tar_rows(shard, rules))


def _chunked(rows: Iterator[Row]) -> Iterator[pa.Table]:
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == _ROWS_PER_BLOCK:
            yield _rows(*map(list, zip(*chunk, strict=True)))
            chunk = []
    if chunk:
        yield _rows(*map(list, zip(*chunk, strict=True)))


def _image_bytes(column: pa.Array, name: str) -> list[bytes | None]:
    if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
        # the Hugging Face datasets Image feature: struct<bytes: binary, path: string>
        column = pc.struct_field(column, "bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise ConfigError(
            f"column {name!r} has type {column.type}, not image bytes; for a column of URIs set uri_column"
        )
    return column.to_pylist()


def check_column(table_uri: str, names: list[str], config: RunConfig) -> None:
    column = config.uri_column or config.image_column
    if column not in names:
        setting = "uri_column" if config.uri_column else "image_column"
        raise ConfigError(f"{table_uri} has no column {column!r} (it has {', '.join(names)}); set {setting}")


def check_table(table_uri: str, config: RunConfig) -> None:
    """Fail before the run when the (first) table lacks the configured column."""
    fs, path = filesystem(table_uri, config.storage_options)
    check_column(table_uri, pq.read_schema(path, filesystem=fs).names, config)


def _cell_error(data: bytes | None, limit: int) -> str | None:
    if data is None:
        return error_text("MissingImage", "the cell is null")
    return _too_large(len(data), limit) if len(data) > limit else None


def _table_rows(table_uri: str, config: RunConfig) -> Iterator[pa.Table]:
    """A URI is keyed by itself the first time the table lists it, by its row after that (and when
    null), so that a table listing one image twice still gives one row per key."""
    column = config.uri_column or config.image_column
    fs, path = filesystem(table_uri, config.storage_options)
    seen: set[str] = set()
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        check_column(table_uri, parquet.schema_arrow.names, config)
        row = 0
        for part in parquet.iter_batches(batch_size=_ROWS_PER_BLOCK, columns=[column]):
            ids = [f"{table_uri}#{row + i}" for i in range(part.num_rows)]
            row += part.num_rows
            if config.uri_column:
                uris = part.column(0).cast(pa.string()).to_pylist()
                keys = []
                for uri, row_id in zip(uris, ids, strict=True):
                    keys.append(uri if uri is not None and uri not in seen else row_id)
                    seen.add(uri)
                yield pa.table(
                    [keys, uris, pa.nulls(len(keys), pa.string()), pa.nulls(len(keys), pa.int64())],
                    schema=LOCATED,
                )
            else:
                data = _image_bytes(part.column(0), column)
                errors = [_cell_error(d, config.max_bytes_per_image) for d in data]
                yield _rows(
                    ids, [d if e is None else None for d, e in zip(data, errors, strict=True)], errors
                )


def read_tables(batch: pa.Table, config: RunConfig) -> Iterator[pa.Table]:
    """Parquet files -> `(table#row, data)` rows for an image column, or `(uri, uri)` rows for a URI column
    (fetched by read_objects next). A table that cannot be read is one error row keyed by the table."""
    for table_uri in batch.column("uri").to_pylist():
        try:
            yield from _table_rows(table_uri, config)
        except Exception as err:
            message = str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
            error = error_text("TableError", f"the table cannot be read: {message}")
            schema = LOCATED if config.uri_column else ROWS
            yield pa.table(
                [[table_uri], pa.nulls(1, schema.field(1).type), [error]]
                + ([pa.nulls(1, pa.int64())] if config.uri_column else []),
                schema=schema,
            )


def _read_recorded(batch: pa.Table, read, fs, folder: str, **kwargs):
    """`read` (shards or tables) one container at a time, recording the keys each gave in `folder` (see
    `pipeline/output.py` (`record_source`)): the commit compares the rows written with them. A `done`
    column lists keys of a container that earlier attempts finished: their rows are not given again."""
    done = batch.column(DONE).to_pylist() if DONE in batch.column_names else [None] * batch.num_rows
    for i in range(batch.num_rows):
        keys: list[str] = []
        finished = set(done[i] or ())
        for rows in read(batch.slice(i, 1), **kwargs):
            keys += rows.column("key").to_pylist()
            yield rows.filter(pc.invert(pc.is_in(rows.column("key"), pa.array(finished, pa.string()))))
        record_source(fs, folder, batch.column("uri")[i].as_py(), keys)


def _finished_by_source(group: pa.Table) -> pa.Table:
    return pa.table(
        {"uri": [group.column("source")[0].as_py()], DONE: [group.column("key").to_pylist()]},
        schema=pa.schema([("uri", pa.string()), (DONE, pa.list_(pa.string()))]),
    )


def images_per_task(images: int, cpus: float, batch: int, call: int, per_block: int) -> int:
    """Images per read task (each decoding what it read), in whole read batches of `batch`: about two
    tasks per CPU of the cluster, so that every core decodes, and from one batch up to the fewest of
    MAX_IMAGES_PER_TASK, one actor call of `call` images and the `per_block` decoded images that fill a
    block of Ray Data's. A task's images reach the actors as one block, and Ray Data hands an actor whole
    blocks, up to a call's images or more: where `call` is whole read batches, a call takes a whole
    number of tasks, so that every call but a run's last is full (a compiled model pads a short one)."""
    wanted = math.ceil(math.ceil(images / max(2 * cpus, 1)) / batch)
    most = min(MAX_IMAGES_PER_TASK, call, per_block) // batch
    calls_batches = call // batch if call % batch == 0 else 0
    fitting = [n for n in range(1, min(most, wanted) + 1) if not calls_batches or calls_batches % n == 0]
    return max(fitting, default=1) * batch


def split(listing: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """`listing` in blocks of `rows`, one per read task, split as the run goes by one task per listing
    block, each of which may run SPLIT_AHEAD_BLOCKS ahead of Ray Data's executor (its default: 2). The
    executor takes what is ready once per step, every ~0.1 s while tasks run long, so at 2 one listing
    block fed ~17 read tasks/s: ~1,100 images/s at 64 images per task, ~9k at 512 (benchmarks/RESULTS.md).

    Ray Data reads the bound from the execution's DataContext, not from an operator's options, so the
    tasks after the split get it too. A read task's images fill one block unless `read_batch_size` holds
    more (those blocks then reach the object store without waiting), and actor calls and write tasks give
    one each; from an operator's first output until its first task ends, Ray Data's estimate of its tasks'
    pending output counts the bound, not one block. Not for shards and tables, whose tasks give many
    blocks of ~100 MB. The dataset is a copy with a DataContext of its own: the caller's listing keeps
    Ray's bound."""
    blocks = listing.materialize().repartition(target_num_rows_per_block=rows)
    blocks.context._max_num_blocks_in_streaming_gen_buffer = SPLIT_AHEAD_BLOCKS
    return blocks


def dataset(
    kind: str,
    listing: ray.data.Dataset,
    config: RunConfig,
    done: ray.data.Dataset | None,
    records: tuple[str, Any],
    call: int,
    image_bytes: int,
) -> ray.data.Dataset:
    """`(key, data, error)` rows, one per image of `listing` whose key is not in `done` (`key` and
    `source` columns: rows an earlier attempt finished). For image files `listing` is what is left to
    read, materialized. Shards and tables record the keys each gave under `records` (folder, filesystem).
    `call`: images per actor call; `image_bytes`: the bytes of one image decoded."""
    tasks = {"batch_format": "pyarrow", **STAGE.resources}
    if kind == "files":
        cpus = ray.cluster_resources().get("CPU", 1)
        block = listing.context.target_max_block_size  # the split's copy runs with it; None: no bound
        per_block = max(1, block // image_bytes) if block else MAX_IMAGES_PER_TASK
        per_task = images_per_task(listing.count(), cpus, config.read_batch_size, call, per_block)
        return split(listing, per_task).map_batches(
            read_listed, batch_size=config.read_batch_size, **tasks, fn_kwargs={"rules": ReadRules.of(config)}
        )
    folder, fs = records
    recorded = {
        "fs": fs,
        "folder": folder,
        **({"read": read_shards, "rules": ReadRules.of(config)} if kind == "webdataset" else {}),
        **({"read": read_tables, "config": config} if kind == "parquet" else {}),
    }
    if done is not None and not config.uri_column:
        # the bytes come with the keys: each container's finished keys travel to the task that reads it
        listing = attach(listing, each_group(done, "source", _finished_by_source), "uri")
    rows = listing.repartition(target_num_rows_per_block=1).map_batches(
        _read_recorded, batch_size=1, **tasks, fn_kwargs=recorded
    )
    if kind == "parquet" and config.uri_column:
        if done is not None:  # keys come before their bytes here: a join drops the finished ones
            rows = without(rows, done.select_columns(["key"]), ("key",), ("key",))
        return rows.map_batches(
            read_objects,
            batch_size=config.read_batch_size,
            **tasks,
            fn_kwargs={"rules": ReadRules.of(config, from_table=True)},
        )
    return rows
