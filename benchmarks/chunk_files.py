"""A run's bookkeeping per chunk file, against the local S3 server (SeaweedFS on loopback):

    .venv/bin/python benchmarks/chunk_files.py --files 5000 [--record]

A run over 1B images leaves ~1M chunk files (one per write task). Writes N chunk files of a dead attempt
into an output, then times the steps whose cost grows with them: the first survey (each footer read, as a
resume does) from the driver's threads and, on a local Ray, in Ray tasks (as a run does past
`FOOTERS_PER_TASK`); a second survey (remembered); and the removal after the marker, side by side with the
removal one request per file (the code before `pipeline/deletion.py`), each on N files of its own. The
two ways of a step run twice each, A B B A. Prints one JSON line of files per second for each step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import pyarrow as pa
import ray

from benchmarks.common import count_and_print
from dinat_batch.infra.object_store import LocalObjectStore
from dinat_batch.pipeline.deletion import delete_files
from dinat_batch.pipeline.output import Output
from dinat_batch.pipeline.ownership import Ownership, write_table
from dinat_batch.pipeline.parallel import in_threads
from dinat_batch.pipeline.stages.write import chunk_name

MODEL = "0" * 64


def _chunks(output: Output, attempt: str, files: int) -> list[str]:
    """`files` chunk files of one row each, as a dead attempt of this output leaves them."""
    owner = Ownership("dead", MODEL, attempt, output.identity)
    table = pa.table({"key": ["s3://corpus/a.jpg"], "error": pa.array([None], pa.string())})
    paths = [f"{output.staging(attempt)}/{chunk_name(i, 1)}" for i in range(files)]
    in_threads(lambda path: write_table(output.fs, path, table, owner), paths)
    return paths


def _timed(work) -> tuple[float, object]:
    start = time.monotonic()
    result = work()
    return time.monotonic() - start, result


def _first_survey(output: Output) -> tuple[float, list[str]]:
    """Seconds of a survey that remembers nothing (every footer read), and the files it found ours."""
    fresh = Output(output.uri, output.storage_options)
    seconds, survey = _timed(fresh.survey)
    return seconds, sorted(survey.staged)


def measure(files: int) -> dict:
    """Each way twice, in the order A B B A, so that neither gains from going second (the server warm)."""
    with LocalObjectStore() as store:
        store.make_bucket("bench")
        output = Output("s3://bench/out", store.storage_options)
        written = sorted(_chunks(output, "dead.0", files))
        driver, tasks = [], []
        for way in ("driver", "tasks", "tasks", "driver"):
            if way == "tasks" and not ray.is_initialized():
                ray.init(address="local", include_dashboard=False, logging_level="ERROR")
            if way == "driver" and ray.is_initialized():
                ray.shutdown()
            seconds, found = _first_survey(output)
            assert found == written
            (driver if way == "driver" else tasks).append(seconds)
        output.survey()
        second, _ = _timed(output.survey)
        serial, bulk = [], []
        for i, way in enumerate(("serial", "bulk", "bulk", "serial")):
            paths = _chunks(output, f"dead.{i + 1}", files)
            start = time.monotonic()
            if way == "serial":
                for path in paths:
                    output.fs.rm_file(path)
            else:
                delete_files(output.fs, paths)
            (serial if way == "serial" else bulk).append(time.monotonic() - start)
        output.fs.invalidate_cache()
        assert [path for path in output.fs.find(output.path) if path.endswith(".parquet")] == written
    rate = {
        "first_survey": files * 2 / sum(driver),
        "first_survey_in_ray_tasks": files * 2 / sum(tasks),
        "second_survey": files / second,
        "removal_one_request_per_file": files * 2 / sum(serial),
        "removal": files * 2 / sum(bulk),
    }
    return {"files": files, "files_per_second": {step: round(value) for step, value in rate.items()}} | {
        "removal_ratio": round(sum(serial) / sum(bulk), 2)
    }


def main() -> None:
    count_and_print(__doc__, "chunk_files.py", "files", 5000, measure)


if __name__ == "__main__":
    main()
