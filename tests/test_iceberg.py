"""Iceberg output (`output_format: iceberg`): one snapshot per run, a nightly date replaced in one snapshot,
a commit cut short at any step invisible to readers, time travel, and the tables' engines reading it."""

import datetime as dt
import json
import time

import duckdb
import fsspec
import polars as pl
import pytest
from typer.testing import CliRunner

from dinat_batch.pipeline.cli import app
from dinat_batch.pipeline.config import ConfigError, RunConfig
from dinat_batch.pipeline.faults import ENV, SimulatedCrash
from dinat_batch.pipeline.iceberg import IcebergTable
from dinat_batch.pipeline.query import read_output
from dinat_batch.pipeline.report import build
from dinat_batch.pipeline.stages.write import output_schema
from tests.data import image_folder, photo

DAY1, DAY2 = dt.date(2026, 11, 24), dt.date(2026, 11, 25)


def iceberg_config(tmp_path, input, output, model, **extra):
    catalog = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db"}
    return RunConfig(
        input=str(input),
        output=str(output),
        model=str(model),
        output_format="iceberg",
        iceberg_table="dinat.predictions",
        iceberg_catalog=catalog,
        **extra,
    )


def first_dim(table) -> int:
    return len(table.column("embedding")[0])


def scan(config: RunConfig, **at) -> list[tuple[str, str]]:
    """(run_date or '', key) of every row, as a reader scanning the table through its catalog sees it."""
    table = IcebergTable.of(config).read(**at)
    dates = table.column("run_date").to_pylist() if "run_date" in table.column_names else [""] * len(table)
    return sorted(zip(dates, table.column("key").to_pylist(), strict=True))


def test_a_run_is_one_snapshot_and_an_overwrite_the_next(tmp_path, tiny_model, ray_session, monkeypatch):
    """A run creates the table and commits one snapshot; a second run is refused, an overwrite replaces
    every row in one more snapshot; the first stays readable by id and by time; DuckDB and Polars read
    it through Arrow; `query` reads it with the embedding as the Parquet output types it."""
    from dinat_batch.pipeline.run import run

    images = image_folder(tmp_path / "in", 3)
    config = iceberg_config(tmp_path, images, tmp_path / "table", tiny_model, batch_size=2)
    first = run(config)
    assert (first.images, first.ok) == (3, 3)
    table = IcebergTable.of(config).load()
    assert len(table.snapshots()) == 1
    assert table.current_snapshot().summary["dinat-batch.run-id"] == first.run_id
    keys = sorted(str(path) for path in images.iterdir())
    assert scan(config) == [("", key) for key in keys]

    with pytest.raises(ConfigError, match="already holds a run that finished"):
        run(config)
    (images / "d.jpg").write_bytes(photo(9))
    # the output spelled through a symlink: the same table, and its first snapshot's files are kept
    (tmp_path / "link").symlink_to(tmp_path)
    second = run(config.model_copy(update={"overwrite": True, "output": str(tmp_path / "link" / "table")}))
    snapshots = IcebergTable.of(config).load().snapshots()
    assert len(snapshots) == 2 and second.images == 4
    assert scan(config) == [("", key) for key in sorted([*keys, str(images / "d.jpg")])]
    assert scan(config, snapshot_id=snapshots[0].snapshot_id) == [("", key) for key in keys]
    assert scan(config, as_of_ms=snapshots[1].timestamp_ms - 1) == [("", key) for key in keys]

    arrow = read_output(config.output, iceberg=IcebergTable.of(config))
    assert arrow.schema.field("embedding").type == output_schema(first_dim(arrow)).field("embedding").type
    assert duckdb.sql("SELECT count(*) FROM arrow WHERE status = 'ok'").fetchall()[0][0] == 4
    assert pl.from_arrow(arrow).filter(pl.col("status") == "ok").height == 4
    monkeypatch.setenv("POLARS_ICEBERG_PLANNER", "pyiceberg")  # the planner plugin is not installed
    assert pl.scan_iceberg(IcebergTable.of(config).load()).select(pl.len()).collect().item() == 4

    catalog = json.dumps(config.iceberg_catalog)
    flags = ["--iceberg-table", "dinat.predictions", "--iceberg-catalog", catalog]
    at_first = CliRunner().invoke(
        app,
        [
            "query",
            config.output,
            *flags,
            "--snapshot",
            str(snapshots[0].snapshot_id),
            "--sql",
            "SELECT count(*) AS n FROM predictions",
            "--format",
            "json",
        ],
    )
    assert at_first.exit_code == 0, at_first.output
    assert json.loads(at_first.output) == {"n": 3}
    similar = CliRunner().invoke(
        app, ["query", config.output, *flags, "--similar", keys[0], "--format", "json"]
    )
    assert similar.exit_code == 0 and len(similar.output.splitlines()) == 3
    unknown = CliRunner().invoke(app, ["query", config.output, *flags, "--snapshot", "1", "--summary"])
    assert unknown.exit_code == 2 and "has no snapshot 1" in unknown.output


