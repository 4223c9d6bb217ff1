"""The `dinat-batch` command line."""

from __future__ import annotations

import datetime as dt
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

import typer
from pydantic.fields import FieldInfo

from dinat_batch.pipeline.config import RunConfig, flag_name
from dinat_batch.pipeline.locations import options_for

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Batch inference for DiNAT image models.")


def _storage_options(raw: str | None) -> dict[str, Any]:
    return _json_object(raw, "--storage-options") if raw else {}


def _print_top_k(results: list[tuple[str, list | str]]) -> int:
    failures = 0
    for uri, result in results:
        typer.echo(uri)
        if isinstance(result, str):
            failures += 1
            typer.echo(f"  error: {result}")
            continue
        for score, label_id, label in result:
            typer.echo(f"  {score:7.4f}  {label} ({label_id})")
    return failures


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="image files or fsspec URIs (s3://bucket/key.jpg)")],
    model: Annotated[
        str, typer.Option(help="hub id, local folder or fsspec URI of an HF checkpoint")
    ] = RunConfig.model_fields["model"].default,
    top: Annotated[
        int, typer.Option("--top-k", min=1, help="labels to print per image")
    ] = RunConfig.model_fields["top_k"].default,
    storage_options: Annotated[
        str | None, typer.Option(help="JSON fsspec options for the images and the model, e.g. an endpoint")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda; default: cuda when available")] = None,
) -> None:
    """Print the top-k labels and scores of each image: the model card's snippet, working."""
    from dinat_batch.pipeline.model import ModelLoadError, load_model
    from dinat_batch.pipeline.predict import top_k

    options = _storage_options(storage_options)
    try:
        loaded = load_model(model, device=device, storage_options=options_for(model, options))
    except ModelLoadError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    failures = _print_top_k(top_k(loaded, images, top, options))
    if failures:
        raise typer.Exit(1)


@contextmanager
def _job_errors() -> Iterator[None]:
    """Exit 2 with the message for a config or model that cannot run (nothing was done); exit 1 for a
    run that failed on the way (nothing was committed)."""
    from dinat_batch.pipeline.config import ConfigError
    from dinat_batch.pipeline.model import ModelLoadError
    from dinat_batch.pipeline.run import ErrorRateExceeded

    try:
        yield
    except (ConfigError, ModelLoadError) as err:
        raise _failed(str(err), 2) from err
    except ErrorRateExceeded as err:
        raise _failed(f"the run failed its error budget: {err}", 1) from err
    except Exception as err:
        raise _failed(
            f"the run failed: {type(err).__name__}: {err}\n"
            "Nothing was committed (no _SUCCESS marker), so readers ignore its files; run it again.",
            1,
        ) from err


def _failed(message: str, code: int) -> typer.Exit:
    """The error printed last: what Ray printed to stdout before (its workers' and nodes' lines, flushed
    as the run leaves the cluster) goes out first, though redirected stdout is block-buffered and stderr
    is not."""
    sys.stdout.flush()
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _json_object(raw: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"not valid JSON: {err}", param_hint=flag) from err
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object", param_hint=flag)
    return value


def _value_type(field: FieldInfo) -> Any:
    """A field's type without its `| None`."""
    kind = field.annotation
    if get_origin(kind) in (Union, UnionType):
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    return kind


def _flag(name: str, field: FieldInfo) -> inspect.Parameter:
    """A RunConfig field as a command-line option: `--top-k` for `top_k`, its description as help, None
    when not given (the config file or the field's default then decides). Mappings are JSON text."""
    kind = _value_type(field)
    flag = flag_name(name)
    notes = []
    if get_origin(kind) is dict:
        kind = str
        notes.append("JSON")
    if get_origin(kind) is list:
        notes.append("repeat the flag for several")
    default = field.get_default(call_default_factory=True)
    if field.is_required():
        notes.append("required, here or in --config")
    elif default not in (None, {}):
        notes.append(f"default: {default}")
    declared = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    shown = f" ({'; '.join(notes)})" if notes else ""
    option = typer.Option(*declared, help=f"{field.description}{shown}", show_default=False)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
    )


