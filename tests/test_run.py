"""The pipeline end to end on a real Ray and a real S3 server: every input kind, from s3:// and local
paths, read back with pyarrow and DuckDB, and checked against the model runtime called directly."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.data.context import AutoscalingConfig

from dinat_batch.pipeline import run as run_module
from dinat_batch.pipeline.config import DRIVER_CPUS, ConfigError, RunConfig
from dinat_batch.pipeline.faults import ENV, SimulatedCrash
from dinat_batch.pipeline.locations import filesystem
from dinat_batch.pipeline.model import ModelChanged, ModelLoadError, load_model
from dinat_batch.pipeline.output import Output, VerificationFailed
from dinat_batch.pipeline.run import (
    ActorsFailedToStart,
    Stalled,
    StallGuard,
    _actors,
    _live_nodes,
    ray_connection,
    refuse_node_local_paths,
    run,
    stall_guard,
)
from dinat_batch.pipeline.stages import decode, infer, read
from dinat_batch.pipeline.stages.infer import Actors, ActorSettings
from dinat_batch.pipeline.stages.write import output_schema
from tests.data import (
    MAX_PIXELS,
    TINY,
    broken_files,
    direct_predictions,
    image_folder,
    parquet_file,
    photo,
    photos,
    tar_shard,
    tiny_checkpoint,
)
from tests.web import serving


@dataclass
class Place:
    """A folder on the local disk or a prefix in the S3 server, written and read through fsspec."""

    root: str
    storage_options: dict[str, Any]

    def uri(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def put(self, files: dict[str, bytes], under: str) -> dict[str, bytes]:
        """Write files; returns them keyed by the URI the pipeline will report."""
        written = {}
        for name, data in files.items():
            uri = self.uri(f"{under}/{name}")
            fs, path = filesystem(uri, self.storage_options)
            fs.makedirs(fs._parent(path), exist_ok=True)
            fs.pipe_file(path, data)
            written[uri] = data
        return written

    def read(self, name: str) -> pa.Table:
        fs, path = fsspec.core.url_to_fs(self.uri(name), **self.storage_options)
        fs.invalidate_cache()
        return pq.read_table(path, filesystem=fs)

    def manifest(self, name: str) -> dict:
        with fsspec.open(self.uri(f"{name}/_SUCCESS"), "rb", **self.storage_options) as f:
            return json.loads(f.read())


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path, object_store):
    if request.param == "local":
        return Place(str(tmp_path), {})
    bucket = "pipeline-runs"
    object_store.make_bucket(bucket)
    return Place(
        f"s3://{bucket}/{request.node.name.replace('[', '-').rstrip(']')}", object_store.storage_options
    )


# the readers' code paths differ little between stores, and every run costs seconds of Ray start-up: globs
# and shards run on S3, the main target; local files and local URI tables are covered by the other tests
ON_S3_ONLY = pytest.mark.parametrize("place", ["s3"], indirect=True)


def run_on(place: Place, tiny_model: Path, input: str, **config):
    summary = run(
        {
            "input": place.uri(input),
            "output": place.uri("out"),
            "model": str(tiny_model),
            "batch_size": 4,
            "max_pixels": MAX_PIXELS,
            "storage_options": place.storage_options,
            **config,
        }
    )
    return summary, place.read("out")


def assert_secret_nowhere(place: Place, table: pa.Table) -> None:
    """The secret key is in no row, not in the manifest and not in any log of the Ray session."""
    secret = place.storage_options.get("secret")
    if secret is None:
        return
    assert secret not in json.dumps(table.drop_columns(["embedding"]).to_pylist(), default=str)
    assert secret not in json.dumps(place.manifest("out"))
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    leaked = [path for path in logs.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]
    assert leaked == []


def check_table(table: pa.Table, good: dict[str, bytes], errors: dict[str, str], tiny_model: Path, top_k=5):
    """Exactly one row per input, the schema to the letter, predictions equal to the runtime's."""
    assert table.schema.remove_metadata() == output_schema(TINY.num_features)
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == len(good) + len(errors)
    assert set(keys) == set(good) | set(errors)
    rows = {row["key"]: row for row in table.to_pylist()}
    for key, kind in errors.items():
        row = rows[key]
        assert row["status"] == "error" and row["error"].startswith(kind), row["error"]
        assert row["embedding"] is None and row["labels"] is None and row["width"] is None
    expected = direct_predictions(tiny_model, good, top_k)
    for key, (ids, scores, embedding) in expected.items():
        row = rows[key]
        assert row["status"] == "ok" and row["error"] is None
        assert row["label_ids"] == ids
        assert row["labels"] == [TINY.id2label[i] for i in ids]
        np.testing.assert_allclose(row["scores"], scores, atol=1e-5)
        np.testing.assert_allclose(row["embedding"], embedding, atol=1e-4)
        assert row["width"] > 0 and row["height"] > 0
    assert {row["model_sha256"] for row in rows.values()} == {load_model(str(tiny_model)).weights_sha256}


