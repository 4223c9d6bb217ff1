"""The output table: its schema, the output directory's life cycle and the `_SUCCESS` commit marker.

Readers tell a finished run from an unfinished one by `_SUCCESS`, which is written only after every data
file: a directory without it is a run in progress or one that died.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import ConfigError

SUCCESS = "_SUCCESS"
FAILURE = "_FAILURE"


def output_schema(embedding_dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            ("error", pa.string()),
            ("label_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float32())),
            ("embedding", pa.list_(pa.float32(), embedding_dim)),
            ("width", pa.int32()),
            ("height", pa.int32()),
            pa.field("model", pa.string(), nullable=False),
            pa.field("model_sha256", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    )


class Output:
    """An output directory on any fsspec filesystem."""

    def __init__(self, uri: str, storage_options: dict[str, Any]):
        self.uri = uri.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.uri, **storage_options)
        self.path = self.path.rstrip("/")

    def ray_target(self) -> tuple[str, Any]:
        """The path and filesystem to hand Ray's writer: local paths absolute (workers have their own
        working directory), remote ones with this filesystem's credentials."""
        if isinstance(self.fs, LocalFileSystem):
            return self.path, None
        return self.uri, self.fs

    def prepare(self, overwrite: bool) -> None:
        """An empty directory to write into. An existing output is replaced only when asked: a rerun
        without --overwrite must not mix two runs' rows in one table."""
        self.fs.invalidate_cache()
        if self.fs.exists(self.path) and (not self.fs.isdir(self.path) or self.fs.ls(self.path)):
            if not overwrite:
                raise ConfigError(
                    f"output {self.uri!r} already exists and is not empty; pass --overwrite to replace it, "
                    "or choose another output"
                )
            self.fs.rm(self.path, recursive=True)
        self.fs.makedirs(self.path, exist_ok=True)

    def counts(self) -> tuple[int, int, dict[str, int]]:
        """ok rows, error rows, and errors by kind (the error text before its first ': ')."""
        self.fs.invalidate_cache()
        files = [path for path in self.fs.find(self.path) if path.endswith(".parquet")]
        if not files:  # a run that had nothing to process
            return 0, 0, {}
        table = pq.read_table(files, filesystem=self.fs, columns=["status", "error"])
        ok = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
        errors = table.filter(pc.equal(table["status"], "error"))["error"].to_pylist()
        kinds: dict[str, int] = {}
        for error in errors:
            kind = error.split(": ", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        return ok, len(errors), dict(sorted(kinds.items(), key=lambda item: -item[1]))

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write `_SUCCESS` last: the run is finished and its data files are complete."""
        self.fs.pipe_file(f"{self.path}/{SUCCESS}", json.dumps(manifest, indent=2, default=str).encode())

    def fail(self, manifest: dict[str, Any]) -> None:
        """Write `_FAILURE` instead: the rows are there to inspect, but the run did not pass its checks."""
        self.fs.pipe_file(f"{self.path}/{FAILURE}", json.dumps(manifest, indent=2, default=str).encode())

    def manifest(self) -> dict[str, Any] | None:
        self.fs.invalidate_cache()
        try:
            return json.loads(self.fs.cat_file(f"{self.path}/{SUCCESS}"))
        except FileNotFoundError:
            return None
