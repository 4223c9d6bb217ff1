"""Nightly runs over consecutive simulated days on the local S3 server: only new or changed inputs, one
Hive partition per date, reruns that replace only their own date, crashes that leave nothing visible."""

import datetime as dt
import json

import duckdb
import fsspec
import pyarrow.dataset as ds
import pytest
from typer.testing import CliRunner

from dinat_batch.jobs.nightly import Table
from dinat_batch.pipeline.cli import app
from dinat_batch.pipeline.config import RunConfig
from dinat_batch.pipeline.faults import ENV, SimulatedCrash
from dinat_batch.pipeline.lease import LeaseHeld
from dinat_batch.pipeline.output import ForeignFiles, Output
from dinat_batch.pipeline.query import read_output
from tests.data import image_folder, photo

DAY1, DAY2, DAY3, DAY4 = (dt.date(2026, 11, d) for d in (24, 25, 26, 27))


@pytest.fixture
def store(object_store, request):
    object_store.make_bucket("nightly")
    root = f"s3://nightly/{request.node.name}"
    options = object_store.storage_options

    def put(name, data):
        with fsspec.open(f"{root}/incoming/{name}", "wb", **options) as f:
            f.write(data)

    return root, options, put


def rows_of(table, date):
    part = table.filter(ds.field("run_date") == date.isoformat())
    return sorted((r["key"], r["label_ids"], r["embedding"]) for r in part.to_pylist())


def test_days_reruns_and_crashes(store, tiny_model, ray_session, monkeypatch, tmp_path):
    from dinat_batch.jobs.nightly import nightly
    from dinat_batch.pipeline.report import build

    root, options, put = store
    config = RunConfig(
        input=f"{root}/incoming", output=f"{root}/table", model=str(tiny_model), storage_options=options
    )
    key = f"{root}/incoming/{{}}".format
    put("a.jpg", photo(1))
    put("b.jpg", photo(2))
    put("c.png", photo(3, "PNG"))

    day1 = nightly(config, DAY1)
    assert (day1.listed, day1.new_or_changed, day1.run.ok) == (3, 3, 3)

    put("d.jpg", photo(40))
    put("b.jpg", photo(41))  # changed content: a new ETag
    day2 = nightly(config, DAY2)
    assert (day2.listed, day2.new_or_changed) == (4, 2)
    table = read_output(config.output, options)
    assert [r[0] for r in rows_of(table, DAY2)] == [key("b.jpg"), key("d.jpg")]
    assert len(rows_of(table, DAY1)) == 3

    fs, day1_path = fsspec.core.url_to_fs(f"{config.output}/run_date={DAY1}", **options)
    day1_files = {p: fs.info(p)["ETag"] for p in fs.find(day1_path)}
    first = rows_of(table, DAY2)
    again = nightly(config, DAY2)
    assert again.new_or_changed == 2
    table = read_output(config.output, options)
    assert rows_of(table, DAY2) == first  # same rows, no duplicates
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.find(day1_path)} == day1_files  # other dates untouched

    quiet = nightly(config, DAY3)
    assert (quiet.new_or_changed, quiet.run.images) == (0, 0)
    assert Output(f"{config.output}/run_date={DAY3}", options).manifest()["new_or_changed"] == 0

    put("e.jpg", photo(50))
    with monkeypatch.context() as patch:
        patch.setenv(ENV, "before-marker")
        with pytest.raises(SimulatedCrash):
            nightly(config, DAY4)
    table = read_output(config.output, options)
    assert DAY4.isoformat() not in set(table.column("run_date").to_pylist())
    assert table.num_rows == 3 + 2
    assert Table(config.output, options).seen_elsewhere(dt.date(2026, 11, 28)).count() == 3 + 2

    day4 = nightly(config, DAY4)
    assert day4.new_or_changed == 1
    table = read_output(config.output, options)
    assert [r[0] for r in rows_of(table, DAY4)] == [key("e.jpg")]
    predictions = table  # noqa: F841 (DuckDB finds the Arrow table by its variable name)
    per_date = duckdb.sql("SELECT run_date, count(*) FROM predictions GROUP BY run_date ORDER BY run_date")
    assert per_date.fetchall() == [(DAY1.isoformat(), 3), (DAY2.isoformat(), 2), (DAY4.isoformat(), 1)]

    # a rerun of the first date after later ones: what they took since stays theirs; no key in two dates
    rerun = nightly(config, DAY1)
    assert rerun.new_or_changed == 2  # a.jpg and c.png; b.jpg's content is day 2's now, d and e later days'
    keys = read_output(config.output, options).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 5

    # the report of the whole table: a summary row per date, thumbnails read from the store
    page = build(config.output, tmp_path / "report.html", options).read_text()
    assert all(f"<td>{day.isoformat()}</td>" in page for day in (DAY1, DAY2, DAY3, DAY4))
    assert page.count("data:image/jpeg;base64,") >= 5