def test_image_files_with_broken_ones(place, tiny_model, ray_session):
    good = place.put(photos(4), "images/a") | place.put(photos(3, start=4), "images/b")
    good |= place.put(
        {"UPPER.JPEG": photo(50), "_underscore.jpg": photo(51), ".dotted.png": photo(52, "PNG")}, "images"
    )
    # names fsspec alone reads as chains of filesystems (`images/a`), listed and read as they are
    good |= place.put({"x::y.jpg": photo(54)}, "images") | place.put({"c.jpg": photo(55)}, "images/a::b")
    place.put({"skipped.jpg": photo(53)}, "images/_staging")  # a bookkeeping folder, not input
    broken = broken_files()
    errors = {
        uri: broken[uri.rsplit("/", 1)[1]][1]
        for uri in place.put({n: d for n, (d, _) in broken.items()}, "images")
    }
    place.put({"notes.txt": b"not an image extension: not an input", "_SUCCESS": b""}, "images")

    summary, table = run_on(place, tiny_model, "images", top_k=5)

    check_table(table, good, errors, tiny_model)
    assert (summary.images, summary.ok, summary.errors) == (len(good) + len(errors), len(good), len(errors))
    assert summary.input_format == "files" and summary.device == "cpu"
    assert sum(summary.errors_by_kind.values()) == len(errors)
    manifest = place.manifest("out")
    assert manifest["run_id"] == summary.run_id and manifest["ok"] == len(good)
    assert_secret_nowhere(place, table)
    predictions = table  # noqa: F841 (DuckDB finds the Arrow table by its variable name)
    counts = duckdb.sql("SELECT status, count(*) FROM predictions GROUP BY status ORDER BY status").fetchall()
    assert counts == [("error", len(errors)), ("ok", len(good))]


@ON_S3_ONLY
def test_glob_selects_matching_files_only(place, tiny_model, ray_session):
    files = place.put(photos(4), "images")
    pngs = {uri: data for uri, data in files.items() if uri.endswith(".png")}
    _, table = run_on(place, tiny_model, "images/*.png", top_k=3)
    check_table(table, pngs, {}, tiny_model, top_k=3)


