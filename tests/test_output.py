"""The output protocol on its own and through whole runs, on local disk and the real S3 server: files the
pipeline did not write are never touched, one writer holds an output at a time, the marker goes first
and comes last, and what a marker lists is exactly one row per input."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from dinat_batch.pipeline.atomic import put_file
from dinat_batch.pipeline.config import ConfigError
from dinat_batch.pipeline.digest import KeyDigest
from dinat_batch.pipeline.faults import ENV, SimulatedCrash
from dinat_batch.pipeline.lease import Lease, LeaseHeld, LeaseLost
from dinat_batch.pipeline.output import SUCCESS, ForeignFiles, Output, VerificationFailed
from dinat_batch.pipeline.ownership import Ownership, write_table
from dinat_batch.pipeline.query import read_output
from dinat_batch.pipeline.run import run
from dinat_batch.pipeline.stages.write import output_schema
from tests.data import TINY, image_folder


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path, object_store):
    """(root URI, storage options) of an empty place on local disk or in the S3 server."""
    if request.param == "local":
        return str(tmp_path), {}
    object_store.make_bucket("protocol")
    return f"s3://protocol/{request.node.name.replace('[', '-').rstrip(']')}", object_store.storage_options


def config(source: Path, output: str, model: Path, options: dict, **fields) -> dict:
    return {
        "input": str(source),
        "output": output,
        "model": str(model),
        "storage_options": options,
        "batch_size": 4,
    } | fields


def keys_of(output: str, options: dict) -> list[str]:
    return read_output(output, options).column("key").to_pylist()


def listing(output: str, options: dict) -> dict[str, bytes]:
    fs, path = fsspec.core.url_to_fs(output, **options)
    fs.invalidate_cache()
    return {p.removeprefix(path): fs.cat_file(p) for p in fs.find(path)} if fs.exists(path) else {}


# one store here: each run costs seconds of Ray start-up; the code path differs little between stores
@pytest.mark.parametrize("where", ["local"], indirect=True)
def test_foreign_files_stop_the_run_and_survive(where, tmp_path, tiny_model, ray_session):
    root, options = where
    source = image_folder(tmp_path / "images", 3)
    fs, _ = fsspec.core.url_to_fs(root, **options)
    foreign = pa.table({"user_id": [1, 2, 3]})
    fs.makedirs(fsspec.core.url_to_fs(f"{root}/out", **options)[1], exist_ok=True)
    with fsspec.open(f"{root}/out/part-0.parquet", "wb", **options) as f:
        pq.write_table(foreign, f)
    out = fsspec.core.url_to_fs(f"{root}/out", **options)[1]
    fs.pipe_file(f"{out}/notes.txt", b"someone's notes")
    fs.makedirs(f"{out}/.tmp-upload", exist_ok=True)
    fs.pipe_file(f"{out}/.tmp-upload/precious.csv", b"a,b\n1,2\n")  # looks like a temp file: is not ours
    other = Ownership("run-1", "sha", "run-1.a", Output(f"{root}/other", options).identity)
    empty = output_schema(TINY.num_features).empty_table()
    write_table(fs, f"{out}/part-run-1-00000.parquet", empty, other)  # ours, but another output's
    before = listing(f"{root}/out", options)

    for overwrite in (False, True):
        with pytest.raises(ForeignFiles, match=r"holds 4 file\(s\) dinat-batch did not write for it: "):
            run(config(source, f"{root}/out", tiny_model, options, overwrite=overwrite))
    assert listing(f"{root}/out", options) == before  # not one byte changed, no lease left behind


def test_a_failed_read_deletes_nothing(tmp_path, tiny_model, ray_session, monkeypatch):
    """A dead attempt's files cannot be read (throttled, forbidden): the run stops with the store's error
    and every file stays, instead of being taken for a write cut off mid-way."""
    source = image_folder(tmp_path / "images", 4)
    output = str(tmp_path / "out")
    monkeypatch.setenv(ENV, "before-marker")
    with pytest.raises(SimulatedCrash):
        run(config(source, output, tiny_model, {}))
    monkeypatch.delenv(ENV)
    before = listing(output, {})
    assert any("/_staging/" in name for name in before)

    def throttled(*args, **kwargs):
        raise OSError("SlowDown: reduce your request rate")

    monkeypatch.setattr("dinat_batch.pipeline.ownership.pq.read_metadata", throttled)
    with pytest.raises(OSError, match="SlowDown"):
        run(config(source, output, tiny_model, {}))
    assert listing(output, {}) == before


@dataclass
class FooterReads:
    """Where a test's footers are read: `in_the_driver` (paths), `in_tasks` (the groups sent to Ray
    tasks, and `sent` their refs); `task` is the task the groups go to. The driver reads a group it takes
    from the tasks only once every task sent has ended (`patient`), so that it takes one at most."""

    in_the_driver: list[str] = field(default_factory=list)
    in_tasks: list[list[str]] = field(default_factory=list)
    sent: list = field(default_factory=list)
    task: Any = None
    patient: bool = True


@pytest.fixture
def footer_reads(monkeypatch) -> FooterReads:
    """A `FOOTERS_PER_TASK` of 2, so that a few files go to tasks, and the reads recorded (FooterReads)."""
    import dinat_batch.pipeline.ownership as ownership

    monkeypatch.setattr(ownership, "FOOTERS_PER_TASK", 2)
    reads = FooterReads(task=ownership._read_owners_in_a_task)
    read_owners = ownership._read_owners

    def in_the_driver(fs, files):
        if reads.patient and reads.sent:
            ray.wait(reads.sent, num_returns=len(reads.sent), timeout=60)
        reads.in_the_driver.extend(path for path, _ in files)
        return read_owners(fs, files)

    class Sent:
        @staticmethod
        def remote(fs, files):
            reads.in_tasks.append([path for path, _ in files])
            reads.sent.append(reads.task.remote(fs, files))
            return reads.sent[-1]

    monkeypatch.setattr(ownership, "_read_owners", in_the_driver)
    monkeypatch.setattr(ownership, "_read_owners_in_a_task", Sent)
    return reads


def _unowned_chunks(fs, folder: str, files: int = 5) -> list[tuple[str, None, None]]:
    """Chunk files of another output, as `Owners.of` takes them (no identity, size unknown)."""
    chunks = [(f"{folder}/chunk-00000{i}-1.parquet", None, None) for i in range(files)]
    for path, _, _ in chunks:
        write_table(fs, path, pa.table({"key": ["a"]}), Ownership("run-1", "sha", "run-1.0", "s3://x"))
    return chunks


def test_a_footer_read_that_fails_in_a_task_raises_the_stores_error(
    object_store, ray_session, footer_reads, monkeypatch
):
    """Footers read by Ray tasks fail as those read by the driver do: with the store's error, proving
    nothing (here: credentials the store refuses), not Ray's wrapper of it."""
    import s3fs

    import dinat_batch.pipeline.ownership as ownership
    from dinat_batch.pipeline.ownership import Owners

    object_store.make_bucket("protocol")
    files = _unowned_chunks(object_store.filesystem(), "protocol/unreadable")
    refused = s3fs.S3FileSystem(
        key="nobody",
        secret="wrong",
        client_kwargs={"endpoint_url": object_store.endpoint},
        skip_instance_cache=True,
    )

    # the group the driver takes reads as nobody's, once the tasks have failed: the error is theirs
    def nobodys(fs, files):
        ray.wait(footer_reads.sent, num_returns=len(footer_reads.sent), timeout=60)
        return [None] * len(files)

    monkeypatch.setattr(ownership, "_read_owners", nobodys)
    with pytest.raises(PermissionError) as raised:
        Owners(refused, spread=True).of(files)
    assert isinstance(raised.value.__cause__, ray.exceptions.RayTaskError)
    assert not isinstance(raised.value, ray.exceptions.RayTaskError)