def test_cli_nightly_and_hive_readers(tmp_path, tiny_model, ray_session):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "x.jpg").write_bytes(photo(1))
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps({"input": str(incoming), "output": str(tmp_path / "table"), "model": str(tiny_model)})
    )
    result = CliRunner().invoke(app, ["nightly", "--config", str(job), "--date", "2026-11-24"])
    assert result.exit_code == 0, result.output
    assert "1 inputs listed, 1 new or changed" in result.output
    (incoming / "y.jpg").write_bytes(photo(2))
    assert CliRunner().invoke(app, ["nightly", "--config", str(job), "--date", "2026-11-25"]).exit_code == 0

    # the whole table, read as Hive partitions by the engines directly
    direct = ds.dataset(tmp_path / "table", format="parquet", partitioning="hive").to_table()
    assert sorted(direct.column("run_date").to_pylist()) == ["2026-11-24", "2026-11-25"]
    glob = f"{tmp_path}/table/*/*.parquet"
    counts = duckdb.sql(
        f"SELECT run_date, count(*) FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY 1 ORDER BY 1"
    )
    assert counts.fetchall() == [(dt.date(2026, 11, 24), 1), (dt.date(2026, 11, 25), 1)]  # DuckDB types it
    summary = CliRunner().invoke(app, ["query", str(tmp_path / "table"), "--summary", "--format", "json"])
    assert [row["run_date"] for row in json.loads(summary.output)["runs"]] == ["2026-11-24", "2026-11-25"]

    bad = CliRunner().invoke(app, ["nightly", "--config", str(job), "--date", "yesterday"])
    assert bad.exit_code == 2 and "not a date" in bad.output


# in this order on one table: the first cut short mid-way through a date's first commit, the others
# during reruns of the committed date, where the old partition is being replaced
CRASH_POINTS = ["part-written", "unmarked", "old-files-removed", "ledger-written", "before-marker", "marked"]


def plain_readers(root: str) -> dict[str, list[str]]:
    """Keys per date as engines that know nothing of markers read the table: DuckDB's glob and pyarrow."""
    duck = duckdb.sql(
        f"SELECT run_date::VARCHAR, key FROM read_parquet('{root}/*/*.parquet', hive_partitioning = true)"
    ).fetchall()
    arrow = ds.dataset(root, format="parquet", partitioning="hive").to_table(columns=["run_date", "key"])
    assert sorted(duck) == sorted(
        zip(map(str, arrow["run_date"].to_pylist()), arrow["key"].to_pylist(), strict=True)
    )
    by_date: dict[str, list[str]] = {}
    for date, key in duck:
        by_date.setdefault(date, []).append(key)
    return by_date


def test_a_commit_cut_short_at_any_step_is_made_whole_by_the_next_run(
    tmp_path, tiny_model, ray_session, monkeypatch
):
    """The driver dies at every step of a date's commit (a first run and a rerun): after the next run of
    that date, plain globbing readers see every input exactly once, and the next date takes only what
    is new."""
    from dinat_batch.jobs.nightly import nightly

    incoming = image_folder(tmp_path / "incoming", 5)
    root = tmp_path / "table"
    config = RunConfig(
        input=str(incoming), output=str(root), model=str(tiny_model), rows_per_file=2, batch_size=2
    )
    expected = sorted(str(path) for path in incoming.iterdir())
    for point in CRASH_POINTS:
        with monkeypatch.context() as patch:
            patch.setenv(ENV, point)
            with pytest.raises(SimulatedCrash):
                nightly(config, DAY1)
        summary = nightly(config, DAY1)
        assert summary.new_or_changed == 5, point
        assert sorted(plain_readers(root)[DAY1.isoformat()]) == expected, point
        assert sorted(read_output(str(root)).column("key").to_pylist()) == expected
    (incoming / "late.jpg").write_bytes(photo(77))
    assert nightly(config, DAY2).new_or_changed == 1


