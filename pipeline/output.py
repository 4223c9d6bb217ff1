"""The output folder's protocol: what may be in it, what a run keeps, deletes and resumes, and the commit.

    OUTPUT/part-ATTEMPT-00000.parquet ...  the table's files, listed by the marker
    OUTPUT/_SUCCESS (or _FAILURE)        JSON: the run summary and `files` [{name, rows, bytes}]
    OUTPUT/_lease/000001.json            the live run's lease (pipeline.lease)
    OUTPUT/_staging/RUN/chunk-*.parquet  a run's rows as they come; hidden from Hive-style readers

An Iceberg output (`pipeline/iceberg.py`) keeps the same protocol up to the commit; its table files lie in
`OUTPUT/data/`, and the commit is a snapshot of its catalog in place of `_SUCCESS`. There, the committed
state is not removed first: it stays readable until the snapshot that replaces it, and the rules below
that speak of the marker read "snapshot": table files that no snapshot holds are redundant, and staged
files are redundant once a snapshot holds their rows (those of the committed run; a replacement's are
resumed).

Rules, each for a loss seen in practice:
- Only files the pipeline wrote for this output are ever deleted: Parquet files carry their writer and
  their output in their metadata, the other files it writes have names of a shape it alone uses. Anything
  else in the output (also a dinat-batch file copied from another output) stops the run before any
  work, named. A read that fails proves nothing and deletes nothing: the run stops with the store's
  error.
- The marker goes first and comes last: an overwrite or rerun removes `_SUCCESS` before any data, and
  the commit writes it after every file it lists, so no crash leaves a marker beside partial data.
- Chunks are deleted only after the marker that lists their compacted rows. So table files that no
  marker lists are always redundant (an overwritten run's, or a commit cut short) and a later run
  deletes them; a run that died mid-way is resumed from its chunks.
- Before its marker, the commit checks that the rows written are exactly the inputs listed: same count,
  same keys (a multiset fingerprint, `KeyDigest`), so no key is missing and none is there twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from fsspec.implementations.local import LocalFileSystem

from dinat_batch.pipeline.atomic import is_own_temp, put_file
from dinat_batch.pipeline.config import SAME_JOB, ConfigError
from dinat_batch.pipeline.deletion import delete_files
from dinat_batch.pipeline.digest import KeyDigest
from dinat_batch.pipeline.errors import error_kind, retryable_mask
from dinat_batch.pipeline.faults import crash_point
from dinat_batch.pipeline.iceberg import DATA, METADATA, PARTITION, IcebergTable
from dinat_batch.pipeline.lease import LEASES, Lease, LeaseLost
from dinat_batch.pipeline.listing import pages, unnamed
from dinat_batch.pipeline.locations import filesystem, resolve
from dinat_batch.pipeline.objects import read_json, read_object
from dinat_batch.pipeline.ownership import (
    Owners,
    Ownership,
    file_identity,
    owner_in,
    write_table,
    written_identity,
)
from dinat_batch.pipeline.parallel import in_threads
from dinat_batch.pipeline.stages.write import CHUNK_PREFIX, chunk_groups, chunk_name

SUCCESS = "_SUCCESS"
FAILURE = "_FAILURE"
STAGING = "_staging"
SOURCES = "_sources"
PART_PREFIX = "part-"
_SOURCE_RECORD = re.compile(r"^[0-9a-f]{32}\.json$")
_STALE_RECORD = re.compile(r"^stale-[0-9a-f]{32}\.parquet$")


class ForeignFiles(ConfigError):
    """The output holds files the pipeline did not write."""


class VerificationFailed(RuntimeError):
    """The rows written are not exactly one per input: no marker is written."""


@dataclass
class Survey:
    """What an output folder holds, sorted by who wrote it."""

    marker: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    parts: list[str] = field(default_factory=list)  # our table files at the top
    chunks: dict[str, list[str]] = field(default_factory=dict)  # attempt -> its chunk files
    models: dict[str, str] = field(default_factory=dict)  # chunk file -> the model its rows came from
    staged: list[str] = field(default_factory=list)  # every file of ours under _staging/, chunks too
    temporary: list[str] = field(default_factory=list)  # our writes cut off before their rename
    foreign: list[str] = field(default_factory=list)


@dataclass
class Compacted:
    """The table's files as the commit made them, and what their rows count."""

    files: list[dict[str, Any]]  # name, rows, bytes: what the marker lists
    ok: int
    retryable: int  # rows of inputs whose read failed: not final
    errors_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(self.errors_by_kind.values())