def test_footers_are_read_by_the_driver_where_no_task_runs(
    object_store, ray_session, footer_reads, monkeypatch
):
    """No survey waits on CPUs that are not there or are taken: with no CPU in the cluster (an
    autoscaling cluster that has no workers yet) no task is sent, and the driver reads every group no
    task has finished while it waits (here tasks that no node can take)."""
    from dinat_batch.pipeline.ownership import Owners

    object_store.make_bucket("protocol")
    fs = object_store.filesystem()
    files = _unowned_chunks(fs, "protocol/no-cpus")
    paths = [path for path, _, _ in files]
    footer_reads.patient = False
    with monkeypatch.context() as patch:
        patch.setattr(ray, "cluster_resources", lambda: {"GPU": 1.0})
        assert [owner.run_id for owner in Owners(fs, spread=True).of(files)] == ["run-1"] * 5
    assert footer_reads.in_tasks == [] and sorted(footer_reads.in_the_driver) == paths
    footer_reads.in_the_driver.clear()
    footer_reads.task = footer_reads.task.options(resources={"nowhere": 1})
    assert [owner.run_id for owner in Owners(fs, spread=True).of(files)] == ["run-1"] * 5
    assert len(footer_reads.in_tasks) == 3 and sorted(footer_reads.in_the_driver) == paths
    ray.wait(footer_reads.sent, num_returns=3, timeout=30)  # each cancelled
    # tasks whose worker dies (past Ray's retries): the driver reads their groups
    footer_reads.in_the_driver.clear()
    footer_reads.patient, footer_reads.task = True, _worker_dies
    assert [owner.run_id for owner in Owners(fs, spread=True).of(files)] == ["run-1"] * 5
    assert sorted(footer_reads.in_the_driver) == paths


