"""Assembles the Ray Data pipeline and runs it: list -> read -> decode (CPU tasks) -> infer (actor pool)
-> Parquet -> `_SUCCESS`. Returns the run summary, which is also the `_SUCCESS` manifest."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import ray
from pydantic import BaseModel

from pipeline.config import ConfigError, RunConfig
from pipeline.inference import Predictor
from pipeline.model import load_model
from pipeline.model.runtime import CPU_BATCH, MAX_AUTO_BATCH
from pipeline.preprocess import PreprocessConfig, decode_batch
from pipeline.preprocess_gpu import unsupported
from pipeline.sink import Output
from pipeline.sources import (
    check_table,
    choose_kind,
    list_objects,
    locate_files,
    read_objects,
    read_shards,
    read_tables,
)

_DECODE_BATCH = 16  # images per decode task call: small enough to spread over cores, big enough to amortise
# Read and decode tasks fuse into one; half a CPU each lets two overlap per core while one waits on storage.
# The difference from the inference actor's resources also keeps Ray from fusing decoding into the actor,
# where it would run serially with the model instead of beside it.
_DECODE_CPUS = 0.5


class ErrorRateExceeded(RuntimeError):
    """More error rows than the config allows: the run wrote its rows and `_FAILURE`, not `_SUCCESS`."""


class RunSummary(BaseModel):
    run_id: str
    input: str
    input_format: str
    output: str
    model: str
    model_sha256: str
    device: str
    decode: str  # where JPEGs were decoded: cpu or gpu
    images: int
    resumed: int  # rows kept from an earlier attempt that died before its marker
    ok: int
    errors: int
    errors_by_kind: dict[str, int]
    started_at: datetime
    finished_at: datetime
    listing_seconds: float
    seconds: float
    images_per_second: float
    config: dict[str, Any]


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """Split a listing into blocks so that Ray spreads its rows over many tasks."""
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)] or [table]


def _drop_keys(batch: pa.Table, done: set[str]) -> pa.Table:
    keep = [key not in done for key in batch.column("key").to_pylist()]
    return batch.filter(pa.array(keep, pa.bool_()))


def _source(config: RunConfig, kind: str, listing: pa.Table, done: set[str]) -> ray.data.Dataset:
    """`(key, data, error)` rows, one per input image not in `done` (written by an earlier attempt)."""
    tasks = {"batch_format": "pyarrow", "num_cpus": _DECODE_CPUS}
    read = tasks | {"fn_kwargs": {"storage_options": config.storage_options}}
    if kind == "files":
        located = _drop_keys(locate_files(listing), done)
        blocks = ray.data.from_arrow(_blocks(located, config.read_batch_size))
        return blocks.map_batches(read_objects, batch_size=config.read_batch_size, **read)
    containers = ray.data.from_arrow(_blocks(listing, 1))
    if kind == "webdataset":
        rows = containers.map_batches(read_shards, batch_size=1, **read)
    else:
        rows = containers.map_batches(
            read_tables, batch_size=1, **(tasks | {"fn_kwargs": {"config": config}})
        )
    if done:
        rows = rows.map_batches(_drop_keys, **(tasks | {"fn_kwargs": {"done": done}}))
    if kind == "parquet" and config.uri_column:
        return rows.map_batches(read_objects, batch_size=config.read_batch_size, **read)
    return rows


def _actors(config: RunConfig) -> tuple[str, int, int, int]:
    """device, GPUs per actor, min and max pool size: GPU actors only where GPUs exist (or are asked for,
    for autoscaling clusters), so that a CPU-only cluster never waits for a GPU that will not come."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if config.device == "cuda" or (config.device == "auto" and gpus > 0):
        device, num_gpus, default_max = "cuda", 1, max(gpus, 1)
    else:
        device, num_gpus, default_max = "cpu", 0, 1
    max_size = config.max_actors or default_max
    return device, num_gpus, min(config.min_actors, max_size), max_size


def _decode_on_device(config: RunConfig, device: str, preprocessing: PreprocessConfig) -> bool:
    """Whether the CPU stage sends JPEGs on to be decoded by the GPU actors."""
    reason = unsupported(preprocessing, device)
    if config.decode == "gpu" and reason is not None:
        raise ConfigError(f"decode: gpu cannot run here: {reason}. Set decode to auto or cpu (--decode)")
    return config.decode != "cpu" and reason is None


def _connect(address: str | None) -> bool:
    """Join the configured or ambient Ray cluster, else start a local one. True when this call started it."""
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level="WARNING")
        return False
    ray.init(include_dashboard=False, logging_level="WARNING")
    return True