class _Entry(NamedTuple):
    """A folder's entry as surveys read it: ~70 bytes, a third of a dict's, a million for a resume."""

    name: str  # without a trailing `/`
    type: str  # file, directory or other
    identity: bytes | None  # a Parquet file's `file_identity`
    size: int | None  # a Parquet file's, as listed: its footer is then one request (`owner_of`)


def _plain_file(entry: dict[str, Any]) -> bool:
    return entry["type"] == "file" and not entry.get("islink")


def leaf(path: str) -> str:
    """The last name of a path, as fsspec lists it (folders may end in `/`)."""
    return path.rstrip("/").rsplit("/", 1)[-1]


class Output:
    """An output folder on any fsspec filesystem; with `iceberg`, the folder of a run (or of a nightly
    date: `scope`) whose rows go into that table's `data/` and are committed as a snapshot."""

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any],
        iceberg: IcebergTable | None = None,
        scope: str | None = None,
    ):
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options
        self.fs, path = filesystem(self.uri, storage_options)
        self.path = path.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        # what this output's files carry in their metadata: the same place however it is spelled
        self.identity = str(resolve(self.uri))
        self.iceberg, self.scope = iceberg, scope
        self.data_path = self.path if iceberg is None else iceberg.data_path(scope)
        self._base: int | None = None  # the Iceberg snapshot this run started from
        self._owners = Owners(self.fs, spread=not self.local)

    def child(self, name: str) -> Output:
        return Output(f"{self.uri}/{name}", self.storage_options)

    def lease(self, run_id: str, timeout: float) -> Lease:
        return Lease(self.fs, self.path, run_id, timeout)

    def staging(self, attempt: str) -> str:
        return f"{self.path}/{STAGING}/{attempt}"

    def sources(self, attempt: str) -> str:
        """Where an attempt's reading tasks record the keys each source gave (`record_source`)."""
        return f"{self.staging(attempt)}/{SOURCES}"

    @property
    def ray_fs(self):
        """The filesystem to hand Ray's workers: None for the local disk (their own), else this one with
        its credentials."""
        return None if self.local else self.fs

    def ray_target(self, path: str) -> tuple[str, Any]:
        """A path of this output and the filesystem for Ray's workers (local paths are absolute)."""
        return path, self.ray_fs

    def _entries(self, path: str) -> list[_Entry]:
        """A folder's entries, once each, with each Parquet file's `file_identity` (the files whose owner
        surveys ask); object stores' folder markers (`key/`) count as folders; symbolic links and the
        like are `other` (the pipeline makes none). Listed page by page: a resume's million chunk files
        are ~250 bytes each here, ~1 KB each in fsspec's own listing."""
        entries: dict[str, _Entry] = {}
        for page in pages(self.fs, path, recursive=False):
            for entry in page:
                name = entry["name"].rstrip("/")
                folder = entry["type"] == "directory" or entry["name"].endswith("/")
                if unnamed(name, path):  # nothing the pipeline writes
                    entries[f"{name}//"] = _Entry(f"{name}//", "other", None, None)
                elif folder or name not in entries:
                    kind = "directory" if folder else "file" if _plain_file(entry) else "other"
                    parquet = kind == "file" and name.endswith(".parquet")
                    identity, size = (
                        (file_identity(self.fs, entry), entry.get("size")) if parquet else (None, None)
                    )
                    entries[name] = _Entry(name, kind, identity, size)
        return list(entries.values())

    def wrote(self, files: list[bytes], owner: Ownership) -> None:
        """This run's write tasks wrote `files` (`file_identity`s) as `owner`: surveys take them for
        ours without reading their footers while they stay the same."""
        self._owners.wrote(files, owner)

    def _ours(self, files: list[_Entry]) -> list[Ownership | None]:
        """Who wrote each Parquet file (`_entries`) for this output: None where the pipeline did not, or
        did for another output (a failed read raises)."""
        owners = self._owners.of([(entry.name, entry.identity, entry.size) for entry in files])
        return [owner if owner is not None and owner.output == self.identity else None for owner in owners]

    def _temp(self, entry: _Entry) -> bool:
        # only disks get temp files (object stores publish whole): elsewhere the name proves nothing
        return self.local and entry.type == "file" and is_own_temp(leaf(entry.name))

    def survey(self) -> Survey:
        self.fs.invalidate_cache()
        try:
            return self._survey()
        finally:
            # where fsspec lists (stores other than S3, `pipeline/listing.py`) its cache keeps ~1 KB per
            # file listed, a resume's million chunk files a GB (until the lease's next heartbeat clears it)
            self.fs.invalidate_cache()

    def _survey(self) -> Survey:
        found = Survey()
        top = self._entries(self.path) if self.fs.isdir(self.path) else []
        if not top and self.fs.isfile(self.path):
            found.foreign.append(self.path)
        parquet = []
        table_folders = (
            (DATA, METADATA) if self.iceberg and self.data_path.startswith(self.path + "/") else ()
        )
        for entry in top:
            name = leaf(entry.name)
            marker = name == FAILURE or (name == SUCCESS and self.iceberg is None)
            if marker and entry.type == "file":
                found.marker = name
                found.manifest = json.loads(read_object(self.fs, entry.name))
            elif name in table_folders and entry.type == "directory":
                continue  # the table's metadata is pyiceberg's; its data folder is surveyed below
            elif self._temp(entry):
                found.temporary.append(entry.name)
            elif name == STAGING and entry.type == "directory":
                self._survey_staging(entry.name, found)
            elif name == LEASES and entry.type == "directory":
                continue
            elif name.endswith(".parquet") and entry.type == "file":
                parquet.append(entry)
            else:
                found.foreign.append(entry.name)
        if self.iceberg is not None:
            if found.marker is None:
                committed = self.iceberg.committed(self.scope)
                found.marker, found.manifest = (SUCCESS, committed) if committed else (None, {})
            for entry in self._entries(self.data_path):
                if self._temp(entry):
                    found.temporary.append(entry.name)
                elif entry.type == "file" and entry.name.endswith(".parquet"):
                    parquet.append(entry)
                else:
                    found.foreign.append(entry.name)
        for entry, owner in zip(parquet, self._ours(parquet), strict=True):
            (found.parts if owner else found.foreign).append(entry.name)
        return found

    def _survey_staging(self, staging: str, found: Survey) -> None:
        chunks, stale = [], []
        for attempt in self._entries(staging):
            if attempt.type != "directory":
                (found.temporary if self._temp(attempt) else found.foreign).append(attempt.name)
                continue
            run = leaf(attempt.name)  # one string for all its chunks
            for entry in self._entries(attempt.name):
                name = leaf(entry.name)
                if self._temp(entry):
                    found.temporary.append(entry.name)
                elif entry.type == "file" and name.startswith(CHUNK_PREFIX) and name.endswith(".parquet"):
                    chunks.append((run, entry))
                elif entry.type == "file" and _STALE_RECORD.match(name):
                    stale.append(entry)
                elif name == SOURCES and entry.type == "directory":
                    for record in self._entries(entry.name):
                        ours = record.type == "file" and _SOURCE_RECORD.match(leaf(record.name))
                        (found.staged if ours else found.foreign).append(record.name)
                else:
                    found.foreign.append(entry.name)
        for (attempt, entry), owner in zip(chunks, self._ours([entry for _, entry in chunks]), strict=True):
            path = entry.name
            if owner:
                found.chunks.setdefault(attempt, []).append(path)
                found.models[path] = owner.checkpoint_sha256
                found.staged.append(path)
            else:
                found.foreign.append(path)
        for entry, owner in zip(stale, self._ours(stale), strict=True):
            (found.staged if owner else found.foreign).append(entry.name)

    def refuse_foreign(self) -> None:
        """Stop before writing anything, even a lease, into a folder that holds others' files."""
        self._refuse_foreign(self.survey())

    def _refuse_foreign(self, survey: Survey) -> None:
        if survey.foreign:
            shown = ", ".join(survey.foreign[:5]) + (" ..." if len(survey.foreign) > 5 else "")
            raise ForeignFiles(
                f"output {self.uri!r} holds {len(survey.foreign)} file(s) dinat-batch did not write for it: "
                f"{shown}. It never deletes or mixes with such files, not even with --overwrite: choose an "
                "empty or new output, or move them away"
            )

    def _remove(self, paths: list[str]) -> None:
        """Delete these files (each one the survey found to be ours), then any folder of ours they
        leave empty on a disk."""
        delete_files(self.fs, paths)
        if self.local:
            for folder in sorted({os.path.dirname(path) for path in paths}, key=len, reverse=True):
                while folder.startswith(f"{self.path}/{STAGING}"):
                    with contextlib.suppress(OSError):
                        os.rmdir(folder)
                    folder = os.path.dirname(folder)

    def prepare(
        self, overwrite: bool, ownership: Ownership, job: dict[str, Any], replace: bool = False
    ) -> list[str]:
        """Make the output ready for the run `ownership` names; returns the chunk files earlier attempts
        wrote (whose rows `pipeline/resume.py` keeps).

        A finished output (`_SUCCESS` or `_FAILURE`) is replaced only with `overwrite`, its marker
        removed first, and every staged file with it (a fresh start). One whose reads failed for some
        inputs is resumed instead by the same `job` (the fields of SAME_JOB), so that the same command
        retries them. An output without a marker is resumed: complete chunks of earlier attempts are kept
        (their failed reads are retried), writes cut off mid-way are removed. `replace`: a committed
        Iceberg scope (a nightly date's rerun) is replaced by resuming, not starting over: its snapshot
        stays until the new one, so a replacement cut short is found beside it and resumed."""
        survey = self.survey()
        self._refuse_foreign(survey)
        self._remove(survey.temporary)
        if survey.marker is not None:
            committed = survey.manifest
            same_job = all(committed.get("config", {}).get(name) == job.get(name) for name in SAME_JOB)
            retry = (
                not overwrite
                and survey.marker == SUCCESS
                and committed.get("retryable_errors", 0) > 0
                and committed.get("checkpoint_sha256") == ownership.checkpoint_sha256
                and same_job
            )
            if not overwrite and not retry and not (replace and self.iceberg is not None):
                state = "finished" if survey.marker == SUCCESS else "failed its checks"
                raise ConfigError(
                    f"output {self.uri!r} already holds a run that {state} ({survey.marker}); pass "
                    "--overwrite to replace it, or choose another output"
                )
            # beside a marker, staged files are redundant: the marker's files hold their rows. Beside an
            # Iceberg commit, only the committed run's are, unless the run starts over: the others are a
            # replacement cut short, resumed here
            fresh = overwrite or self.iceberg is None
            self._remove(
                survey.staged if fresh else self._committed_runs_files(survey.staged, committed["run_id"])
            )
            if retry:  # its files become a kept attempt's chunks, copied while the marker still stands
                kept = self.staging(f"{committed['run_id']}-committed")
                self.fs.makedirs(kept, exist_ok=True)
                for i, (path, rows) in enumerate(self._committed()):
                    self.fs.copy(path, f"{kept}/{chunk_name(i, rows)}")
            if survey.marker == FAILURE or self.iceberg is None:
                # un-commit first: from here on readers see no table, and the old files are redundant
                self.fs.rm_file(f"{self.path}/{survey.marker}")
                crash_point("unmarked")
            # an Iceberg table keeps its snapshot until the commit replaces it
            survey = self.survey()
        elif overwrite:  # the dead attempts of a run being replaced
            self._remove(survey.staged)
            survey = self.survey()
        kept = [
            path for attempt, paths in survey.chunks.items() if attempt != ownership.attempt for path in paths
        ]
        other = sorted({path for path in kept if survey.models[path] != ownership.checkpoint_sha256})
        if other:
            raise ConfigError(
                f"output {self.uri!r} holds an unfinished run of another model ({other[0]}); pass "
                "--overwrite to start over with this one"
            )
        self.fs.makedirs(self.path, exist_ok=True)
        if self.iceberg is not None:
            self._base = self.iceberg.snapshot_id()
        return sorted(kept)

    def _committed_runs_files(self, staged: list[str], run_id: str) -> list[str]:
        """Of the staged files, those the committed run `run_id` left (its attempts' folders, `RUN.8hex`)
        and every retry's copies of committed files (`*-committed`): a snapshot holds their rows."""
        attempt = re.compile(rf"^{re.escape(run_id)}\.[0-9a-f]{{8}}$")
        root = f"{self.path}/{STAGING}/"
        return [
            path
            for path in staged
            if (folder := path.removeprefix(root).split("/", 1)[0]).endswith("-committed")
            or attempt.match(folder)
        ]

    def _committed(self) -> list[tuple[str, int]]:
        """The committed table files (path, rows): the marker's list, or the Iceberg snapshot's."""
        if self.iceberg is not None:
            return self.iceberg.files(self.scope)
        return [(f"{self.data_path}/{entry['name']}", entry["rows"]) for entry in self.manifest()["files"]]

    def marker(self) -> tuple[str, dict[str, Any]] | None:
        """The committed marker's name and manifest (for Iceberg, `_SUCCESS` and the committed run's
        summary), or None."""
        self.fs.invalidate_cache()
        for name in (FAILURE, SUCCESS) if self.iceberg else (SUCCESS, FAILURE):
            manifest = read_json(self.fs, f"{self.path}/{name}")
            if manifest is not None:
                return name, manifest
        committed = self.iceberg.committed(self.scope) if self.iceberg else None
        return (SUCCESS, committed) if committed else None

    def manifest(self) -> dict[str, Any] | None:
        """The `_SUCCESS` manifest, or None while the output is not committed."""
        found = self.marker()
        return found[1] if found and found[0] == SUCCESS else None

    def committed_files(self) -> list[str] | None:
        """Paths of the files `_SUCCESS` lists (exactly those), or None when not committed."""
        manifest = self.manifest()
        if manifest is None:
            return None
        if "files" not in manifest and self.iceberg is None:
            # written before markers listed their files: every file beside it
            return sorted(path for path in self.fs.ls(self.path, detail=False) if path.endswith(".parquet"))
        return [path for path, _ in self._committed()]

    def source_digest(self, attempt: str) -> tuple[KeyDigest, int]:
        """The keys this attempt's reading stage emitted, summed over its per-source records, and how
        many sources recorded theirs."""
        total = KeyDigest()
        self.fs.invalidate_cache()
        paths = [entry.name for entry in self._entries(self.sources(attempt))]
        for data in in_threads(lambda path: read_object(self.fs, path), paths):
            total += KeyDigest.from_json(json.loads(data))
        return total, len(paths)

    def compact(
        self,
        ownership: Ownership,
        lease: Lease,
        expected: KeyDigest,
        rows_per_file: int,
    ) -> Compacted:
        """Compact every attempt's chunks into the table's files (in Ray tasks, about `rows_per_file`
        rows each) and check them against the inputs; raises VerificationFailed, writing no marker.
        Rows of earlier attempts that this attempt's stale records name (`stale_record`) are left out."""
        lease.check()
        survey = self.survey()
        self._refuse_foreign(survey)
        committed = (
            survey.marker is not None if self.iceberg is None else self.iceberg.snapshot_id() != self._base
        )
        if committed:  # by another run since this one prepared
            raise LeaseLost(f"{self.uri} was committed by another run while this one ran; it stops here")
        self._remove(self._redundant(survey.parts))
        crash_point("old-files-removed")
        groups = chunk_groups(
            sorted(path for paths in survey.chunks.values() for path in paths), rows_per_file
        )
        # named by attempt: an Iceberg table's current files stay until the commit that replaces them
        parts = [
            f"{self.data_path}/{PART_PREFIX}{ownership.attempt}-{i:05d}.parquet" for i in range(len(groups))
        ]
        constants = {PARTITION: self.scope} if self.iceberg and self.scope else {}
        pending = [
            _compact.remote(self.ray_fs, group, part, ownership, self.staging(ownership.attempt), constants)
            for group, part in zip(groups, parts, strict=True)
        ]
        if pending:
            ray.wait(pending, num_returns=1)
            crash_point("part-written")
        results = ray.get(pending)
        self.wrote([result["identity"] for result in results if result["identity"]], ownership)
        written = KeyDigest()
        kinds: Counter[str] = Counter()
        compacted = Compacted(files=[], ok=0, retryable=0)
        for part, result in zip(parts, results, strict=True):
            written += KeyDigest.from_json(result["digest"])
            compacted.ok += result["ok"]
            kinds.update(result["errors_by_kind"])
            compacted.retryable += result["retryable"]
            if result["rows"]:  # a group of stale or retried rows only leaves no file
                compacted.files.append({"name": leaf(part), "rows": result["rows"], "bytes": result["bytes"]})
        if written != expected:
            raise VerificationFailed(
                f"the run wrote {written.count} rows for {expected.count} inputs, and not exactly one per "
                f"input key: nothing was committed. Its rows stay in {self.uri}/{STAGING}/ for inspection; "
                "rerun with --overwrite (overwrite: true) to start over"
            )
        compacted.errors_by_kind = dict(kinds.most_common())
        return compacted

    def _redundant(self, parts: list[str]) -> list[str]:
        """Our table files that no reader can reach: listed by no marker (the marker is gone before a run
        writes), or held by no Iceberg snapshot (a commit that did not land, or snapshots expired)."""
        if self.iceberg is None:
            return parts
        held = self.iceberg.referenced()
        return [path for path in parts if self.iceberg.canonical(path) not in held]

    def publish(self, lease: Lease, marker: str, manifest: dict[str, Any]) -> None:
        """Write the marker, listing the compacted files (for Iceberg: commit them as one snapshot), then
        remove the chunks they were made from."""
        lease.check()
        crash_point("before-marker")
        if marker == SUCCESS and self.iceberg is not None:
            files = [f"{self.data_path}/{entry['name']}" for entry in manifest["files"]]
            summary = {name: value for name, value in manifest.items() if name != "files"}
            self.iceberg.commit(files, self.scope, summary, self._base)
        else:
            put_file(self.fs, f"{self.path}/{marker}", json.dumps(manifest, indent=2, default=str).encode())
        crash_point("marked")
        survey = self.survey()
        self._remove(survey.staged + survey.temporary)