@ray.remote(num_cpus=0.5, max_retries=0)
def _worker_dies(fs, paths):
    os._exit(1)


# one store here: each run costs seconds of Ray start-up; the code path differs little between stores
@pytest.mark.parametrize("where", ["s3"], indirect=True)
def test_overwrite_unmarks_first_and_the_table_lists_its_files(where, tmp_path, tiny_model, ray_session):
    root, options = where
    source = image_folder(tmp_path / "images", 6)
    output = f"{root}/out"
    expected = sorted(str(path) for path in source.iterdir())
    first = run(config(source, output, tiny_model, options, rows_per_file=4))
    manifest = Output(output, options).manifest()
    assert sum(entry["rows"] for entry in manifest["files"]) == 6 and first.files == len(manifest["files"])
    assert not any("/_staging/" in name for name in listing(output, options))

    # a crash right after --overwrite removed the marker: readers see no table, never a mix
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV, "unmarked")
        with pytest.raises(SimulatedCrash):
            run(config(source, output, tiny_model, options, overwrite=True))
    assert Output(output, options).manifest() is None
    # the same command without --overwrite finishes it: the unlisted old files are not kept
    run(config(source, output, tiny_model, options, rows_per_file=4))
    assert sorted(keys_of(output, options)) == expected

    # a stray copy of one of our files that no marker lists is not read
    out = Output(output, options)
    listed = out.committed_files()
    out.fs.copy(listed[0], f"{out.path}/part-stray.parquet")
    assert sorted(keys_of(output, options)) == expected


def test_compaction_checks_one_row_per_input(tmp_path, ray_session):
    out = Output(str(tmp_path / "out"), {})
    owner = Ownership("run-1", "sha", "run-1", out.identity)
    schema = output_schema(TINY.num_features)

    def chunk(name: str, keys: list[str]) -> None:
        rows = [
            {"key": k, "status": "ok", "model": "m", "model_sha256": "sha", "run_id": "run-1"}
            | {"processed_at": 0}
            for k in keys
        ]
        write_table(
            out.fs,
            f"{out.staging('run-1')}/chunk-{name}-{len(keys)}.parquet",
            pa.Table.from_pylist(rows, schema),
            owner,
        )

    chunk("000000", ["a", "b"])
    chunk("000001", ["b"])  # a block written twice
    lease = Lease(out.fs, out.path, "run-1", 60).acquire()
    with pytest.raises(VerificationFailed, match="3 rows for 3 inputs"):
        out.compact(owner, lease, KeyDigest().add(["a", "b", "c"]), 100)
    assert out.marker() is None
    out.fs.rm_file(f"{out.staging('run-1')}/chunk-000001-1.parquet")
    with pytest.raises(VerificationFailed, match="2 rows for 3 inputs"):  # one lost
        out.compact(owner, lease, KeyDigest().add(["a", "b", "c"]), 100)
    compacted = out.compact(owner, lease, KeyDigest().add(["b", "a"]), 100)
    assert compacted.ok == 2 and [f["rows"] for f in compacted.files] == [2]
    lease.release()