def config_flags(*skip: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give `command(..., **fields)` one option per RunConfig field but `skip`, so that every field has its
    flag and its help from one place; the command receives them as `fields`, None for those not given."""
    return lambda command: _with_flags(command, [n for n in RunConfig.model_fields if n not in skip])


def _with_flags(command: Callable[..., None], names: list[str]) -> Callable[..., None]:
    hints = get_type_hints(command, include_extras=True)
    own = [
        p.replace(annotation=hints[p.name])
        for p in inspect.signature(command).parameters.values()
        if p.kind != p.VAR_KEYWORD
    ]
    clash = {p.name for p in own} & set(names)
    assert not clash, f"{command.__name__}'s own options {clash} are also RunConfig fields"
    params = own + [_flag(name, RunConfig.model_fields[name]) for name in names]
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    """The flags given, as RunConfig values: JSON mappings parsed, empty repeated flags dropped."""
    given = {name: value for name, value in fields.items() if value not in (None, [], ())}
    for name, value in given.items():
        if get_origin(_value_type(RunConfig.model_fields[name])) is dict:
            given[name] = _json_object(value, flag_name(name))
    return given


@app.command("run")
@config_flags()
def run_command(
    config: Annotated[
        Path | None, typer.Option(help="job config file (YAML or JSON); flags override it")
    ] = None,
    **fields: Any,
) -> None:
    """Run the pipeline: images in, one Parquet row per image out, `_SUCCESS` written last."""
    from dinat_batch.pipeline.config import load_config
    from dinat_batch.pipeline.run import run

    given = _given(fields)
    with _job_errors():
        summary = run(load_config(config, **given))
    kinds = ", ".join(f"{kind}: {count}" for kind, count in summary.errors_by_kind.items())
    typer.echo(
        f"run {summary.run_id} finished: {summary.images} images, {summary.ok} ok, {summary.errors} errors"
        + (f" ({kinds})" if kinds else "")
        + (
            f"\n{summary.retryable_errors} of the errors are failed reads (the store, not the image): "
            "the same command retries them"
            if summary.retryable_errors
            else ""
        )
        + f"\n{summary.seconds:.1f} s, {summary.images_per_second:.1f} images/s on {summary.device}"
        + f"\noutput: {summary.output} (committed: "
        + (
            f"a snapshot of the Iceberg table {summary.config['iceberg_table']})"
            if summary.config["output_format"] == "iceberg"
            else "_SUCCESS written)"
        )
    )


def _date(text: str | None) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text) if text else None
    except ValueError as err:
        raise typer.BadParameter(f"{text!r} is not a date like 2026-11-28", param_hint="--date") from err


@app.command("nightly")
@config_flags("run_id")  # each date's run names itself
def nightly_command(
    config: Annotated[
        Path | None, typer.Option(help="job config file (YAML or JSON); output is the table's root")
    ] = None,
    date: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: today, UTC)")] = None,
    **fields: Any,
) -> None:
    """Process what is new or changed since the last committed date into OUTPUT/run_date=DATE/."""
    from dinat_batch.jobs.nightly import nightly
    from dinat_batch.pipeline.config import load_config

    day, given = _date(date), _given(fields)
    with _job_errors():
        summary = nightly(load_config(config, **given), day)
    typer.echo(
        f"{summary.date}: {summary.listed} inputs listed, {summary.new_or_changed} new or changed; "
        f"{summary.run.images} rows ({summary.run.ok} ok, {summary.run.errors} errors)\n"
        + (
            f"{summary.retried_later} failed reads are left for the next run to take again\n"
            if summary.retried_later
            else ""
        )
        + f"committed: {summary.partition}"
    )


Address = Annotated[
    str | None,
    typer.Option(
        envvar="RAY_ADDRESS", help="the cluster's job server, e.g. http://head:8265 (or RAY_ADDRESS)"
    ),
]


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    if not address:
        raise typer.BadParameter("give --address http://HEAD:8265 or set RAY_ADDRESS", param_hint="--address")
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as err:
        typer.echo(f"error: no Ray job server at {address}: {err}", err=True)
        raise typer.Exit(2) from err


@app.command()
def submit(
    config: Annotated[Path, typer.Option(help="job config file (YAML or JSON), without credentials")],
    address: Address = None,
    nightly: Annotated[
        bool, typer.Option("--nightly", help="submit `dinat-batch nightly` for --date")
    ] = False,
    date: Annotated[str | None, typer.Option(help="nightly date YYYY-MM-DD (default: today, UTC)")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow logs and exit with the job's outcome")] = False,
    env: Annotated[
        list[str] | None, typer.Option(help="NAME=VALUE for the job (not for credentials)")
    ] = None,
    working_dir: Annotated[Path | None, typer.Option(help="folder shipped with the job")] = None,
    image: Annotated[
        str | None, typer.Option(help="container image for the job (runtime_env image_uri)")
    ] = None,
    entrypoint_num_cpus: Annotated[float, typer.Option(help="CPUs reserved for the job's driver")] = 1,
) -> None:
    """Submit the pipeline to a Ray cluster as a Ray job; a job already submitted is refused."""
    from dinat_batch.jobs.submit import SubmitError, follow
    from dinat_batch.jobs.submit import submit as submit_job
    from dinat_batch.pipeline.config import ConfigError, load_config

    variables = dict(item.split("=", 1) for item in env or [] if "=" in item)
    if len(variables) != len(env or []):
        raise typer.BadParameter("write each as NAME=VALUE", param_hint="--env")
    day = (_date(date) or dt.datetime.now(dt.UTC).date()) if nightly else None
    client = _client(address)
    try:
        job_id = submit_job(
            client, load_config(config), day, variables, working_dir, image, entrypoint_num_cpus
        )
    except (ConfigError, SubmitError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(f"submitted {job_id}")
    if wait:
        status = follow(client, job_id, typer.echo)
        typer.echo(f"{job_id}: {status.value}")
        if status.value != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
def status(job_id: Annotated[str, typer.Argument(help="submission id")], address: Address = None) -> None:
    """A submitted job's status."""
    info = _client(address).get_job_info(job_id)
    typer.echo(f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    typer.echo(f"entrypoint: {info.entrypoint}")
    for name, value in sorted((info.metadata or {}).items()):
        typer.echo(f"{name}: {value}")


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="submission id")],
    address: Address = None,
    follow: Annotated[bool, typer.Option("--follow", help="keep printing until the job ends")] = False,
) -> None:
    """A submitted job's logs."""
    from dinat_batch.jobs.submit import follow as follow_job

    client = _client(address)
    if follow:
        follow_job(client, job_id, typer.echo)
    else:
        typer.echo(client.get_job_logs(job_id))


