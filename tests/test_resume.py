"""What a run keeps of a dead attempt's chunks: finished rows of inputs still listed; failed reads are
read again; rows of inputs no longer listed go to the chunk's stale record."""

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from dinat_batch.pipeline.errors import error_text
from dinat_batch.pipeline.output import Output, stale_record
from dinat_batch.pipeline.ownership import Ownership, write_table
from dinat_batch.pipeline.resume import resume
from dinat_batch.pipeline.stages.write import chunk_name


def dead_attempt(out: Output, rows: dict[str, str | None]) -> list[str]:
    dead = Ownership("dead", "sha", "dead.0", out.identity)
    path = f"{out.staging(dead.attempt)}/{chunk_name(0, len(rows))}"
    table = pa.table({"key": list(rows), "error": pa.array(list(rows.values()), pa.string())})
    write_table(out.fs, path, table, dead)
    return [path]


def listing(*uris: str) -> ray.data.Dataset:
    return ray.data.from_arrow(
        pa.table({"uri": list(uris), "size": [1] * len(uris), "version": ["v"] * len(uris)})
    )


def test_shard_rows_finished_failed_and_gone(tmp_path, ray_session):
    out = Output(str(tmp_path / "out"), {})
    chunks = dead_attempt(
        out,
        {
            "s3://b/1.tar#a": None,
            "s3://b/1.tar#b": error_text("ImageDecodeError", "truncated"),  # final: kept
            "s3://b/2.tar#<unreadable from its start>": error_text("ReadError", "timed out"),  # read again
            "s3://b/3.tar#a": None,  # its shard is gone: stale
            "s3://b/4#x.tar#a#1": None,  # a `#` in the shard's name and in the sample's: its shard's
        },
    )
    owner = Ownership("run", "sha", "run.1", out.identity)
    shards = listing("s3://b/1.tar", "s3://b/2.tar", "s3://b/4#x.tar")
    kept = resume(out, chunks, shards, "webdataset", False, owner)
    assert kept.resumed == 3
    assert sorted(row["key"] for row in kept.done.take_all()) == [
        "s3://b/1.tar#a",
        "s3://b/1.tar#b",
        "s3://b/3.tar#a",
        "s3://b/4#x.tar#a#1",
    ]
    with open(stale_record(out.staging(owner.attempt), chunks[0]), "rb") as f:
        assert pq.read_table(f).column("key").to_pylist() == ["s3://b/3.tar#a"]


def test_a_dead_attempt_of_only_failed_reads_reads_everything_again(tmp_path, ray_session):
    out = Output(str(tmp_path / "out"), {})
    chunks = dead_attempt(out, {"s3://b/1.tar#<unreadable from its start>": error_text("ReadError", "reset")})
    owner = Ownership("run", "sha", "run.1", out.identity)
    kept = resume(out, chunks, listing("s3://b/1.tar"), "webdataset", False, owner)
    assert (kept.done, kept.resumed) == (None, 0)