def test_a_file_is_asked_whose_it_is_once_until_it_changes(where, monkeypatch):
    """Surveys read each Parquet footer once while the file stays the same; a file written over since,
    even by the same number of bytes, is read again: a chunk replaced by someone's file is theirs."""
    import dinat_batch.pipeline.ownership as ownership

    root, options = where
    out = Output(root, options)
    ours = Ownership("run-1", "sha", "run-1.0", out.identity)
    # a file of another output whose name is as long: the same bytes but one
    theirs = Ownership("run-1", "sha", "run-1.0", out.identity[:-1] + chr(ord(out.identity[-1]) ^ 1))
    table = pa.table({"key": ["a", "b"]})
    chunks = [f"{out.staging('run-1.0')}/chunk-{i:06d}-2.parquet" for i in range(2)]
    for path in chunks:
        write_table(out.fs, path, table, ours)
    write_table(out.fs, f"{out.path}/part-x.parquet", table, theirs)
    read = []
    owner_of = ownership.owner_of
    monkeypatch.setattr(
        ownership, "owner_of", lambda fs, path, size=None: read.append(path) or owner_of(fs, path, size)
    )

    def survey():
        out.fs.invalidate_cache()
        return out.survey()

    first = survey()
    assert sorted(read) == sorted([*chunks, f"{out.path}/part-x.parquet"])
    assert sorted(first.staged) == sorted(chunks) and first.foreign == [f"{out.path}/part-x.parquet"]
    read.clear()
    assert survey() == first and read == []
    write_table(out.fs, chunks[0], table, theirs)  # the same size: only its version tells
    assert out.fs.size(chunks[0]) == out.fs.size(chunks[1])
    again = survey()
    assert read == [chunks[0]]
    assert again.staged == [chunks[1]] and sorted(again.foreign) == sorted([chunks[0], *first.foreign])


def test_many_footers_are_read_by_ray_tasks_and_tell_the_same(where, ray_session, footer_reads):
    """Past a task's share of footers (a resume's million chunks), a survey of an object store sends them
    to Ray tasks, which spread over the cluster; they tell ours from someone's as the driver alone does. A local disk's are read by the driver: each node
    has a disk of its own."""
    root, options = where
    out = Output(root, options)
    ours = Ownership("run-1", "sha", "run-1.0", out.identity)
    theirs = Ownership("run-1", "sha", "run-1.0", "s3://elsewhere/out")
    table = pa.table({"key": ["a", "b"]})
    chunks = [f"{out.staging('run-1.0')}/chunk-{i:06d}-2.parquet" for i in range(5)]
    for i, path in enumerate(chunks):
        write_table(out.fs, path, table, theirs if i == 3 else ours)
    survey = out.survey()
    if out.local:
        assert sorted(footer_reads.in_the_driver) == chunks and footer_reads.in_tasks == []
    else:
        sent = footer_reads.in_tasks
        assert sorted(path for paths in sent for path in paths) == chunks
        assert sorted(map(len, sent)) == [1, 2, 2]
        # the tasks' unless none ended within STEAL_AFTER (a worker starting): then the last one sent
        assert footer_reads.in_the_driver in ([], sent[-1])
    assert survey.foreign == [chunks[3]] and sorted(survey.staged) == sorted(chunks[:3] + chunks[4:])
    assert survey.models == dict.fromkeys(survey.staged, "sha")
    assert len(out.fs.dircache) == 0  # fsspec's listing cache, ~1 KB a file listed: not kept past a survey


