"""The output table: its schema, the output directory's life cycle and the `_SUCCESS` commit marker.

Readers tell a finished run from an unfinished one by `_SUCCESS`, which is written only after every data
file: a directory without it is a run in progress or one that died.
"""

from __future__ import annotations

import json
from collections import Counter
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

    def prepare(self, overwrite: bool, model_sha256: str) -> set[str]:
        """Make the output ready to write; returns the keys an earlier attempt already wrote.

        A finished output (`_SUCCESS` or `_FAILURE`) is replaced only with `overwrite`. An output holding
        only data files is an attempt that died before its marker: the same command resumes it, keeping
        its complete files and deleting the one it was writing when it died."""
        self.fs.invalidate_cache()
        entries = self.fs.ls(self.path) if self.fs.isdir(self.path) else []
        if overwrite and self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
        elif entries or self.fs.isfile(self.path):
            names = {entry.rsplit("/", 1)[1] for entry in entries}
            if not names or not all(name.endswith(".parquet") for name in names):
                state = "finished" if names & {SUCCESS, FAILURE} else "not a run's output"
                raise ConfigError(
                    f"output {self.uri!r} already exists ({state}); pass --overwrite to replace it, or choose "
                    "another output"
                )
            return self._written_keys(entries, model_sha256)
        self.fs.makedirs(self.path, exist_ok=True)
        return set()

    def _written_keys(self, files: list[str], model_sha256: str) -> set[str]:
        keys: set[str] = set()
        for path in files:
            try:
                with self.fs.open(path, "rb") as f:
                    table = pq.read_table(f, columns=["key", "model_sha256"])
            except (OSError, pa.ArrowInvalid):  # cut off mid-write when the driver died
                self.fs.rm(path)
                continue
            if set(table.column("model_sha256").to_pylist()) - {model_sha256}:
                raise ConfigError(
                    f"output {self.uri!r} holds an unfinished run of another model; pass --overwrite to start "
                    "over with this one"
                )
            keys.update(table.column("key").to_pylist())
        return keys

    def counts(self) -> tuple[int, int, dict[str, int]]:
        """ok rows, error rows, and errors by kind (the error text before its first ': ')."""
        self.fs.invalidate_cache()
        files = [path for path in self.fs.find(self.path) if path.endswith(".parquet")]
        if not files:  # a run that had nothing to process
            return 0, 0, {}
        table = pq.read_table(files, filesystem=self.fs, columns=["status", "error"])
        ok = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
        errors = table.filter(pc.equal(table["status"], "error"))["error"].to_pylist()
        kinds = Counter(error.split(": ", 1)[0] for error in errors)
        return ok, len(errors), dict(kinds.most_common())

    def _mark(self, marker: str, manifest: dict[str, Any]) -> None:
        self.fs.pipe_file(f"{self.path}/{marker}", json.dumps(manifest, indent=2, default=str).encode())

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write `_SUCCESS` last: the run is finished and its data files are complete."""
        self._mark(SUCCESS, manifest)

    def fail(self, manifest: dict[str, Any]) -> None:
        """Write `_FAILURE` instead: the rows are there to inspect, but the run did not pass its checks."""
        self._mark(FAILURE, manifest)

    def manifest(self) -> dict[str, Any] | None:
        self.fs.invalidate_cache()
        try:
            return json.loads(self.fs.cat_file(f"{self.path}/{SUCCESS}"))
        except FileNotFoundError:
            return None