def test_one_nightly_run_per_table(store, tiny_model, ray_session):
    """An attempt at the same date, or at another date, while a run holds the table is refused; a run
    whose read of an input failed leaves that input out of its ledger, so the next date takes it."""
    from dinat_batch.jobs.nightly import Table, nightly

    root, options, put = store
    config = RunConfig(
        input=f"{root}/incoming", output=f"{root}/table", model=str(tiny_model), storage_options=options
    )
    put("a.jpg", photo(1))
    with Table(config.output, options).root.lease("nightly-2026-11-24-live", 600):
        for date in (DAY1, DAY2):
            with pytest.raises(LeaseHeld, match="run nightly-2026-11-24-live"):
                nightly(config, date)

    import dinat_batch.pipeline.run

    planned = dinat_batch.pipeline.run.plan
    fs, incoming = fsspec.core.url_to_fs(f"{root}/incoming", **options)
    put("b.jpg", photo(2))

    def listed_then_lost(*args, **kwargs):
        found = planned(*args, **kwargs)
        fs.rm_file(f"{incoming}/b.jpg")  # gone between listing and reading: a failed read
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dinat_batch.pipeline.run, "plan", listed_then_lost)
        day1 = nightly(config, DAY1)
    assert (day1.new_or_changed, day1.retried_later, day1.run.retryable_errors) == (2, 1, 1)
    put("b.jpg", photo(2))  # back, unchanged: the same version the ledger would have recorded
    day2 = nightly(config, DAY2)
    assert day2.new_or_changed == 1 and day2.run.ok == 1
    rows = read_output(config.output, options).to_pylist()
    assert sorted((r["run_date"], r["key"].rsplit("/", 1)[1], r["status"]) for r in rows) == [
        (DAY1.isoformat(), "a.jpg", "ok"),
        (DAY1.isoformat(), "b.jpg", "error"),
        (DAY2.isoformat(), "b.jpg", "ok"),
    ]


def test_a_dead_date_resumed_after_a_later_date_took_its_inputs(
    tmp_path, tiny_model, ray_session, monkeypatch
):
    """Date 1 dies after writing its rows; date 2 (date 1 being uncommitted) takes the same images; date
    1's next run resumes with nothing of its own left to commit: no image has rows in two dates."""
    from dinat_batch.jobs.nightly import nightly

    incoming = image_folder(tmp_path / "incoming", 3)
    root = tmp_path / "table"
    config = RunConfig(input=str(incoming), output=str(root), model=str(tiny_model))
    with monkeypatch.context() as patch:
        patch.setenv(ENV, "before-marker")
        with pytest.raises(SimulatedCrash):
            nightly(config, DAY1)
    assert nightly(config, DAY2).new_or_changed == 3
    day1 = nightly(config, DAY1)
    assert (day1.new_or_changed, day1.run.images, day1.run.resumed) == (0, 0, 0)
    by_date = plain_readers(root)
    assert sorted(by_date) == [DAY2.isoformat()] and len(by_date[DAY2.isoformat()]) == 3
    assert read_output(str(root)).num_rows == 3


def test_a_table_root_holding_others_files_is_refused_untouched(tmp_path, tiny_model):
    from dinat_batch.jobs.nightly import nightly

    incoming = image_folder(tmp_path / "incoming", 1)
    root = tmp_path / "table"
    root.mkdir()
    (root / "report.csv").write_text("someone's numbers\n")
    config = RunConfig(input=str(incoming), output=str(root), model=str(tiny_model))
    with pytest.raises(ForeignFiles, match=r"did not write: .*report\.csv"):
        nightly(config, DAY1)
    assert sorted(path.name for path in root.iterdir()) == ["report.csv"]  # no lease, no partition