def test_compaction_mixes_in_no_chunk_of_someone_else_whatever_the_survey_said(tmp_path, ray_session):
    """The compaction tasks check each chunk's own metadata: a chunk the driver took for ours by mistake
    (here told so through `wrote`) stops the commit, and stays."""
    from dinat_batch.pipeline.ownership import written_identity

    out = Output(str(tmp_path / "out"), {})
    ours = Ownership("run-1", "sha", "run-1.0", out.identity)
    chunk = f"{out.staging('run-1.0')}/chunk-000000-1.parquet"
    rows = [{"key": "a", "status": "ok", "model": "m", "model_sha256": "sha", "run_id": "run-1"}]
    table = pa.Table.from_pylist(
        [row | {"processed_at": 0} for row in rows], output_schema(TINY.num_features)
    )
    write_table(out.fs, chunk, table, Ownership("run-1", "sha", "run-1.0", "/elsewhere"))
    out.wrote([written_identity(None, chunk)], ours)
    lease = Lease(out.fs, out.path, "run-1", 60).acquire()
    with pytest.raises(ForeignFiles, match=r"chunk-000000-1\.parquet was not written by dinat-batch"):
        out.compact(ours, lease, KeyDigest().add(["a"]), 100)
    lease.release()
    assert os.path.exists(chunk) and out.marker() is None


