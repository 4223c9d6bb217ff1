"""The Iceberg side of an output (`output_format: iceberg`): the table in its catalog, and the commit that
makes a run's rows visible as one snapshot.

    OUTPUT/data/[run_date=DATE/]part-*.parquet   data files, written by the commit's compaction tasks; ours
                                                 by their footer, as every file of pipeline/output.py
    OUTPUT/metadata/                             the table's metadata, written by pyiceberg
    OUTPUT/_staging/, _lease/                    a run's chunks and the lease, as for Parquet (pipeline/output.py)
    OUTPUT/run_date=DATE/_staging/, _runs/       a nightly date's run in progress, the ledgers (jobs/nightly.py)

The run's protocol is the Parquet one up to the commit (chunks, compaction, the key check); the commit is
one catalog transaction: the snapshot that drops the files the run replaces (the whole table, or the
nightly date's partition) and adds the new ones, and the table property that records the committed run's
summary (`dinat-batch.commit` or `dinat-batch.commit.DATE`), so readers see the old state or the new one
and never a mix. Ray Data's `write_iceberg` is not used for it: it commits when its write ends, before the
pipeline could check the rows; its overwrite is two snapshots (a delete, then an append); and a write with
no rows commits nothing, so a nightly rerun that finds nothing new would not empty its date.

Iceberg has no fixed-size list: `embedding` is `list<float>` in the table and is read back as the
`fixed_size_list<float>[D]` of the Parquet output (D is a table property).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import pyarrow as pa
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.expressions import EqualTo
from pyiceberg.io.pyarrow import parquet_file_to_data_file
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import assign_fresh_schema_ids
from pyiceberg.table import Table
from pyiceberg.transforms import IdentityTransform

from dinat_batch.pipeline.config import SAME_JOB, ConfigError, RunConfig
from dinat_batch.pipeline.deletion import delete_files
from dinat_batch.pipeline.faults import crash_point
from dinat_batch.pipeline.listing import pages
from dinat_batch.pipeline.locations import filesystem, options_for, resolve
from dinat_batch.pipeline.objects import read_object
from dinat_batch.pipeline.ownership import owner_of
from dinat_batch.pipeline.parallel import in_threads
from dinat_batch.pipeline.stages.write import output_schema

PARTITION = "run_date"
COMMIT = "dinat-batch.commit"
EMBEDDING_DIM = "dinat-batch.embedding-dim"
LAYOUT = "dinat-batch.layout"  # "run" (one run's rows) or "nightly" (partitioned by run_date)
DATA = "data"
METADATA = "metadata"
_NAME_MAPPING = "schema.name-mapping.default"
# the config fields a commit property keeps: what a rerun compares (SAME_JOB) and where the run read
SUMMARY_CONFIG = (*SAME_JOB, "output", "allowed_uri_prefixes")


class CommitConflict(RuntimeError):
    """The table changed since this run read it: another writer committed. Nothing of this run was
    committed."""


def file_io_properties(storage_options: dict[str, Any]) -> dict[str, str]:
    """pyiceberg's S3 settings from the run's fsspec (s3fs) storage_options, so that the catalog's metadata
    goes where the data goes, with the same credentials; catalog properties given explicitly win."""
    client = storage_options.get("client_kwargs") or {}
    found = {
        "s3.endpoint": storage_options.get("endpoint_url") or client.get("endpoint_url"),
        "s3.region": storage_options.get("region_name") or client.get("region_name"),
        "s3.access-key-id": storage_options.get("key"),
        "s3.secret-access-key": storage_options.get("secret"),
        "s3.session-token": storage_options.get("token"),
    }
    # the fsspec FileIO: one S3 client stack (s3fs) for data and metadata alike
    return {"py-io-impl": "pyiceberg.io.fsspec.FsspecFileIO"} | {k: v for k, v in found.items() if v}


def table_schema(num_features: int, partitioned: bool) -> pa.Schema:
    schema = output_schema(num_features)
    return schema.append(pa.field(PARTITION, pa.string(), nullable=False)) if partitioned else schema


def commit_property(scope: str | None) -> str:
    return f"{COMMIT}.{scope}" if scope else COMMIT


class IcebergTable:
    """One table of a catalog, at the output's location. Only the driver talks to the catalog (a SQLite
    file need not be reachable from the workers)."""

    def __init__(
        self, identifier: str, catalog: dict[str, str], location: str, storage_options: dict[str, Any]
    ):
        self.identifier = identifier
        self._fs, path = filesystem(location, storage_options)
        # one spelling, absolute: a relative local path would name another place from another folder
        self.location = self._fs.unstrip_protocol(path.rstrip("/"))
        self._properties = file_io_properties(options_for(location, storage_options)) | catalog

    @classmethod
    def of(cls, config: RunConfig) -> IcebergTable | None:
        if config.output_format != "iceberg":
            return None
        assert config.iceberg_table is not None
        return cls(config.iceberg_table, config.iceberg_catalog, config.output, config.storage_options)

    @cached_property
    def catalog(self) -> Catalog:
        return load_catalog(self._properties.get("name", "dinat-batch"), **self._properties)

    def uri(self, path: str) -> str:
        """The URI a data file is listed under in the table, from its filesystem path."""
        return self._fs.unstrip_protocol(path)

    def path(self, uri: str) -> str:
        return self._fs._strip_protocol(uri)

    def data_path(self, scope: str | None) -> str:
        """The folder of a scope's data files: `data/`, or a nightly date's `data/run_date=DATE/`."""
        return f"{self.path(self.location)}/{DATA}" + (f"/{PARTITION}={scope}" if scope else "")

    def canonical(self, path: str) -> str:
        """One spelling of a file's place (a URI or a filesystem path): the table stores the spelling of the
        run that committed, a listing gives today's config's (`..`, `//`, symlinks)."""
        return str(resolve(path if ":" in path.split("/", 1)[0] else self.uri(path), pattern=False))

    def load(self) -> Table | None:
        """The table, or None when the catalog has none of that name; raises ConfigError for a table of that
        name somewhere else or of another layout."""
        try:
            table = self.catalog.load_table(self.identifier)
        except NoSuchTableError:
            return None
        if resolve(table.location()) != resolve(self.location):
            raise ConfigError(
                f"the Iceberg table {self.identifier} lives at {table.location()}, not at the output "
                f"{self.location}: one table has one location (and one writer). Set output to its location, "
                "or name another table"
            )
        if LAYOUT not in table.properties:
            raise ConfigError(
                f"the Iceberg table {self.identifier} was not created by dinat-batch; it writes only to its own "
                "tables. Name a new table"
            )
        return table

    def ensure(self, num_features: int, partitioned: bool) -> Table:
        """The table, created (with its namespace) when missing."""
        layout = "nightly" if partitioned else "run"
        table = self.load()
        root = self.path(self.location)
        if table is None and (any(self._files(f"{root}/{METADATA}")) or any(self._files(f"{root}/{DATA}"))):
            raise ConfigError(
                f"{self.location} holds an Iceberg table's files, but the catalog has no table "
                f"{self.identifier} there (a lost or other catalog, or a renamed table). A new table would "
                "replace them: register the table in this catalog (pyiceberg: catalog.register_table(name, "
                "its newest metadata/*.metadata.json)), or choose another output"
            )
        if table is None:
            schema = assign_fresh_schema_ids(
                Catalog._convert_schema_if_needed(table_schema(num_features, partitioned))
            )
            spec = (
                PartitionSpec(
                    PartitionField(
                        source_id=schema.find_field(PARTITION).field_id,
                        field_id=1000,
                        transform=IdentityTransform(),
                        name=PARTITION,
                    )
                )
                if partitioned
                else PartitionSpec()
            )
            namespace = self.identifier.rsplit(".", 1)[0]
            self.catalog.create_namespace_if_not_exists(namespace)
            table = self.catalog.create_table(
                self.identifier,
                schema=schema,
                location=self.location,
                partition_spec=spec,
                # our files carry no Iceberg field ids: readers map their columns by name
                properties={
                    _NAME_MAPPING: schema.name_mapping.model_dump_json(),
                    EMBEDDING_DIM: str(num_features),
                    LAYOUT: layout,
                },
            )
        if table.properties[LAYOUT] != layout:
            raise ConfigError(
                f"the Iceberg table {self.identifier} holds {table.properties[LAYOUT]} output, partitioned "
                f"{'by run_date' if table.properties[LAYOUT] == 'nightly' else 'not at all'}; "
                f"{'`dinat-batch nightly`' if partitioned else '`dinat-batch run`'} writes another layout. "
                "Name another table"
            )
        if int(table.properties[EMBEDDING_DIM]) != num_features:
            raise ConfigError(
                f"the Iceberg table {self.identifier} holds {table.properties[EMBEDDING_DIM]}-d embeddings; this "
                f"model makes {num_features}-d ones. One table holds one model's embeddings: name another table"
            )
        return table

    def snapshot_id(self) -> int | None:
        table = self.load()
        snapshot = table.current_snapshot() if table is not None else None
        return snapshot.snapshot_id if snapshot is not None else None

    def committed(self, scope: str | None) -> dict[str, Any] | None:
        """The summary of the run committed for `scope` (a nightly date, None for the whole table)."""
        table = self.load()
        found = table.properties.get(commit_property(scope)) if table is not None else None
        return json.loads(found) if found else None

    def commits(self) -> dict[str, dict[str, Any]]:
        """The committed runs' summaries by scope (a nightly table's dates)."""
        table = self.load()
        properties = table.properties if table is not None else {}
        return {
            name.removeprefix(f"{COMMIT}."): json.loads(value)
            for name, value in properties.items()
            if name.startswith(f"{COMMIT}.")
        }

    def files(self, scope: str | None) -> list[tuple[str, int]]:
        """Paths and row counts of the data files the current snapshot holds for `scope`."""
        table = self.load()
        if table is None or table.current_snapshot() is None:
            return []
        return sorted(
            (self.path(task.file.file_path), task.file.record_count) for task in _tasks(table, scope)
        )

    def referenced(self) -> set[str]:
        """Every data file that some snapshot holds (time travel reads them all), in `canonical` form."""
        table = self.load()
        if table is None or not table.snapshots():
            return set()
        return {self.canonical(uri) for uri in table.inspect.all_data_files().column("file_path").to_pylist()}

    def commit(self, paths: list[str], scope: str | None, summary: dict[str, Any], base: int | None) -> int:
        """One snapshot: the data files now held for `scope` out, `paths` in, and the run's `summary` as the
        scope's commit property, in one catalog commit. `base`: the snapshot this run started from; if
        another writer has committed since, CommitConflict and nothing changes. Returns the snapshot id."""
        table = self.load()
        assert table is not None, "ensure() made the table before the run"
        current = table.current_snapshot()
        if (current.snapshot_id if current else None) != base:
            raise CommitConflict(
                f"the Iceberg table {self.identifier} was changed by another writer while this run ran "
                f"(snapshot {base} -> {current and current.snapshot_id}); nothing was committed: run again"
            )
        new = [parquet_file_to_data_file(table.io, table.metadata, self.uri(path)) for path in paths]
        old = [task.file for task in _tasks(table, scope)] if current else []
        properties = {"dinat-batch.run-id": str(summary.get("run_id")), "dinat-batch.scope": scope or ""}
        # every metadata version carries the properties: the summary without the run's full config
        kept = summary | {
            "config": {k: v for k, v in summary.get("config", {}).items() if k in SUMMARY_CONFIG}
        }
        with table.transaction() as transaction:
            transaction.set_properties({commit_property(scope): json.dumps(kept, default=str)})
            with transaction.update_snapshot(snapshot_properties=properties).overwrite() as snapshot:
                for data_file in old:
                    snapshot.delete_data_file(data_file)
                for data_file in new:
                    snapshot.append_data_file(data_file)
            crash_point("snapshot-staged")
        return self.catalog.load_table(self.identifier).current_snapshot().snapshot_id

    def read(
        self,
        snapshot_id: int | None = None,
        as_of_ms: int | None = None,
        columns: list[str] | None = None,
        limit: int | None = None,
    ) -> pa.Table:
        """The table's rows (at a snapshot, or as of a time), with the Parquet output's column types;
        `columns` and `limit` (the first rows) read less."""
        table = self.load()
        if table is None:
            raise LookupError(f"no Iceberg table {self.identifier} in the catalog")
        if as_of_ms is not None:
            snapshot = table.snapshot_as_of_timestamp(as_of_ms)
            if snapshot is None:
                raise LookupError(f"the Iceberg table {self.identifier} has no snapshot that old")
            snapshot_id = snapshot.snapshot_id
        if snapshot_id is not None and table.snapshot_by_id(snapshot_id) is None:
            known = ", ".join(str(s.snapshot_id) for s in table.snapshots())
            raise LookupError(
                f"the Iceberg table {self.identifier} has no snapshot {snapshot_id} (it has {known})"
            )
        schema = table_schema(int(table.properties[EMBEDDING_DIM]), table.properties[LAYOUT] == "nightly")
        schema = pa.schema([schema.field(name) for name in columns or schema.names])
        if table.current_snapshot() is None:
            return schema.empty_table()
        scan = table.scan(snapshot_id=snapshot_id, selected_fields=tuple(schema.names), limit=limit)
        return scan.to_arrow().select(schema.names).cast(schema)

    def orphans(self, older_than_s: float = 3600.0) -> list[str]:
        """Files of the table that no snapshot reaches: our data files under `data/` written for a commit
        that did not land (or held only by expired snapshots), and files under `metadata/` that the
        catalog's entry cannot reach and that are older than `older_than_s` (another engine's commit may be
        in flight: Iceberg's own orphan removal waits days). The rows of a run that ended in `_FAILURE` are
        kept while that marker stands. A run removes the data files of its own scope by itself."""
        table = self.load()
        if table is None:
            return []
        root = self.path(self.location)
        listed = list(self._files(f"{root}/{METADATA}"))
        metadata = [entry["name"] for entry in listed]
        if self.canonical(table.metadata_location) not in {self.canonical(path) for path in metadata}:
            raise ConfigError(
                f"the table's current metadata {table.metadata_location} is not among the files listed under "
                f"{self.location}/{METADATA}: the output and the catalog disagree on where the table is; "
                "nothing is removed"
            )
        identity = str(resolve(self.location))
        data = [entry for entry in self._files(f"{root}/{DATA}") if entry["name"].endswith(".parquet")]
        kept = self.referenced() | self._failed_runs_files(root)
        # a footer each (one request with the listed size), at once: a table's data files are thousands
        owners = in_threads(lambda entry: owner_of(self._fs, entry["name"], entry.get("size")), data)
        ours = [
            entry["name"]
            for entry, owner in zip(data, owners, strict=True)
            if owner is not None
            and (owner.output == identity or owner.output.startswith(f"{identity}/{PARTITION}="))
            and self.canonical(entry["name"]) not in kept
        ]
        reached = {table.metadata_location, *(entry.metadata_file for entry in table.metadata.metadata_log)}
        reached |= {stats.statistics_path for stats in table.metadata.statistics}
        reached |= {stats.statistics_path for stats in table.metadata.partition_statistics}
        for snapshot in table.snapshots():
            reached.add(snapshot.manifest_list)
            reached |= {manifest.manifest_path for manifest in snapshot.manifests(table.io)}
        reached = {self.canonical(uri) for uri in reached}
        now = time.time()
        unreached = [
            entry["name"]
            for entry in listed
            if self.canonical(entry["name"]) not in reached and now - _modified(entry) > older_than_s
        ]
        return sorted(ours) + sorted(unreached)

    def _failed_runs_files(self, root: str) -> set[str]:
        """The data files that `_FAILURE` markers list (a run's rows kept for inspection)."""
        found = set()
        for marker in self._fs.glob(f"{root}/_FAILURE") + self._fs.glob(f"{root}/{PARTITION}=*/_FAILURE"):
            folder = marker.rsplit("/", 1)[0]
            data = self.data_path(
                folder.rsplit("/", 1)[1].removeprefix(f"{PARTITION}=") if folder != root else None
            )
            for entry in json.loads(read_object(self._fs, marker)).get("files", []):
                found.add(self.canonical(f"{data}/{entry['name']}"))
        return found

    def remove(self, paths: list[str]) -> None:
        """Delete these files (`orphans`), in bulk where the store can."""
        delete_files(self._fs, paths)

    def _files(self, folder: str) -> Iterator[dict[str, Any]]:
        """The listing entries of every file below `folder`, with their sizes and times, a page at a time
        (whether there is any is one request)."""
        self._fs.invalidate_cache()
        for page in pages(self._fs, folder, recursive=True):
            yield from (entry for entry in page if entry["type"] == "file")


def _modified(entry: dict[str, Any]) -> float:
    """When a listed file was last written, in seconds since the epoch."""
    moment = entry.get("mtime") or entry.get("LastModified") or entry.get("created")
    if moment is None:  # unknown: taken as new, so never removed for its age
        return time.time()
    return moment.timestamp() if isinstance(moment, dt.datetime) else float(moment)


def _tasks(table: Table, scope: str | None) -> list:
    """The current snapshot's scan tasks of a scope: a nightly date's partition, or the whole table."""
    scan = table.scan(row_filter=EqualTo(PARTITION, scope)) if scope else table.scan()
    return list(scan.plan_files())