def stale_record(staging: str, chunk: str) -> str:
    """Where an attempt records the keys of an earlier attempt's `chunk` whose inputs are no longer
    listed (`pipeline/resume.py`), for the commit to leave out."""
    return f"{staging}/stale-{hashlib.sha256(chunk.encode()).hexdigest()[:32]}.parquet"


@ray.remote(num_cpus=0.5)
def _compact(
    fs, chunks: list[str], part: str, ownership: Ownership, staging: str, constants: dict[str, str]
) -> dict[str, Any]:
    """One table file from a group of chunks, with `constants` as columns (an Iceberg partition's value).
    From chunks of earlier attempts (outside this attempt's `staging`) failed reads are left out, as this
    attempt read those inputs again, and so are the keys their stale record names. Returns the file's
    size, its `file_identity` and the counts the commit checks and reports."""
    fs = fs or LocalFileSystem()

    def read(path: str) -> pa.Table:
        table = pq.read_table(pa.BufferReader(read_object(fs, path)))
        owner = owner_in(table.schema.metadata)
        if owner is None or owner.output != ownership.output:  # the survey said otherwise: never mix it in
            raise ForeignFiles(
                f"{path} was not written by dinat-batch for this output: nothing was committed. Move it "
                "away and run the same command again"
            )
        if not path.startswith(staging + "/"):
            keep = pc.invert(pc.is_in(table.column("key"), _stale_keys(fs, stale_record(staging, path))))
            table = table.filter(pc.and_(keep, pc.invert(retryable_mask(table.column("error")))))
        return table.replace_schema_metadata(None)

    # a part's chunks are small files: a request's latency each, at once rather than one after another
    table = pa.concat_tables(in_threads(read, chunks))
    for name, value in constants.items():
        table = table.append_column(
            pa.field(name, pa.string(), nullable=False), pa.array([value] * len(table))
        )
    # no empty files: an Iceberg data file without rows has no statistics to tell its partition from
    size = write_table(fs, part, table, ownership) if table.num_rows else 0
    errors = table.column("error").to_pylist()
    failed = [e for e in errors if e is not None]
    return {
        "rows": table.num_rows,
        "bytes": size,
        "ok": table.num_rows - len(failed),
        "errors_by_kind": dict(Counter(error_kind(e) for e in failed)),
        "retryable": pc.sum(retryable_mask(table.column("error"))).as_py() or 0,
        "digest": KeyDigest().add(table.column("key").to_pylist()).to_json(),
        "identity": written_identity(fs, part) if table.num_rows else None,
    }


def _stale_keys(fs, record: str) -> pa.Array:
    try:
        return (
            pq.read_table(pa.BufferReader(read_object(fs, record)), columns=["key"])
            .column("key")
            .combine_chunks()
        )
    except FileNotFoundError:
        return pa.array([], pa.string())


def record_source(fs, folder: str, source: str, keys: list[str]) -> None:
    """In an attempt's sources `folder`: the keys one source (a shard or a table) gave, for the commit's
    check. `fs` None means the local disk."""
    name = hashlib.sha256(source.encode()).hexdigest()[:32]
    put_file(
        fs or LocalFileSystem(), f"{folder}/{name}.json", json.dumps(KeyDigest().add(keys).to_json()).encode()
    )