def test_the_table_is_one_outputs_own(tmp_path, tiny_model, ray_session, object_store):
    """The table must live at the output, be dinat-batch's, and hold the layout of the job; credentials in
    the catalog's properties are redacted and refused by `submit`."""
    from dinat_batch.jobs.submit import SubmitError, _refuse_secrets
    from dinat_batch.pipeline.lease import LeaseHeld
    from dinat_batch.pipeline.output import ForeignFiles, Output
    from dinat_batch.pipeline.run import run

    images = image_folder(tmp_path / "in", 1)
    config = iceberg_config(tmp_path, images, tmp_path / "a", tiny_model)
    run(config)
    again = config.model_copy(update={"overwrite": True})
    # the user's mistakes, as for a Parquet output: someone's file in the table's data folder, a second
    # writer, an output inside the input
    stray = tmp_path / "a" / "data" / "theirs.parquet"
    stray.write_bytes(b"someone's")
    with pytest.raises(ForeignFiles, match=r"theirs\.parquet"):
        run(again)
    assert stray.read_bytes() == b"someone's"
    stray.unlink()
    with Output(config.output, {}).lease("live-run", 600), pytest.raises(LeaseHeld, match="live-run"):
        run(again)
    with pytest.raises(ValueError, match="lies inside the input"):
        iceberg_config(tmp_path, images, images / "t", tiny_model)
    elsewhere = config.model_copy(update={"output": str(tmp_path / "b")})
    with pytest.raises(ConfigError, match=r"lives at .*one table has one location"):
        run(elsewhere)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").rglob("*.parquet"))

    from dinat_batch.jobs.nightly import nightly

    with pytest.raises(ConfigError, match="holds run output"):
        nightly(config.model_copy(update={"overwrite": True}), DAY1)

    with pytest.raises(ConfigError, match="holds 128-d embeddings; this model makes 7-d"):
        IcebergTable.of(config).ensure(7, partitioned=False)

    ours = IcebergTable.of(config)
    ours.catalog.create_table("dinat.theirs", schema=ours.load().schema(), location=str(tmp_path / "theirs"))
    theirs = config.model_copy(update={"iceberg_table": "dinat.theirs", "output": str(tmp_path / "theirs")})
    with pytest.raises(ConfigError, match="not created by dinat-batch"):
        IcebergTable.of(theirs).load()

    # the catalog lost its entry: a run must not make a new table over the old one's files
    ours.catalog.drop_table("dinat.predictions")
    with pytest.raises(ConfigError, match="holds an Iceberg table's files, but the catalog has no table"):
        run(config.model_copy(update={"overwrite": True}))
    assert any((tmp_path / "a" / "data").iterdir())

    with pytest.raises(ValueError, match="needs iceberg_table"):
        RunConfig(input="s3://b/in", output="s3://b/out", output_format="iceberg")
    secret = config.model_copy(
        update={"iceberg_catalog": {"type": "rest", "uri": "https://u:p@cat", "token": "t"}}
    )
    assert secret.redacted()["iceberg_catalog"] == {"type": "rest", "uri": "https://***@cat", "token": "***"}
    with pytest.raises(SubmitError, match=r"iceberg_catalog\.token"):
        _refuse_secrets(secret, {})


def test_beside_a_commit_only_the_committed_runs_staged_files_are_redundant(tmp_path):
    """A replacement cut short beside an Iceberg commit is resumed: its files stay; the committed run's
    attempts and every retry's copies of committed files go (run ids may hold dots and dashes)."""
    from dinat_batch.pipeline.output import Output

    output = Output(str(tmp_path / "t"), {})
    staged = [
        f"{output.path}/_staging/{folder}/chunk-000000-1.parquet"
        for folder in ("a.0123abcd", "a.b.0123abcd", "a.0123abcd-x", "old-run-committed", "b.89abcdef")
    ]
    assert [path.split("/")[-2] for path in output._committed_runs_files(staged, "a")] == [
        "a.0123abcd",
        "old-run-committed",
    ]


@pytest.fixture
def warehouse(object_store, request):
    object_store.make_bucket("warehouse")
    return f"s3://warehouse/{request.node.name}", object_store.storage_options


# the first cut short during a date's first commit, the others during reruns of the committed date; the
# protocol's points before these (mid-compaction, old files removed) are the Parquet ones, tested there
CRASH_POINTS = ["ledger-written", "snapshot-staged", "marked"]


