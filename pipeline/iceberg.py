"""The Iceberg side of an output (`output_format: iceberg`): the table in its catalog, and the commit that
makes a run's rows visible as one snapshot.

    OUTPUT/data/[run_date=DATE/]part-*.parquet   data files, written by the commit's compaction tasks; ours
                                                 by their footer, as every file of pipeline/output.py
    OUTPUT/metadata/                             the table's metadata, written by pyiceberg
    OUTPUT/_staging/, _lease/, _runs/            as for a Parquet output (pipeline/output.py, jobs/nightly.py)

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

import json
from functools import cached_property
from typing import Any

import fsspec
import pyarrow as pa
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.expressions import EqualTo
from pyiceberg.io.pyarrow import parquet_file_to_data_file
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import assign_fresh_schema_ids
from pyiceberg.table import Table
from pyiceberg.transforms import IdentityTransform

from dinat_batch.pipeline.config import ConfigError, RunConfig
from dinat_batch.pipeline.faults import crash_point
from dinat_batch.pipeline.locations import resolve
from dinat_batch.pipeline.ownership import owner_of
from dinat_batch.pipeline.stages.write import output_schema

PARTITION = "run_date"
COMMIT = "dinat-batch.commit"
EMBEDDING_DIM = "dinat-batch.embedding-dim"
LAYOUT = "dinat-batch.layout"  # "run" (one run's rows) or "nightly" (partitioned by run_date)
DATA = "data"
METADATA = "metadata"
_NAME_MAPPING = "schema.name-mapping.default"


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
        self.location = location.rstrip("/")
        self._properties = file_io_properties(storage_options) | catalog
        self._fs = fsspec.core.url_to_fs(self.location, **storage_options)[0]

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
        scan = table.scan(row_filter=EqualTo(PARTITION, scope)) if scope else table.scan()
        return sorted((self.path(task.file.file_path), task.file.record_count) for task in scan.plan_files())

    def referenced(self) -> set[str]:
        """Paths of every data file that some snapshot holds (time travel reads them all)."""
        table = self.load()
        if table is None or not table.snapshots():
            return set()
        return {self.path(uri) for uri in table.inspect.all_data_files().column("file_path").to_pylist()}

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
        scan = table.scan(row_filter=EqualTo(PARTITION, scope)) if scope else table.scan()
        old = [task.file for task in scan.plan_files()] if current else []
        properties = {"dinat-batch.run-id": str(summary.get("run_id")), "dinat-batch.scope": scope or ""}
        with table.transaction() as transaction:
            transaction.set_properties({commit_property(scope): json.dumps(summary, default=str)})
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

    def orphans(self) -> list[str]:
        """Files of the table that no snapshot reaches: our data files under `data/` written for a commit
        that did not land (or held only by expired snapshots), and metadata files under `metadata/` that the
        catalog's entry cannot reach. A run removes the data files of its own scope before it commits; this
        finds them all, for `dinat-batch orphans`."""
        table = self.load()
        if table is None:
            return []
        root = self.path(self.location)
        data = [path for path in self._find(f"{root}/{DATA}") if path.endswith(".parquet")]
        identity = str(resolve(self.location))
        owners = [owner_of(self._fs, path) for path in data]
        held = self.referenced()
        ours = [
            path
            for path, owner in zip(data, owners, strict=True)
            if owner is not None
            and (owner.output == identity or owner.output.startswith(f"{identity}/{PARTITION}="))
            and path not in held
        ]
        reached = {self.path(table.metadata_location)}
        reached |= {self.path(entry.metadata_file) for entry in table.metadata.metadata_log}
        for snapshot in table.snapshots():
            reached.add(self.path(snapshot.manifest_list))
            reached |= {self.path(manifest.manifest_path) for manifest in snapshot.manifests(table.io)}
        return sorted(ours) + sorted(path for path in self._find(f"{root}/{METADATA}") if path not in reached)

    def remove(self, path: str) -> None:
        self._fs.rm_file(path)

    def _find(self, folder: str) -> list[str]:
        self._fs.invalidate_cache()
        return self._fs.find(folder) if self._fs.isdir(folder) else []