def run(
    config: RunConfig | Mapping[str, Any], select: Callable[[pa.Table], pa.Table] | None = None
) -> RunSummary:
    """Run the pipeline once; raises ConfigError or ModelLoadError before any data is read.

    `select` narrows the listing (`uri`, `size`, `version` of each image file, shard or table) to what
    this run processes; the nightly runs pass the objects that are new since the last one. A run left
    with nothing to process commits an empty output."""
    if not isinstance(config, RunConfig):
        config = RunConfig.model_validate(config)
    started_at = datetime.now(UTC)
    run_id = config.run_id or f"{started_at:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    # the driver loads the model once so that a missing, corrupt or mis-shaped checkpoint fails here
    model = load_model(config.model, device="cpu", storage_options=config.storage_options)
    preprocessing = model.preprocessing
    if not preprocessing.do_resize:
        raise ConfigError(
            f"{config.model}: its preprocessor does not resize; batched inference needs one size"
        )
    model_sha256 = model.weights_sha256
    del model
    started_ray = _connect(config.ray_address)
    try:
        actors = _actors(config)
        jpegs_to_device = _decode_on_device(config, actors[0], preprocessing)
        output = Output(config.output, config.storage_options)
        t0 = time.monotonic()
        listing = list_objects(config.input, config.storage_options)
        kind, listing = choose_kind(config, listing)
        if kind == "parquet":
            check_table(listing.column("uri")[0].as_py(), config)
        if select is not None:
            listing = select(listing)
        listed = time.monotonic()
        done = output.prepare(config.overwrite, model_sha256)
        if listing.num_rows:
            _execute(config, kind, listing, preprocessing, run_id, output, done, actors, jpegs_to_device)
        finished = time.monotonic()
        ok, errors, errors_by_kind = output.counts()
        summary = RunSummary(
            run_id=run_id,
            input=config.input,
            input_format=kind,
            output=config.output,
            model=config.model,
            model_sha256=model_sha256,
            device=actors[0],
            decode="gpu" if jpegs_to_device else "cpu",
            images=ok + errors,
            resumed=len(done),
            ok=ok,
            errors=errors,
            errors_by_kind=errors_by_kind,
            started_at=started_at,
            finished_at=datetime.now(UTC),
            listing_seconds=round(listed - t0, 3),
            seconds=round(finished - t0, 3),
            images_per_second=round((ok + errors - len(done)) / max(finished - listed, 1e-9), 2),
            config=config.redacted(),
        )
        rate = errors / max(ok + errors, 1)
        if config.max_error_rate is not None and rate > config.max_error_rate:
            reason = (
                f"{errors} of {ok + errors} rows are errors ({rate:.1%}), above max_error_rate "
                f"{config.max_error_rate:.1%}; the rows and this summary are in {config.output}"
            )
            output.fail(summary.model_dump(mode="json") | {"failed": reason})
            raise ErrorRateExceeded(reason)
        output.commit(summary.model_dump(mode="json"))
        return summary
    finally:
        if started_ray:
            ray.shutdown()


def _execute(
    config: RunConfig,
    kind: str,
    listing: pa.Table,
    preprocessing: PreprocessConfig,
    run_id: str,
    output: Output,
    done: set[str],
    actors: tuple[str, int, int, int],
    jpegs_to_device: bool,
) -> None:
    """The Ray Data plan: read and decode as CPU tasks, inference in an actor pool, Parquet files."""
    device, num_gpus, min_actors, max_actors = actors
    decoded = _source(config, kind, listing, done).map_batches(
        decode_batch,
        batch_size=_DECODE_BATCH,
        batch_format="numpy",
        num_cpus=_DECODE_CPUS,
        fn_kwargs={
            "config": preprocessing,
            "max_pixels": config.max_pixels,
            "jpegs_to_device": jpegs_to_device,
        },
    )
    # the actor sizes its model calls itself on a GPU (from free memory); a call brings it up to the most
    call_batch = config.batch_size or (MAX_AUTO_BATCH if device == "cuda" else CPU_BATCH)
    predicted = decoded.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model": config.model,
            "run_id": run_id,
            "top_k": config.top_k,
            "device": device,
            "dtype": config.dtype,
            "batch_size": config.batch_size,
            "compile": config.compile,
            "max_pixels": config.max_pixels,
            "cpu_threads": config.cpu_threads,
            "storage_options": config.storage_options,
        },
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        batch_size=call_batch,
        batch_format="numpy",
        num_gpus=num_gpus,
    )
    path, filesystem = output.ray_target()
    predicted.write_parquet(path, filesystem=filesystem, min_rows_per_file=config.rows_per_file)