@app.command()
def stop(job_id: Annotated[str, typer.Argument(help="submission id")], address: Address = None) -> None:
    """Stop a submitted job (its output stays uncommitted: no _SUCCESS)."""
    stopped = _client(address).stop_job(job_id)
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'already ended'}")


@app.command()
def demo() -> None:
    """Start a local S3 server and Ray, upload sample images, run the pipeline, query the output."""
    from dinat_batch.pipeline.demo import run_demo

    run_demo(typer.echo)


def _records(relation) -> list[dict[str, Any]]:
    return [dict(zip(relation.columns, row, strict=True)) for row in relation.fetchall()]


def _emit(relation, fmt: str, out: Path | None) -> None:
    """A DuckDB result on the terminal (table, csv, json lines) or in a Parquet file."""
    import csv
    import sys

    if fmt == "parquet":
        if out is None:
            raise typer.BadParameter("--format parquet writes a file: give --out PATH", param_hint="--out")
        relation.write_parquet(str(out))
        typer.echo(f"wrote {out}")
        return
    if fmt == "table":
        typer.echo(str(relation))
        return
    if fmt == "json":
        for record in _records(relation):
            typer.echo(json.dumps(record, default=str))
        return
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(relation.columns)
    for row in relation.fetchall():
        writer.writerow([json.dumps(v, default=str) if isinstance(v, list | dict) else v for v in row])