@ON_S3_ONLY
def test_webdataset_shards(place, tiny_model, ray_session):
    first = tar_shard(
        [
            ("0001.jpg", photo(1)),
            ("0001.json", b"{}"),
            ("0002.png", photo(2, "PNG")),
            ("0002.cls", b"3"),
            ("0003.json", b"{}"),
            ("deep/0004.jpg", photo(4)),
            ("../escape.jpg", photo(5)),
        ]
    )
    second = tar_shard([("0006.jpg", b"corrupt"), ("0007.jpg", photo(7)), ("0007.webp", photo(8, "WEBP"))])
    cut = tar_shard([("0008.jpg", photo(9)), ("0009.jpg", photo(10, size=(200, 200)))])
    cut = cut[: 1024 + len(photo(9)) // 512 * 512 + 512 + 512 + 300]  # ends inside 0009.jpg's data
    shards = place.put({"s-0.tar": first, "s-1.tar": second, "s-2.tar": cut}, "shards")
    s0, s1, s2 = (uri for uri in shards)
    good = {
        f"{s0}#0001": photo(1),
        f"{s0}#0002": photo(2, "PNG"),
        f"{s0}#deep/0004": photo(4),
        f"{s0}#../escape": photo(5),
        f"{s1}#0007.jpg": photo(7),
        f"{s1}#0007.webp": photo(8, "WEBP"),
        f"{s2}#0008": photo(9),
    }
    errors = {
        f"{s0}#0003": "NoImage",
        f"{s1}#0006": "ImageDecodeError(undecodable)",
        f"{s2}#<unreadable after member 0008.jpg>": "ShardError",
    }
    summary, table = run_on(place, tiny_model, "shards")
    assert summary.input_format == "webdataset"
    check_table(table, good, errors, tiny_model)


def test_parquet_bytes_and_uris(place, tiny_model, ray_session, tmp_path):
    images = [photo(20), photo(21, "PNG"), None, b""]
    plain = pa.table({"id": [1, 2, 3, 4], "image": pa.array(images, pa.binary())})
    hf = pa.table({"image": pa.array([{"bytes": photo(22), "path": "x.jpg"}])})
    tables = place.put({"part-0.parquet": parquet_file(plain), "part-1.parquet": parquet_file(hf)}, "table")
    t0, t1 = tables
    good = {f"{t0}#0": photo(20), f"{t0}#1": photo(21, "PNG"), f"{t1}#0": photo(22)}
    errors = {f"{t0}#2": "MissingImage", f"{t0}#3": "ImageDecodeError(empty)"}
    summary, table = run_on(place, tiny_model, "table")
    assert summary.input_format == "parquet"
    check_table(table, good, errors, tiny_model)

    files = place.put(photos(3), "listed")
    missing = place.uri("listed/missing.jpg")
    forbidden = [
        "file:///proc/self/environ",  # the job's credentials
        "/dev/zero",  # reads until the worker dies
        "http://169.254.169.254/latest/meta-data/",  # the cloud's instance credentials
        "s3://another-bucket/x.jpg",
        place.uri("listed/../../../elsewhere/x.jpg"),
        place.uri("listed/[x]/../../../../elsewhere/x.jpg"),  # a glob character is no cut-off point
    ]
    first = next(iter(files))
    served = photos(2, start=30)
    for name, data in served.items():
        (tmp_path / name).write_bytes(data)
    with serving(tmp_path) as web:
        # web URLs beside the store's: they must not get its options (an S3 endpoint broke aiohttp)
        web_files = {f"{web}/{name}": data for name, data in served.items()}
        uris = pa.table({"uri": [*files, missing, None, *forbidden, first, *web_files]})
        (index,) = place.put({"index.parquet": parquet_file(uris)}, "index")
        # the local place has no bucket: it names where the table may point (an S3 table: its own bucket)
        own = place.uri("listed") if place.root.startswith("/") else "s3://" + place.uri("").split("/")[2]
        summary, table = run_on(
            place, tiny_model, "index", uri_column="uri", overwrite=True, allowed_uri_prefixes=[own, web]
        )
    refused = {uri: "ForbiddenURI" for uri in forbidden}
    repeated = {f"{index}#{len(files) + 2 + len(forbidden)}": files[first]}  # listed twice: keyed by row
    check_table(
        table,
        files | repeated | web_files,
        {missing: "ReadError", f"{index}#4": "MissingImage"} | refused,
        tiny_model,
    )
    assert summary.retryable_errors == 1 and summary.errors_by_kind["ForbiddenURI"] == len(forbidden)
    errors = " ".join(table.column("error").drop_null().to_pylist())
    assert "AWS_" not in errors and "PATH=" not in errors  # nothing of /proc/self/environ
    assert_secret_nowhere(place, table)


def test_refusals_before_any_work(place, tiny_model, ray_session):
    place.put(photos(1), "images")
    with pytest.raises(ValueError, match="lies inside the input"):
        run_on(place, tiny_model, "images", output=place.uri("images/out"))
    with pytest.raises(ValueError, match=r"lies inside the output .* --overwrite would delete it"):
        run_on(place, tiny_model, "images", output=place.uri(""), overwrite=True)
    with pytest.raises(ModelLoadError):
        run_on(place, tiny_model, "images", model=place.uri("no-such-model"))
    with pytest.raises(ConfigError, match="does not exist"):
        run_on(place, tiny_model, "nothing-here")
    with pytest.raises(ConfigError, match=r"decode: gpu cannot run here: .*GPU inference actors"):
        run_on(place, tiny_model, "images", decode="gpu")
    fs, out = fsspec.core.url_to_fs(place.uri("out"), **place.storage_options)
    files = fs.find(out, detail=True) if fs.exists(out) else {}
    assert [path for path, info in files.items() if info["type"] == "file"] == []  # SeaweedFS keeps folders
    run_on(place, tiny_model, "images")
    with pytest.raises(ConfigError, match="already holds a run that finished"):
        run_on(place, tiny_model, "images")


@pytest.mark.parametrize("some", [False, True], ids=["all", "some"])
def test_jpeg_bytes_sent_on_to_the_actors_give_the_same_rows(
    tmp_path, tiny_model, ray_session, monkeypatch, some
):
    """The GPU decoding route through Ray on a CPU: the driver is told GPU decoding can run, so the CPU
    stage sends JPEG bytes on, all of them or a share (actor calls then mix bytes and pixels); the CPU
    actor has no GPU decoder and decodes them itself, image by image."""
    monkeypatch.setattr("dinat_batch.pipeline.run.unsupported", lambda preprocessing, device: None)
    apply = decode.apply
    place = Place(str(tmp_path), {})
    good = place.put(photos(12), "images")
    broken = broken_files()
    errors = {
        uri: broken[uri.rsplit("/", 1)[1]][1]
        for uri in place.put({n: d for n, (d, _) in broken.items()}, "images")
    }
    # a share that sends some of these JPEGs and keeps others, whatever the folder's name hashes to
    jpegs = [uri for uri in good if uri.endswith(".jpg")]
    hashes = sorted(zlib.crc32(uri.encode()) / 2**32 for uri in jpegs)
    share = (hashes[0] + hashes[-1]) / 2 if some else 1.0
    assert {decode.to_device(uri, share) for uri in jpegs} == ({True, False} if some else {True})
    given = []
    monkeypatch.setattr(decode, "apply", lambda *args: given.append(args[3]) or apply(*args))
    summary, table = run_on(
        place, tiny_model, "images", decode="gpu", **({"device_decode_share": share} if some else {})
    )
    assert (summary.decode, summary.device_decode_share, summary.device) == ("gpu", share, "cpu")
    assert given == [share]  # what the decode stage was built with
    check_table(table, good, errors, tiny_model)


def test_without_an_address_a_run_starts_its_own_ray(monkeypatch):
    """Not whatever a stale `ray_current_cluster` file names: that waits a minute for a dead head."""
    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(ray._private.utils, "get_num_cpus", lambda: 1)
    with ray_connection(None):
        pass
    # one CPU of Ray's would go to the inference actor, leaving the decode tasks none: two are declared
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] == 2 and calls[1] == "shutdown"
    with ray_connection("ray://head:10001"):
        pass
    # it leaves a cluster it joined (the cluster stays up), and touches none it found joined
    assert calls[2]["address"] == "ray://head:10001" and calls[3] == "shutdown"
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    with ray_connection("ray://head:10001"):
        pass
    assert len(calls) == 4