def test_nightly_dates_on_s3_with_commits_cut_short(
    tmp_path, warehouse, tiny_model, ray_session, monkeypatch
):
    """Nightly runs into an Iceberg table on S3 (SeaweedFS): a commit cut short at each step leaves a reader
    the previous snapshot, complete; the next run of the date commits every input once in one snapshot
    that replaces the date's partition; a later date takes only what is new. Orphans of a commit that did
    not land are listed and removed by `dinat-batch orphans`."""
    from dinat_batch.jobs.nightly import Table, nightly

    root, options = warehouse
    fs, incoming = fsspec.core.url_to_fs(f"{root}/incoming", **options)
    for i in range(3):
        fs.pipe_file(f"{incoming}/{i}.jpg", photo(i))
    config = iceberg_config(
        tmp_path, f"{root}/incoming", f"{root}/table", tiny_model, storage_options=options, rows_per_file=2
    )
    expected = sorted((DAY1.isoformat(), f"s3://{incoming}/{i}.jpg") for i in range(3))
    seen: list[tuple[str, str]] = []
    for point in CRASH_POINTS:
        with monkeypatch.context() as patch:
            patch.setenv(ENV, point)
            with pytest.raises(SimulatedCrash):
                nightly(config, DAY1)
        table = IcebergTable.of(config)
        assert scan(config) == seen, point  # the state before (after "marked": the same rows committed)
        if seen:  # the committed date's ledger still counts, whole, for the other dates
            assert Table(config.output, options, table).seen_elsewhere(DAY2).count() == 3, point
        if point == "snapshot-staged":
            command = [
                "orphans",
                config.output,
                *(
                    "--iceberg-table",
                    "dinat.predictions",
                    "--iceberg-catalog",
                    json.dumps(config.iceberg_catalog),
                ),
                *("--storage-options", json.dumps(options), "--older-than", "0"),
            ]
            listed = CliRunner().invoke(app, command)
            assert listed.exit_code == 0, listed.output
            orphans = [line for line in listed.stdout.splitlines() if line]
            assert any("/data/run_date=" in path for path in orphans)
            assert any("/metadata/" in path for path in orphans)
            removed = CliRunner().invoke(app, [*command, "--delete"])
            assert removed.exit_code == 0 and table.orphans(0) == []
            assert scan(config) == seen
        summary = nightly(config, DAY1)
        seen = scan(config)
        assert summary.new_or_changed == 3 and seen == expected, point
        # a run cut short is resumed from its chunks, a replacement of the committed date too
        assert summary.run.resumed == (0 if point == "marked" else 3), point
    # one snapshot per commit: each completed run's, and the one that landed before the crash at "marked"
    assert len(table.load().snapshots()) == len(CRASH_POINTS) + 1
    fs.pipe_file(f"{incoming}/late.jpg", photo(7))
    day2 = nightly(config, DAY2)
    assert day2.new_or_changed == 1
    assert scan(config) == sorted([*expected, (DAY2.isoformat(), f"s3://{incoming}/late.jpg")])
    rerun = nightly(config, DAY1)  # a rerun after a later date: still only its own inputs
    assert rerun.new_or_changed == 3 and len(scan(config)) == 4

    # the report reads the table through its catalog: a summary row per date, thumbnails from S3
    page = build(config.output, tmp_path / "report.html", options, IcebergTable.of(config)).read_text()
    assert f"<td>{DAY1.isoformat()}</td>" in page and f"<td>{DAY2.isoformat()}</td>" in page
    assert page.count("data:image/jpeg;base64,") >= 4


def test_an_orphans_age_comes_from_its_listing_and_an_unknown_one_is_new():
    """S3's pages give `LastModified` (a datetime), a disk's listing `mtime` (seconds): a metadata file
    whose age is unknown is never old enough to remove."""
    from dinat_batch.pipeline import iceberg

    written = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    assert iceberg._modified({"LastModified": written}) == written.timestamp()
    assert iceberg._modified({"mtime": 1_700_000_000.5}) == 1_700_000_000.5
    assert iceberg._modified({}) >= time.time() - 1


def test_the_catalogs_files_go_where_the_tables_store_options_say():
    """pyiceberg reads the table's metadata with the S3 settings of its location: an `s3` entry's too."""
    s3 = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:8333"}}
    for options in (s3, {"s3": s3, "https": {"headers": {}}}):
        table = IcebergTable("ns.t", {"type": "sql"}, "s3://bucket/table", options)
        assert table._properties["s3.endpoint"] == "http://127.0.0.1:8333"
        assert (table._properties["s3.access-key-id"], table._properties["s3.secret-access-key"]) == (
            "k",
            "s",
        )
