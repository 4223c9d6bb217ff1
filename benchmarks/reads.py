"""Small objects read whole, against the local S3 server (SeaweedFS on loopback):

    .venv/bin/python benchmarks/reads.py --objects 3000 [--record]

N objects of 60 KB (a JPEG's size) read by 16 threads two ways, side by side, each twice, A B B A: by a
plain `cat_file`, for which s3fs first asks the object's size (a HEAD), as the pipeline read images,
markers and records before `pipeline/objects.py`, and by `read_object`, one GET with a range from byte 0.
Prints one JSON line: objects per second and S3 requests per object for each way.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import s3fs

from benchmarks.common import count_and_print
from dinat_batch.infra.object_store import LocalObjectStore
from dinat_batch.pipeline.objects import read_object
from dinat_batch.pipeline.parallel import in_threads

FOLDER = "bench/images"
OBJECT_BYTES = 60_000


def measure(objects: int) -> dict:
    requests = Counter[str]()
    call = s3fs.S3FileSystem._call_s3

    async def counted(fs, method, *args, **kwargs):
        requests[method] += 1
        return await call(fs, method, *args, **kwargs)

    with LocalObjectStore() as store:
        store.make_bucket("bench")
        fs = store.filesystem()
        data = os.urandom(OBJECT_BYTES)
        paths = [f"{FOLDER}/{i:08d}.jpg" for i in range(objects)]
        in_threads(lambda path: fs.pipe_file(path, data), paths)
        s3fs.S3FileSystem._call_s3 = counted
        ways = {"cat_file": fs.cat_file, "read_object": lambda path: read_object(fs, path)}
        seconds: dict[str, float] = Counter()
        asked: dict[str, int] = Counter()
        try:
            for way in ("cat_file", "read_object", "read_object", "cat_file"):
                requests.clear()
                start = time.monotonic()
                read = in_threads(ways[way], paths)
                seconds[way] += time.monotonic() - start
                asked[way] += sum(requests.values())
                assert all(len(found) == OBJECT_BYTES for found in read)
        finally:
            s3fs.S3FileSystem._call_s3 = call
    result: dict = {"objects": objects}
    for way in ways:
        result[way] = {
            "objects_per_second": round(2 * objects / seconds[way]),
            "requests_per_object": round(asked[way] / (2 * objects), 2),
        }
    result["speed_ratio"] = round(
        result["read_object"]["objects_per_second"] / result["cat_file"]["objects_per_second"], 2
    )
    return result


def main() -> None:
    count_and_print(__doc__, "reads.py", "objects", 3000, measure)


if __name__ == "__main__":
    main()