STALLED_DRIVER = """
import time, ray
from dinat_batch.pipeline import run
ray.nodes = lambda: []  # a cluster that lost every node
try:
    with run.stall_guard(1):
        for _ in range(600):  # a driver waits on Ray in short steps, where the interrupt lands
            time.sleep(0.1)
except run.Stalled:
    print("stalled")
"""


@pytest.mark.parametrize("step", ["listing", "nightly ledger"])
def test_the_stall_guard_covers_the_steps_before_and_after_the_stages(
    step, tmp_path, tiny_model, ray_session, monkeypatch
):
    """The cluster loses its last node while the inputs are listed, or while a nightly run writes its
    ledger (both wait on Ray tasks): the run stops as stalled, nothing committed."""
    from dinat_batch.jobs.nightly import Table, nightly

    lost = threading.Event()
    # the guard's view of the nodes, not ray.nodes: Ray Data takes that as a default argument at its first
    # use in the process, and a lock in this test's closure would then fail to pickle
    monkeypatch.setattr(run_module, "_live_nodes", lambda: [] if lost.is_set() else _live_nodes())

    def waits_on_lost_tasks(*args, **kwargs):
        lost.set()
        for _ in range(1200):  # in short steps, as a driver waits on Ray: where the interrupt lands
            time.sleep(0.1)

    source = tmp_path / "images"
    source.mkdir()
    (source / "a.jpg").write_bytes(photo(1))
    config = RunConfig(input=str(source), output=str(tmp_path / "out"), model=str(tiny_model))
    if step == "nightly ledger":
        nightly(config, dt.date(2026, 11, 24))  # the image is read: the next date has nothing new to infer
    # the guard alone at 1 s: Ray Data's own guard would stop an execution, not the steps around it
    config = config.model_copy(update={"stall_timeout": 1})
    target = (read, "list_objects") if step == "listing" else (Table, "write_ledger")
    monkeypatch.setattr(*target, waits_on_lost_tasks)
    started = time.monotonic()
    with pytest.raises(Stalled, match="made no progress for 1 s"):
        run(config) if step == "listing" else nightly(config, dt.date(2026, 11, 25))
    assert lost.is_set() and time.monotonic() - started < 60
    assert [path.parent.name for path in (tmp_path / "out").rglob("_SUCCESS")] == (
        [] if step == "listing" else ["run_date=2026-11-24"]
    )


def test_a_listing_ray_rebuilt_with_other_rows_commits_nothing(
    tmp_path, tiny_model, ray_session, monkeypatch
):
    """Ray rebuilds a lost block of the listing by running its listing task again; if the folder changed
    meanwhile (and that task cut a folder the first one listed whole), the block holds other rows. Here
    the rebuilt listing lacks one image: the run refuses to commit rather than call the rest the input."""
    source = tmp_path / "images"
    source.mkdir()
    for i in range(3):
        (source / f"{i}.jpg").write_bytes(photo(i))
    real = run_module.digest

    def rebuilt(listing, column):
        return real(listing.filter(lambda row: not row["uri"].endswith("0.jpg")), column)

    monkeypatch.setattr(run_module, "digest", rebuilt)
    config = RunConfig(input=str(source), output=str(tmp_path / "out"), model=str(tiny_model))
    with pytest.raises(VerificationFailed, match=r"held 3 images and holds 2 now.*nothing was committed"):
        run(config)
    assert not list((tmp_path / "out").rglob("_SUCCESS"))