IcebergTableName = Annotated[
    str | None, typer.Option(help="read the Iceberg table of this name (namespace.table) at OUTPUT")
]
IcebergCatalog = Annotated[
    str | None,
    typer.Option(help='its catalog\'s properties as JSON, e.g. {"type": "sql", "uri": "sqlite:///c.db"}'),
]
Snapshot = Annotated[int | None, typer.Option("--snapshot", help="Iceberg: read this snapshot id")]
AsOf = Annotated[
    str | None,
    typer.Option("--as-of", help="Iceberg: read the snapshot current at this time (ISO 8601, UTC)"),
]


def _iceberg(output: str, options: dict[str, Any], table: str | None, catalog: str | None):
    """The Iceberg table the options name, or None for a Parquet output."""
    from dinat_batch.pipeline.iceberg import IcebergTable

    if (table is None) != (catalog is None):
        raise typer.BadParameter("an Iceberg table needs both --iceberg-table and --iceberg-catalog")
    if table is None:
        return None
    properties = {k: str(v) for k, v in _json_object(catalog, "--iceberg-catalog").items()}
    return IcebergTable(table, properties, output, options)


def _read_table(
    output: str,
    storage_options: str | None,
    iceberg_table: str | None,
    iceberg_catalog: str | None,
    snapshot: int | None = None,
    as_of: str | None = None,
):
    """The rows of a finished output, as `query` and `report` read them (an Iceberg table with its
    catalog, at a snapshot or a time)."""
    from dinat_batch.pipeline.query import read_output

    options = _storage_options(storage_options)
    iceberg = _iceberg(output, options, iceberg_table, iceberg_catalog)
    as_of_ms = None
    if as_of is not None and snapshot is not None:
        raise typer.BadParameter("give --snapshot or --as-of, not both", param_hint="--as-of")
    if as_of is not None:
        try:
            moment = dt.datetime.fromisoformat(as_of)
        except ValueError as err:
            raise typer.BadParameter(
                f"{as_of!r} is not a time like 2026-11-29T12:00:00Z", param_hint="--as-of"
            ) from err
        as_of_ms = int((moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp() * 1000)
    return read_output(output, options, iceberg, snapshot, as_of_ms)


@app.command()
def orphans(
    output: Annotated[str, typer.Argument(help="the Iceberg table's location (local path or fsspec URI)")],
    iceberg_table: Annotated[str, typer.Option(help="namespace.table")],
    iceberg_catalog: Annotated[str, typer.Option(help="the catalog's properties as JSON")],
    storage_options: Annotated[str | None, typer.Option(help="JSON fsspec options (endpoint, keys)")] = None,
    delete: Annotated[bool, typer.Option("--delete", help="remove them (holding the table's lease)")] = False,
    older_than: Annotated[
        float, typer.Option(min=0, help="minutes: newer unreached metadata files may be a commit in flight")
    ] = 60,
    lease_timeout: Annotated[float, typer.Option(help="as the runs' lease_timeout")] = RunConfig.model_fields[
        "lease_timeout"
    ].default,
) -> None:
    """List the files of an Iceberg output that no snapshot reaches (left by commits that did not land, or
    by expired snapshots); --delete removes them. Runs remove their own scope's data files by themselves."""
    from dinat_batch.pipeline.config import ConfigError
    from dinat_batch.pipeline.deletion import KEYS_PER_REQUEST
    from dinat_batch.pipeline.lease import LeaseHeld
    from dinat_batch.pipeline.output import Output

    options = _storage_options(storage_options)
    table = _iceberg(output, options, iceberg_table, iceberg_catalog)
    root = Output(output, options)
    try:
        # the lease: no run of ours is writing (a run's data files are orphans until its commit lands)
        name = f"orphans-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}"
        with root.lease(name, lease_timeout) if delete else nullcontext() as lease:
            found = table.orphans(older_than * 60)
            if lease is None:
                for path in found:
                    typer.echo(path)
            else:
                # a bulk request's files at a time, the lease checked before each (a run that took the
                # table over since stops the removal there), each file named once it is gone
                for start in range(0, len(found), KEYS_PER_REQUEST):
                    group = found[start : start + KEYS_PER_REQUEST]
                    lease.check()
                    table.remove(group)
                    for path in group:
                        typer.echo(path)
    except (LeaseHeld, ConfigError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(f"{len(found)} orphaned file(s){' removed' if delete else ''}", err=True)


@app.command()
def report(
    output: Annotated[
        str, typer.Argument(help="a run's output, a nightly table or an Iceberg table's location")
    ],
    out: Annotated[Path, typer.Option(help="the HTML file to write")] = Path("report.html"),
    storage_options: Annotated[str | None, typer.Option(help="JSON fsspec options (endpoint, keys)")] = None,
    iceberg_table: IcebergTableName = None,
    iceberg_catalog: IcebergCatalog = None,
) -> None:
    """Write one self-contained HTML page about a finished output: summaries, labels, confidence,
    throughput, an embedding map and thumbnails (it opens offline)."""
    from dinat_batch.pipeline.query import OutputNotReady
    from dinat_batch.pipeline.report import build

    options = _storage_options(storage_options)
    try:
        written = build(output, out, options, _iceberg(output, options, iceberg_table, iceberg_catalog))
    except (OutputNotReady, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(f"report: {written.resolve()}")


@app.command()
def query(
    output: Annotated[
        str, typer.Argument(help="a run's output directory or Iceberg table location (any URI)")
    ],
    sql_text: Annotated[str | None, typer.Option("--sql", help="SQL over the table `predictions`")] = None,
    summary: Annotated[
        bool, typer.Option("--summary", help="rows per run, errors by kind, top labels")
    ] = False,
    similar_to: Annotated[
        str | None, typer.Option("--similar", help="key of an image: its nearest neighbours")
    ] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="neighbours for --similar")] = 10,
    fmt: Annotated[str, typer.Option("--format", help="table, csv, json or parquet")] = "table",
    out: Annotated[Path | None, typer.Option(help="file for --format parquet")] = None,
    storage_options: Annotated[str | None, typer.Option(help="JSON fsspec options (endpoint, keys)")] = None,
    iceberg_table: IcebergTableName = None,
    iceberg_catalog: IcebergCatalog = None,
    snapshot: Snapshot = None,
    as_of: AsOf = None,
) -> None:
    """Query a finished output with DuckDB: --sql, --summary or --similar KEY."""
    import duckdb

    from dinat_batch.pipeline.query import OutputNotReady, similar, sql, summary_queries

    if sum((sql_text is not None, summary, similar_to is not None)) != 1:
        raise typer.BadParameter("give exactly one of --sql, --summary or --similar")
    if fmt not in ("table", "csv", "json", "parquet"):
        raise typer.BadParameter(f"{fmt!r} is not one of table, csv, json, parquet", param_hint="--format")
    try:
        table = _read_table(output, storage_options, iceberg_table, iceberg_catalog, snapshot, as_of)
        if summary:
            if fmt == "json":
                sections = {
                    title: _records(sql(table, text)) for title, text in summary_queries(table).items()
                }
                typer.echo(json.dumps(sections, default=str, indent=2))
                return
            if fmt != "table":
                raise typer.BadParameter("--summary prints a table or json", param_hint="--format")
            for title, text in summary_queries(table).items():
                typer.echo(f"{title}:\n{sql(table, text)}")
            return
        _emit(similar(table, similar_to, k) if similar_to else sql(table, sql_text), fmt, out)
    except (OutputNotReady, KeyError, FileNotFoundError, duckdb.Error) as err:
        message = err.args[0] if isinstance(err, KeyError) else str(err)
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from err