def test_ledgers_of_an_earlier_version_count_and_cut_off_writes_do_not_block(tmp_path, ray_session):
    """A date committed by a version that wrote `_runs/DATE.arrow` still counts as read; a ledger write
    cut off before its rename (a temp file on a disk) is neither foreign nor read, and the date's next
    ledger replaces both."""
    import io

    import pyarrow as pa
    import pyarrow.ipc as ipc
    import ray

    from dinat_batch.pipeline.ownership import Ownership

    table = Table(str(tmp_path / "table"), {})
    old = pa.table({"uri": ["s3://b/a.jpg", "s3://b/b.jpg"], "size": [1, 2], "version": ["1", "2"]})
    buffer = io.BytesIO()
    with ipc.new_file(buffer, old.schema) as writer:
        writer.write_table(old)
    (tmp_path / "table" / "_runs").mkdir(parents=True)
    (tmp_path / "table" / "_runs" / "2026-11-20.arrow").write_bytes(buffer.getvalue())
    for day in ("2026-11-20", "2026-11-21"):
        (tmp_path / "table" / f"run_date={day}").mkdir()
        (tmp_path / "table" / f"run_date={day}" / "_SUCCESS").write_text("{}")
    owner = Ownership("nightly-2026-11-21", "sha", "nightly-2026-11-21.0", table.root.identity)
    new = pa.table({"uri": ["s3://b/c.jpg"], "size": [3], "version": ["3"]})
    table.write_ledger(dt.date(2026, 11, 21), ray.data.from_arrow(new), owner)
    cut_off = ".tmp-dinat-" + "0" * 32 + "-ledger-000000-1.parquet"
    (tmp_path / "table" / "_runs" / "2026-11-21" / cut_off).write_bytes(b"cut")

    seen = sorted(row["uri"] for row in table.seen_elsewhere(dt.date(2026, 11, 22)).take_all())
    assert seen == ["s3://b/a.jpg", "s3://b/b.jpg", "s3://b/c.jpg"]
    table.write_ledger(dt.date(2026, 11, 20), ray.data.from_arrow(new), owner)  # a rerun of the old date
    assert not (tmp_path / "table" / "_runs" / "2026-11-20.arrow").exists()
    table.write_ledger(dt.date(2026, 11, 21), ray.data.from_arrow(new), owner)
    assert [p.name for p in (tmp_path / "table" / "_runs" / "2026-11-21").iterdir()] == [
        f"ledger-{owner.run_id}-000000-1.parquet"  # the run in the name: a rerun never writes over another's
    ]
    (tmp_path / "table" / "_runs" / "2026-11-21" / "notes.parquet").write_bytes(b"someone's")
    with pytest.raises(ForeignFiles, match=r"notes\.parquet"):
        table.seen_elsewhere(dt.date(2026, 11, 22))
    with pytest.raises(ForeignFiles, match=r"notes\.parquet"):
        table.write_ledger(dt.date(2026, 11, 21), ray.data.from_arrow(new), owner)
    assert (tmp_path / "table" / "_runs" / "2026-11-21" / "notes.parquet").read_bytes() == b"someone's"


def test_a_long_history_is_one_listing_and_its_ledgers_are_read_together(
    object_store, ray_session, s3_requests
):
    """Every night reads the ledgers of all other committed dates: however many dates, the partitions and
    the ledgers are a listing each (not one per date), a marker and a footer one request each, and the
    ledgers are read by a few Ray tasks, not one per file. A date without a marker and another run's
    ledger beside the committed one's are not read."""
    import pyarrow as pa

    from dinat_batch.pipeline.ownership import Ownership, write_table
    from dinat_batch.pipeline.stages.write import chunk_name

    object_store.make_bucket("nightly")
    table = Table("s3://nightly/history", object_store.storage_options)

    def ledger(date: dt.date, run_id: str, index: int) -> str:
        uri = f"s3://b/{run_id}/{index}.jpg"
        rows = pa.table({"uri": [uri], "size": [1], "version": ["1"]})
        owner = Ownership(run_id, "0" * 64, f"{run_id}.0", table.root.identity)
        write_table(
            table.fs, table.path("_runs", str(date), chunk_name(index, 1, f"ledger-{run_id}-")), rows, owner
        )
        return uri

    dates = [DAY1 - dt.timedelta(days=i) for i in range(30)]
    expected = []
    for date in dates:
        expected += [ledger(date, f"nightly-{date}", i) for i in range(2)]
        table.fs.pipe_file(
            table.path(f"run_date={date}", "_SUCCESS"), json.dumps({"run_id": f"nightly-{date}"}).encode()
        )
    ledger(dates[0], "a-rerun-cut-short", 0)
    ledger(DAY2, "nightly-uncommitted", 0)
    table.fs.pipe_file(table.path(f"run_date={DAY2}", "_staging", "x"), b"")
    # a folder that fromisoformat would read as the first date: not that date's, which stays committed
    table.fs.pipe_file(table.path(f"run_date={dates[0]:%Y%m%d}", "x"), b"")
    made = s3_requests
    made.clear()
    seen = table.seen_elsewhere(DAY3).materialize()
    assert made.count("list_objects_v2") == 2
    assert made.count("get_object") == (len(dates) + 1) + (2 * len(dates) + 1)  # markers, footers
    assert len(made) == made.count("list_objects_v2") + made.count("get_object")
    assert sorted(row["uri"] for row in seen.take_all()) == sorted(expected)
    assert seen.num_blocks() == 1