def test_a_listing_that_changed_while_the_run_was_planned_is_refused(
    tmp_path, tiny_model, ray_session, monkeypatch
):
    """The same, while the input kind is chosen: the listing read again holds one object fewer than its
    blocks did when they were made."""
    rows = [{"uri": f"{tmp_path}/images/{i}.jpg", "size": 1, "version": ""} for i in range(3)]
    listing = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=read.LISTING)).materialize()
    real = read._kind_counts
    monkeypatch.setattr(read, "_kind_counts", lambda batch: real(batch.slice(1)))
    config = RunConfig(input=str(tmp_path / "images"), output=str(tmp_path / "out"), model=str(tiny_model))
    with pytest.raises(VerificationFailed, match=r"held 3 objects and holds 2 now.*nothing was written"):
        read.choose_kind(config, listing)


def test_cpu_actors_that_would_hold_every_cpu_are_refused_before_any_work(tmp_path, tiny_model, ray_session):
    """Each actor holds a CPU for the whole run: with all of them held, no read or decode task starts and
    the run would wait out its stall_timeout."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(photo(1))
    cpus = int(ray.cluster_resources()["CPU"])
    config = RunConfig(
        input=str(tmp_path / "images"),
        output=str(tmp_path / "out"),
        model=str(tiny_model),
        device="cpu",
        min_actors=cpus,
        max_actors=cpus,
    )
    with pytest.raises(ConfigError, match=f"starts with {cpus} actors .* none would be left for the read"):
        run(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("device", "smallest", "total", "free", "refused", "warned"),
    [
        ("cpu", 2, 2, 2, "set min_actors to at most 1, or run on more CPUs", False),
        ("cpu", 1, 1, 1, "(0.5 each); run on more CPUs", False),
        ("cpu", 1, 2, 1, None, True),  # another job holds the other: it may yet be freed
        ("cpu", 1, 1.5, 1.5, None, False),
        ("cpu", 2, 2, 1, "at most 1", False),  # refused before it is warned about
        ("cpu", 3, 4, 4, None, False),
        ("cpu", 8, 0, 0, None, False),  # an autoscaler's cluster that declares no CPU yet
        ("cuda", 4, 4, 4, None, False),  # GPU nodes bring CPUs with them
    ],
)
def test_the_cpus_a_pool_leaves_to_the_tasks(device, smallest, total, free, refused, warned, caplog):
    """What the cluster's CPUs leave the read and decode tasks (0.5 CPU each) beside the pool's actors."""
    actors = Actors(device, int(device == "cuda"), smallest, None, {})
    check = functools.partial(run_module._leave_cpus, actors, {"CPU": total}, {"CPU": free}, 60)
    if refused is None:
        check()
    else:
        with pytest.raises(ConfigError, match=re.escape(refused)):
            check()
    assert ("the read and decode tasks wait for other work to free CPUs" in caplog.text) == warned


def test_a_submitted_jobs_driver_cpus_are_not_the_pools(monkeypatch, caplog):
    """`dinat-batch submit` reserves CPUs for the job's driver for the whole run: a pool that needs them
    would stall as surely as one that needs every CPU."""
    monkeypatch.setenv(DRIVER_CPUS, "1")
    actors = Actors("cpu", 0, 1, 1, {})
    with pytest.raises(ConfigError, match=r"1 of them held by this job's driver .*; run on more CPUs"):
        run_module._leave_cpus(actors, {"CPU": 2}, {"CPU": 1}, 60)
    run_module._leave_cpus(actors, {"CPU": 3}, {"CPU": 2}, 60)
    assert "free now" not in caplog.text


@pytest.mark.parametrize("kind", ["files", "parquet"])
def test_actors_asking_for_a_resource_no_node_has_stall_naming_it(
    kind, tmp_path, tiny_model, ray_session, caplog
):
    """A misspelt actor_resources: no actor can start anywhere. The plan warns at once; the run stops as
    stalled and names what no node has and the name the node declares, instead of waiting for an actor
    for ever; nothing is committed. Image files and tables take two routes to the stages."""
    source = tmp_path / "images"
    source.mkdir()
    if kind == "files":
        (source / "a.jpg").write_bytes(photo(1))
    else:
        table = pa.table({"image": pa.array([photo(1)], pa.binary())})
        (source / "part-0.parquet").write_bytes(parquet_file(table))
    config = RunConfig(
        input=str(source),
        output=str(tmp_path / "out"),
        model=str(tiny_model),
        actor_resources={"inferense": 1},
        stall_timeout=2,
    )
    asks = r"no live node has inferense 1; actor_resources asks for inferense \(did you mean inference\?\)"
    with pytest.raises(Stalled, match=asks):
        run(config)
    assert "asks for inferense, which no node of the cluster declares now" in caplog.text
    assert not list((tmp_path / "out").rglob("_SUCCESS"))


def test_the_stall_guard_stops_a_driver_that_ignores_sigint():
    """A driver started in the background by a shell script ignores SIGINT, the signal the stall guard
    interrupts the run with: the run still stops as stalled."""
    done = subprocess.run(
        [sys.executable, "-c", STALLED_DRIVER],
        capture_output=True,
        text=True,
        timeout=50,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert done.stdout.strip() == "stalled", done.stderr[-3000:]


def test_local_paths_on_a_cluster_of_several_nodes_need_a_shared_filesystem(tmp_path, tiny_model):
    local = RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(tiny_model))
    refuse_node_local_paths(local, nodes=1)  # one machine: its disk is everyone's
    with pytest.raises(ConfigError) as refused:
        refuse_node_local_paths(local, nodes=3)
    message = str(refused.value)
    assert "input" in message and "output" in message and "model" in message and "3 nodes" in message
    assert "shared_filesystem" in message
    refuse_node_local_paths(local.model_copy(update={"shared_filesystem": True}), nodes=3)
    remote = RunConfig(input="s3://b/in", output="s3://b/out", model="shi-labs/dinat-mini-in1k-224")
    refuse_node_local_paths(remote, nodes=3)  # object storage, and a hub id that is no local path
    with pytest.raises(ConfigError, match="output"):
        refuse_node_local_paths(remote.model_copy(update={"output": "file:///mnt/out"}), nodes=3)
    with pytest.raises(ConfigError, match="model"):
        refuse_node_local_paths(remote.model_copy(update={"model": f"file://{tiny_model}"}), nodes=3)


def test_a_run_on_several_nodes_refuses_a_local_output_before_any_write(
    tmp_path, tiny_model, ray_session, monkeypatch
):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(photo(1))
    nodes = ray.nodes()
    monkeypatch.setattr(ray, "nodes", lambda: [*nodes, {**nodes[0], "NodeID": "other", "Alive": True}])
    config = {"input": str(images), "output": str(tmp_path / "out"), "model": str(tiny_model)}
    with pytest.raises(ConfigError, match="2 nodes"):
        run(config)
    assert not (tmp_path / "out").exists()  # not even a lease


@pytest.mark.parametrize(
    ("gpus", "settings", "expected"),
    [
        (0, {"device": "cuda"}, ("cuda", 1, 1, None)),  # an autoscaling cluster before its first GPU node
        (4, {}, ("cuda", 1, 1, None)),  # not bounded by the GPUs present at the start
        (4, {"min_actors": 2, "max_actors": 3}, ("cuda", 1, 2, 3)),
        (0, {}, ("cpu", 0, 1, 1)),
        (0, {"max_actors": 3, "cpu_threads": 1}, ("cpu", 0, 1, 3)),
    ],
)
def test_actor_pool_grows_with_the_cluster_by_default(gpus, settings, expected):
    config = RunConfig(input="s3://b/in", output="s3://b/out", model="m", **settings)
    actors = _actors(config, {"CPU": 8, "GPU": gpus}, [{"CPU": 8, "GPU": gpus}])
    assert (actors.device, actors.num_gpus, actors.min_size, actors.max_size) == expected


@pytest.mark.parametrize(
    ("settings", "nodes", "lanes", "threads"),
    [
        ({}, [{"CPU": 4}, {"CPU": 12.0}, {"CPU": 2}], 12, 1),  # a one-thread lane per core of the largest
        ({"cpu_threads": 3}, [{"CPU": 12}], 3, 1),
        ({"compile": "on"}, [{"CPU": 12}], 1, 12),  # Dynamo compiles and guards per thread: one lane
        ({"compile": "on", "cpu_threads": 3}, [{"CPU": 12}], 1, 3),
        ({}, [{"CPU": 0.5}], 1, 1),
        ({}, [{"memory": 1e9}], infer.process_cpus(), 1),  # no CPUs declared yet: this process's
        ({"actor_resources": {"big": 1}}, [{"CPU": 32}, {"CPU": 8, "big": 2}], 8, 1),  # where they may run
        ({"actor_resources": {"big": 1}}, [{"CPU": 32}], infer.process_cpus(), 1),
        ({"device": "cuda"}, [{"CPU": 12, "GPU": 1}], 1, None),  # one thread feeds a GPU
    ],
)
def test_an_actor_runs_its_model_in_lanes_over_the_cores_of_the_largest_node(settings, nodes, lanes, threads):
    config = RunConfig(input="s3://b/in", output="s3://b/out", model="m", **settings)
    resources = {name: sum(node.get(name, 0) for node in nodes) for name in ("CPU", "GPU")}
    actors = _actors(config, resources, nodes)
    assert (actors.lanes, actors.threads) == (lanes, threads)


def test_an_actor_on_a_node_smaller_than_planned_uses_the_cpus_it_has(ray_session):
    (declared,) = (int(node["Resources"]["CPU"]) for node in ray.nodes() if node["Alive"])
    has = min(declared, infer.process_cpus())  # and on a machine of fewer cores, those
    planned = [(has + 3, 1), (1, has + 3), (has, 1), (1, None)]
    here = ray.remote(num_cpus=0)(lambda *plan: infer.on_this_node(*plan, infer.node_resources()))
    assert ray.get([here.remote(*plan) for plan in planned]) == [(has, 1), (1, has), *planned[2:]]
    assert infer.on_this_node(has + 3, 1, {}) == (has + 3, 1)  # outside Ray: as planned


def test_an_actor_uses_no_more_cores_than_its_process_may(monkeypatch):
    """A local Ray declares two CPUs on a machine (or in a container) of one (`local_cpus`)."""
    monkeypatch.setattr(infer, "process_cpus", lambda: 1)
    assert infer.on_this_node(2, 1, {"CPU": 2}) == (1, 1)
    assert infer.on_this_node(1, 2, {"CPU": 2}) == (1, 1)


def test_the_inference_stage_scales_its_pool_for_two_calls_per_lane(tiny_model, ray_session):
    settings = ActorSettings(model=str(tiny_model), run_id="r", top_k=1, device="cpu")
    actors = Actors("cpu", 0, 1, 2, {})
    inferred = infer.apply(ray.data.from_items([{"key": "a"}]), settings, actors)
    wanted = infer.autoscaling(AutoscalingConfig())
    assert inferred.context.autoscaling_config == wanted != AutoscalingConfig()
    assert inferred.context.max_consecutive_actor_init_deaths == infer.FAILED_STARTS
    current = ray.data.DataContext.get_current()  # the run's own
    assert (current.autoscaling_config, current.max_consecutive_actor_init_deaths) == (AutoscalingConfig(), 0)


def test_the_split_of_a_listing_of_files_runs_ahead_and_no_other_read_does(ray_session):
    """The split that feeds read tasks may run SPLIT_AHEAD_BLOCKS ahead of Ray Data's executor, on the
    run's datasets only; shards' and tables' tasks give many large blocks each and keep Ray's bound."""
    config = RunConfig(input="s3://b/in", output="s3://b/out", model="m")
    listing = ray.data.from_arrow(pa.table({"uri": ["s3://b/in/a.jpg"], "size": [1], "version": ["v"]}))
    default = ray.data.DataContext.get_current()._max_num_blocks_in_streaming_gen_buffer
    assert default < read.SPLIT_AHEAD_BLOCKS
    files = read.dataset("files", listing, config, None, ("s3://b/out/_sources", None), 32, 224 * 224 * 3)
    assert files.context._max_num_blocks_in_streaming_gen_buffer == read.SPLIT_AHEAD_BLOCKS
    assert ray.data.DataContext.get_current()._max_num_blocks_in_streaming_gen_buffer == default
    # the listing the caller holds, and what else is made from it (the commit's digest), keep Ray's
    assert listing.context._max_num_blocks_in_streaming_gen_buffer == default
    assert listing.select_columns(["uri"]).context._max_num_blocks_in_streaming_gen_buffer == default
    shards = ray.data.from_arrow(pa.table({"uri": ["s3://b/in/a.tar"], "size": [1], "version": ["v"]}))
    for kind in ("webdataset", "parquet"):
        rows = read.dataset(kind, shards, config, None, ("s3://b/out/_sources", None), 32, 224 * 224 * 3)
        assert rows.context._max_num_blocks_in_streaming_gen_buffer == default


@pytest.mark.parametrize(
    ("gpus", "custom", "asks"),
    [
        (4, {}, {"GPU": 1}),
        (0, {}, {}),
        (4, {"inference": 1}, {"GPU": 1, "inference": 1}),
        (0, {"slot": 0.5}, {"slot": 0.5}),
    ],
)
def test_actors_ask_for_their_gpu_and_custom_resources(gpus, custom, asks):
    """What a node must have for an actor to start: the stall guard waits for one that has it all."""
    config = RunConfig(input="s3://b/in", output="s3://b/out", model="m", actor_resources=custom)
    actors = _actors(config, {"CPU": 8, "GPU": gpus}, [{"CPU": 8, "GPU": gpus}])
    assert actors.resources == custom and actors.asks() == asks


def test_the_stall_guard_wants_one_node_with_all_an_actor_asks_for_while_the_stages_run():
    guard = StallGuard()
    apart = [{"CPU": 8, "GPU": 1}, {"CPU": 8, "inference": 1}]
    with guard.inferring({"GPU": 1, "inference": 1}):
        assert guard.missing(apart) == ["GPU 1 + inference 1"]  # each somewhere, never together
        assert guard.missing([{"CPU": 8, "GPU": 1, "inference": 1}]) == []
        assert guard.missing([]) == ["CPU", "GPU 1 + inference 1"]
    assert guard.missing([{"CPU": 8}]) == []  # before and after the stages: CPUs are enough
    with guard.inferring({"inferense": 1}):
        assert "did you mean inference?" in guard.explain(apart)
        assert "did you mean" not in guard.explain([])  # no node at all: nothing to tell about spelling


def test_the_actors_nodes_may_go_once_the_stages_have_run(tmp_path, tiny_model, ray_session, monkeypatch):
    """An autoscaler lets the idle inference nodes go once the stages end: the compaction that follows
    runs on the CPUs left, and is no stall however long it takes."""
    source = tmp_path / "images"
    source.mkdir()
    (source / "a.jpg").write_bytes(photo(1))
    scaled_in = threading.Event()
    looks = []  # the guard's looks at the nodes since they went

    def without_inference_slots():
        found = _live_nodes()
        if scaled_in.is_set():
            looks.append(time.monotonic())
            return [{name: amount for name, amount in node.items() if name != "inference"} for node in found]
        return found

    compact = Output.compact

    def long_compaction(*args, **kwargs):
        scaled_in.set()
        deadline = time.monotonic() + 60
        # the guard looks once a second: four looks without the slot are a stall at 1 s, were it one
        while len(looks) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)  # in short steps, as a driver waits on Ray: where a stall's interrupt lands
        return compact(*args, **kwargs)

    monkeypatch.setattr(run_module, "_live_nodes", without_inference_slots)
    monkeypatch.setattr(Output, "compact", long_compaction)
    # the guard alone at 1 s: Ray Data's own guard, with the config's timeout, would count the actor's start
    monkeypatch.setattr(run_module, "stall_guard", lambda timeout: stall_guard(1))
    config = RunConfig(
        input=str(source),
        output=str(tmp_path / "out"),
        model=str(tiny_model),
        actor_resources={"inference": 1},  # the session's node declares one (tests/conftest.py)
    )
    assert run(config).ok == 1 and len(looks) >= 4
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_weights_replaced_during_a_run_start_no_actor(tmp_path, tiny_model, ray_session, monkeypatch):
    """The driver checks the model, then the checkpoint is overwritten (here before the actors start; on a
    cluster, before an autoscaled or restarted actor starts): the actors refuse the other weights, the run
    fails saying why and commits nothing, and the same command run again uses the new weights."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    source = image_folder(tmp_path / "images", 3)
    real = run_module.check_model

    def replaced_after_the_check(config):
        checked = real(config)
        tiny_checkpoint(tmp_path / "other", seed=1)
        shutil.copy(tmp_path / "other" / "model.safetensors", model / "model.safetensors")
        return checked

    monkeypatch.setattr(run_module, "check_model", replaced_after_the_check)
    config = RunConfig(input=str(source), output=str(tmp_path / "out"), model=str(model))
    with pytest.raises(
        ModelChanged, match=r"its checkpoint is not the one the run started with.*run the same command"
    ):
        run(config)
    assert not list((tmp_path / "out").rglob("_SUCCESS"))
    monkeypatch.setattr(run_module, "check_model", real)
    summary = run(config)
    assert summary.ok == 3
    assert summary.model_sha256 == hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()