def test_a_link_is_never_ours_and_a_file_rewritten_in_place_is_read_again(tmp_path):
    """On a disk: a symbolic link to one of our files is not ours (the pipeline makes none); a chunk
    overwritten in place by someone's file of the same size, its times set back (`cp -p`), is theirs: its
    change time tells."""
    out = Output(str(tmp_path / "out"), {})
    ours = Ownership("run-1", "sha", "run-1.0", out.identity)
    theirs = Ownership("run-1", "sha", "run-1.0", out.identity[:-1] + chr(ord(out.identity[-1]) ^ 1))
    table = pa.table({"key": ["a", "b"]})
    chunk = f"{out.staging('run-1.0')}/chunk-000000-2.parquet"
    write_table(out.fs, chunk, table, ours)
    write_table(out.fs, str(tmp_path / "copy.parquet"), table, ours)
    link = Path(out.staging("run-1.0")) / "chunk-000001-2.parquet"
    link.symlink_to(tmp_path / "copy.parquet")
    first = out.survey()
    assert first.staged == [chunk] and first.foreign == [str(link)]
    write_table(out.fs, str(tmp_path / "theirs.parquet"), table, theirs)
    replacement = (tmp_path / "theirs.parquet").read_bytes()
    before = os.stat(chunk)
    assert len(replacement) == before.st_size
    time.sleep(0.05)  # past the clock tick of the first write: the inode's change time moves
    with open(chunk, "r+b") as f:
        f.write(replacement)
    os.utime(chunk, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(chunk).st_ino == before.st_ino and os.stat(chunk).st_mtime_ns == before.st_mtime_ns
    again = out.survey()
    assert again.staged == [] and sorted(again.foreign) == sorted([chunk, str(link)])


def test_a_file_gone_since_its_listing_has_no_identity(tmp_path):
    """A live run's temp file renamed between another survey's listing and its look at the file: no
    identity (the survey goes on as without one), not an error."""
    from dinat_batch.pipeline.ownership import file_identity

    out = Output(str(tmp_path / "out"), {})
    write_table(
        out.fs, f"{out.path}/part-0.parquet", pa.table({"key": ["a"]}), Ownership("r", "s", "r.0", "x")
    )
    (entry,) = out.fs.ls(out.path, detail=True)
    assert file_identity(out.fs, entry) is not None
    out.fs.rm_file(entry["name"])
    assert file_identity(out.fs, entry) is None


def test_a_run_reads_no_footer_of_the_files_it_wrote(where, tmp_path, tiny_model, ray_session, monkeypatch):
    """The write and compaction tasks say what they wrote: the run's surveys read no footer of its own
    chunks and table files; the next run, refused for the finished output, reads the table files'."""
    import dinat_batch.pipeline.ownership as ownership

    root, options = where
    source = image_folder(tmp_path / "images", 6)
    output = f"{root}/out"
    read = []
    owner_of = ownership.owner_of
    monkeypatch.setattr(
        ownership, "owner_of", lambda fs, path, size=None: read.append(path) or owner_of(fs, path, size)
    )
    summary = run(config(source, output, tiny_model, options))
    assert read == [] and summary.ok == 6
    with pytest.raises(ConfigError, match="already holds a run that finished"):
        run(config(source, output, tiny_model, options))
    assert [path.rsplit("/", 1)[1][:5] for path in read] == ["part-"] * summary.files


# one store here: each run costs seconds of Ray start-up; the code path differs little between stores
@pytest.mark.parametrize("where", ["s3"], indirect=True)
def test_one_writer_at_a_time(where, tmp_path, tiny_model, ray_session, caplog):
    root, options = where
    source = image_folder(tmp_path / "images", 3)
    output = f"{root}/out"
    out = Output(output, options)
    with (
        out.lease("first-run", 600),
        pytest.raises(LeaseHeld, match=r"run first-run on .* heartbeat \d+ s ago"),
    ):
        run(config(source, output, tiny_model, options))
    assert out.marker() is None

    # a holder silent for longer than lease_timeout is taken over, and the takeover is logged
    stale = out.lease("dead-run", 600).acquire()
    stale._stop.set()  # its heartbeat stops: the driver died
    time.sleep(1.5)
    with caplog.at_level(logging.WARNING, logger="dinat_batch.pipeline.lease"):
        summary = run(config(source, output, tiny_model, options, lease_timeout=1))
    assert summary.ok == 3
    assert any("took over the output's lease from run dead-run" in r.message for r in caplog.records)
    # the stalled driver wakes up after the new run ended; even its delayed heartbeat landing now does
    # not make the output its own again: lease numbers are never reused
    put_file(stale.fs, stale._path(stale.number), stale._record(stale.number, "then"))
    with pytest.raises(LeaseLost, match=r"run \S+ on .* took this output over"):
        stale.check()


def test_racing_runs_get_one_lease(where):
    root, options = where
    fs, path = fsspec.core.url_to_fs(f"{root}/raced", **options)
    won, refused = [], []
    barrier = threading.Barrier(4)

    def contend(name: str) -> None:
        barrier.wait()
        try:
            won.append(Lease(fs, path, name, 600, heartbeat=60).acquire())
        except LeaseHeld as err:
            refused.append(str(err))

    threads = [threading.Thread(target=contend, args=(f"run-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == 3
    assert all(f"run {won[0].run_id} " in message for message in refused)
    won[0].release()
    assert Lease(fs, path, "next", 600, heartbeat=60).holders() == []


def test_marker_lists_files_and_resume_reads_staging(tmp_path, tiny_model, ray_session, monkeypatch):
    """A run cut off before its marker keeps its chunk files; the rerun keeps their rows (resumed) and
    commits one row per input; the marker lists exactly the committed files with rows and bytes."""
    source = image_folder(tmp_path / "images", 10)
    output = str(tmp_path / "out")
    monkeypatch.setenv(ENV, "part-written")
    with pytest.raises(SimulatedCrash):
        run(config(source, output, tiny_model, {}, rows_per_file=3))
    monkeypatch.delenv(ENV)
    summary = run(config(source, output, tiny_model, {}, rows_per_file=3))
    assert summary.resumed == 10 and summary.ok == 10
    manifest = json.loads((Path(output) / SUCCESS).read_text())
    assert sum(entry["rows"] for entry in manifest["files"]) == 10
    on_disk = {p.name: p.stat().st_size for p in Path(output).glob("*.parquet")}
    assert on_disk == {entry["name"]: entry["bytes"] for entry in manifest["files"]}
    with pytest.raises(ConfigError, match="already holds a run that finished"):
        run(config(source, output, tiny_model, {}))


# one store here: each run costs seconds of Ray start-up; the code path differs little between stores
@pytest.mark.parametrize("where", ["local"], indirect=True)
def test_failed_reads_are_retried_by_the_same_command(where, tmp_path, tiny_model, ray_session, monkeypatch):
    """An input whose read fails is an error row that is not final: the summary counts it apart, and the
    same command on the finished output reads it again, keeping every other row as it was."""
    import dinat_batch.pipeline.run

    root, options = where
    source = image_folder(tmp_path / "images", 4)
    output = f"{root}/out"
    lost = source / "photo-001.png"
    saved = lost.read_bytes()
    planned = dinat_batch.pipeline.run.plan

    def listed_then_lost(*args, **kwargs):
        found = planned(*args, **kwargs)
        lost.unlink()  # gone between listing and reading
        return found

    with monkeypatch.context() as patch:
        patch.setattr(dinat_batch.pipeline.run, "plan", listed_then_lost)
        first = run(config(source, output, tiny_model, options))
    assert (first.ok, first.errors, first.retryable_errors) == (3, 1, 1)
    assert first.errors_by_kind == {"ReadError": 1}
    before = {r["key"]: r for r in read_output(output, options).to_pylist()}

    lost.write_bytes(saved)
    again = run(config(source, output, tiny_model, options))
    assert (again.ok, again.errors, again.resumed) == (4, 0, 3)
    after = {r["key"]: r for r in read_output(output, options).to_pylist()}
    assert sorted(after) == sorted(str(path) for path in source.iterdir())
    assert after[str(lost)]["status"] == "ok"
    for key, row in before.items():
        if key != str(lost):
            assert after[key]["processed_at"] == row["processed_at"]  # kept, not recomputed
    with pytest.raises(ConfigError, match="already holds a run that finished"):
        run(config(source, output, tiny_model, options))


def test_a_surveys_footer_read_is_one_request(object_store, s3_requests):
    """The survey knows each file's size from its listing: a footer is one ranged GET of the file's end,
    no HEAD first."""
    object_store.make_bucket("protocol")
    out = Output("s3://protocol/one-request", object_store.storage_options)
    ours = Ownership("run-1", "0" * 64, "run-1.0", out.identity)
    for i, rows in enumerate((1, 1, 10_000)):  # the last ~340 KB: its footer in the end read, not the file
        table = pa.table({"key": [os.urandom(16).hex() for _ in range(rows)]})
        write_table(out.fs, f"{out.staging('run-1.0')}/chunk-{i:06d}-1.parquet", table, ours)
    s3_requests.clear()
    survey = Output(out.uri, out.storage_options).survey()
    assert len(survey.chunks["run-1.0"]) == 3 and survey.foreign == []
    assert s3_requests.count("get_object") == 3 and "head_object" not in s3_requests


def test_a_footer_is_read_from_the_files_end_whatever_its_size(tmp_path, monkeypatch):
    """With the listed size: files too small or not Parquet are nobody's without a footer read, and a
    footer longer than the end read is read whole."""
    import dinat_batch.pipeline.ownership as ownership

    fs = fsspec.filesystem("file")
    owner = Ownership("run-1", "sha", "run-1.0", "s3://x")
    ours = str(tmp_path / "ours.parquet")
    write_table(fs, ours, pa.table({"key": ["a"] * 1000}), owner)
    (tmp_path / "tiny").write_bytes(b"PAR1")
    (tmp_path / "text").write_bytes(b"x" * 100)
    size = os.path.getsize(ours)
    assert ownership.owner_of(fs, ours, size) == owner == ownership.owner_of(fs, ours)
    assert ownership.owner_of(fs, str(tmp_path / "tiny"), 4) is None
    assert ownership.owner_of(fs, str(tmp_path / "text"), 100) is None
    monkeypatch.setattr(ownership, "FOOTER_TAIL", 64)  # shorter than the footer and than the file
    assert ownership.owner_of(fs, ours, size) == owner
    monkeypatch.undo()
    write_table(fs, ours, pa.table({"key": ["a"]}), owner)  # smaller than listed: read as it is now
    assert os.path.getsize(ours) < size and ownership.owner_of(fs, ours, size) == owner