def test_actor_starts_that_fail_are_replaced_a_few_times_in_a_row(tmp_path, tiny_model, failed_starts):
    """An inference actor whose start fails (a node's bad GPU, too little memory) is replaced up to
    FAILED_STARTS times in a row; one more fails the run, saying so and with the last start's error, and
    nothing is committed. The same command run again, with starts that fail fewer times, commits."""
    for i in range(infer.FAILED_STARTS + 3):
        (failed_starts / f"start-{i}").touch()
    config = RunConfig(
        input=str(image_folder(tmp_path / "images", 3)), output=str(tmp_path / "out"), model=str(tiny_model)
    )
    message = r"an inference actor failed to start and was not replaced.*SimulatedStartFailure"
    with pytest.raises(ActorsFailedToStart, match=re.compile(message, re.DOTALL)):
        run(config)
    assert not list((tmp_path / "out").rglob("_SUCCESS"))
    assert len(list(failed_starts.iterdir())) == 2  # FAILED_STARTS + 1 starts took one each, then it stopped
    assert run(config).ok == 3
    assert not list(failed_starts.iterdir())


def test_a_resume_with_other_labels_or_preprocessing_asks_to_start_over(tmp_path, tiny_model, monkeypatch):
    """A run cut short after its rows were written, then the checkpoint's labels changed (its weights the
    same): the same command would give rows of two label sets, so it asks for --overwrite, which then
    gives the new labels to every row."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = RunConfig(
        input=str(image_folder(tmp_path / "images", 3)), output=str(tmp_path / "out"), model=str(model)
    )
    with monkeypatch.context() as patch:
        patch.setenv(ENV, "before-marker")
        with pytest.raises(SimulatedCrash):
            run(config)
    config_json = model / "config.json"
    config_json.write_text(config_json.read_text().replace('"class-', '"renamed-'))
    with pytest.raises(ConfigError, match=r"holds an unfinished run of another model.*--overwrite"):
        run(config)
    assert run(config.model_copy(update={"overwrite": True})).ok == 3
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert {label.split("-")[0] for row in rows for label in row["labels"]} == {"renamed"}
