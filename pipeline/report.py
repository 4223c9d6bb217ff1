"""`dinat-batch report`: an output as one self-contained HTML page (plotly.js, thumbnails and data inlined:
it opens from disk with no network): the committed runs' summaries, the label distribution, the top-1
confidence, throughput over each run, a 2-D map of the embeddings, and thumbnails of frequent labels,
of the least confident images, of nearest neighbours, with the error rows' keys and messages.

It reads any output `pipeline/query.py` reads (a run, a nightly table, an Iceberg table). Aggregates are
computed over every row without the embeddings; the map and the neighbours use the first SAMPLE rows that
have one, and thumbnails are few and small: the page says what was sampled. Thumbnails are read only
from where the run itself read (its input, or for URI tables the places its rules allowed), so a table
that names `file:///etc/...` shows no such file.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import pyarrow as pa
import pyarrow.compute as pc
from plotly.offline import get_plotlyjs

from dinat_batch.pipeline.config import RunConfig
from dinat_batch.pipeline.iceberg import IcebergTable
from dinat_batch.pipeline.images import open_image
from dinat_batch.pipeline.locations import Location, filesystem, inside, resolve
from dinat_batch.pipeline.objects import read_object
from dinat_batch.pipeline.output import Output, leaf
from dinat_batch.pipeline.query import read_output
from dinat_batch.pipeline.stages.read import ReadRules

SAMPLE = 5000  # embeddings for the map and the neighbours
TOP_LABELS = 30
LOW_CONFIDENCE = 0.5  # a top-1 score below this counts as low confidence
PER_LABEL, LABELS_SHOWN, LEAST_CONFIDENT, NEIGHBOURS, QUERIES, ERRORS_SHOWN = 6, 5, 8, 5, 3, 50
THUMBNAIL_PX = 96
MAX_IMAGE_BYTES = 16 * 2**20  # images larger than this get no thumbnail
AGGREGATED = ["key", "status", "error", "labels", "scores", "run_id", "processed_at"]
MAX_THUMBNAIL_SOURCE_PIXELS = 25_000_000  # declared sizes above this are not decoded for a thumbnail


def summaries(
    uri: str, storage_options: dict[str, Any], iceberg: IcebergTable | None
) -> dict[str, dict[str, Any]]:
    """The committed runs' summaries, by nightly date ('' for a single run)."""
    if iceberg is not None:
        single = iceberg.committed(None)
        return {"": single} if single else dict(sorted(iceberg.commits().items()))
    output = Output(uri, storage_options)
    manifest = output.manifest()
    if manifest is not None:
        return {"": manifest}
    found = {}
    for path in sorted(output.fs.glob(f"{output.path}/run_date=*")):
        committed = output.child(leaf(path)).manifest()
        if committed is not None:
            found[leaf(path).removeprefix("run_date=")] = committed
    return found


def _places(summary: dict[str, Any]) -> tuple[Location, ...]:
    """Where a run read its images from: thumbnails come from there only."""
    fields = ("input", "output", "uri_column", "allowed_uri_prefixes")
    config = RunConfig.model_validate(
        {name: summary["config"][name] for name in fields if name in summary["config"]}
    )
    if config.uri_column is not None:
        return ReadRules.of(config, from_table=True).allowed or ()
    return (resolve(config.input),)


class Thumbnails:
    """Small JPEGs as data URIs, read from the runs' own input places, at most MAX_IMAGE_BYTES each."""

    def __init__(self, places: Iterable[Location], storage_options: dict[str, Any]):
        self.places = tuple(places)
        self.storage_options = storage_options
        self.cache: dict[str, str | None] = {}

    def __call__(self, key: str) -> str | None:
        if key not in self.cache:
            self.cache[key] = self._read(key)
        return self.cache[key]

    def _read(self, key: str) -> str | None:
        # keys with '#' name a member of a shard or a row of a table: no file to show
        if "#" in key or not inside(self.places, key):
            return None
        try:
            fs, path = filesystem(key, self.storage_options)
            data = read_object(fs, path, limit=MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:
                return None
            # the header's declared size is checked before any pixel is decoded, as the pipeline checks it
            with open_image(data, MAX_THUMBNAIL_SOURCE_PIXELS) as image:
                image.draft("RGB", (THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))  # JPEG: decode at a fraction
                image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                small = image.convert("RGB")
        except Exception:  # a thumbnail is a nicety: a failed read or decode shows the key alone
            return None
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(figure: go.Figure, name: str) -> str:
    figure.update_layout(margin={"l": 50, "r": 20, "t": 40, "b": 50}, height=380, template="plotly_white")
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=name, config={"displaylogo": False})


def _tiles(title: str, items: list[tuple[str, str]], thumbnails: Thumbnails) -> str:
    """A row of thumbnails with captions; keys without a readable image show as text."""
    cells = []
    for key, caption in items:
        source = thumbnails(key)
        picture = (
            f'<img class="thumb" src="{source}" alt="{html.escape(key)}">'
            if source
            else '<div class="nothumb">no thumbnail</div>'
        )
        cells.append(
            f'<figure title="{html.escape(key)}">{picture}<figcaption>{html.escape(caption)}<br>'
            f"<small>{html.escape(key.rsplit('/', 1)[-1])}</small></figcaption></figure>"
        )
    return f"<h3>{html.escape(title)}</h3><div class='tiles'>{''.join(cells) or '<p>none</p>'}</div>"


def _summary_table(runs: dict[str, dict[str, Any]]) -> str:
    head = [
        "date",
        "run",
        "images",
        "ok",
        "errors",
        "errors by kind",
        "images/s",
        "seconds",
        "listing s",
        "model",
        "weights sha256",
        "finished",
    ]
    rows = []
    for date, run in runs.items():
        kinds = ", ".join(f"{kind}: {count}" for kind, count in run.get("errors_by_kind", {}).items())
        values = [
            date or "-",
            run.get("run_id"),
            run.get("images"),
            run.get("ok"),
            run.get("errors"),
            kinds or "-",
            run.get("images_per_second"),
            run.get("seconds"),
            run.get("listing_seconds"),
            run.get("model"),
            str(run.get("model_sha256", ""))[:16],
            run.get("finished_at"),
        ]
        rows.append("".join(f"<td>{html.escape(str(v))}</td>" for v in values))
    header = "".join(f"<th>{name}</th>" for name in head)
    body = "".join(f"<tr>{row}</tr>" for row in rows)
    return f"<table class='runs'><tr>{header}</tr>{body}</table>"


def _top1(table: pa.Table) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """Keys, top-1 labels and top-1 scores of the rows with a prediction."""
    ok = table.filter(pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("labels"))))
    labels = pc.list_element(ok.column("labels"), 0)
    scores = pc.list_element(ok.column("scores"), 0).to_numpy(zero_copy_only=False)
    return ok.column("key").combine_chunks(), labels.combine_chunks(), scores


def _throughput(table: pa.Table) -> go.Figure:
    """Rows finished per second over each run, from the rows' processed_at."""
    figure = go.Figure()
    runs = table.column("run_id").to_numpy(zero_copy_only=False)
    times = pc.cast(table.column("processed_at"), pa.timestamp("us", tz="UTC")).to_numpy(zero_copy_only=False)
    for run in sorted(set(runs.tolist())):
        moments = np.sort(times[runs == run].astype("datetime64[us]").astype(np.int64)) / 1e6
        if len(moments) == 0:
            continue
        width = max(1.0, (moments[-1] - moments[0]) / 60)
        bins = max(1, int(np.ceil((moments[-1] - moments[0]) / width)))
        # the last row ends the last bin instead of opening one of its own
        counts = np.bincount(np.minimum((moments - moments[0]) // width, bins - 1).astype(np.int64))
        starts = [dt.datetime.fromtimestamp(moments[0] + i * width, dt.UTC) for i in range(len(counts))]
        figure.add_trace(go.Scatter(x=starts, y=counts / width, mode="lines+markers", name=run))
    figure.update_layout(
        title="throughput (images/s, from each row's processed_at)",
        xaxis_title="time (UTC)",
        yaxis_title="images/s",
    )
    return figure


def _map_and_neighbours(sample: pa.Table) -> tuple[go.Figure, list[tuple[str, list[tuple[str, float]]]], int]:
    """A PCA map of the sampled embeddings coloured by top-1 label, and a few images' nearest neighbours."""
    sample = sample.filter(pc.is_valid(sample.column("embedding")))
    if len(sample):  # an overflowed half-precision run can leave NaNs: the map cannot place them
        dim = len(sample.column("embedding")[0])
        flat = sample.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        sample = sample.filter(pa.array(np.isfinite(flat.reshape(-1, dim)).all(axis=1)))
    figure = go.Figure()
    if len(sample) < 2:
        figure.update_layout(title="embeddings: fewer than two rows with an embedding")
        return figure, [], len(sample)
    dim = len(sample.column("embedding")[0])
    vectors = (
        sample.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim).astype(np.float64)
    )
    centred = vectors - vectors.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    points = centred @ axes[:2].T
    labels = pc.list_element(sample.column("labels"), 0).to_pylist()
    keys = sample.column("key").to_pylist()
    frequent = [label for label, _ in _counts(labels)[:10]]
    for label in [*frequent, "other"]:
        chosen = [i for i, value in enumerate(labels) if (value if value in frequent else "other") == label]
        if chosen:
            figure.add_trace(
                go.Scattergl(
                    x=points[chosen, 0],
                    y=points[chosen, 1],
                    mode="markers",
                    name=label,
                    text=[keys[i] for i in chosen],
                    marker={"size": 5, "opacity": 0.7},
                )
            )
    figure.update_layout(
        title=f"embeddings, PCA to 2-D ({len(sample)} rows)", xaxis_title="PC 1", yaxis_title="PC 2"
    )
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    neighbours = []
    for query in np.linspace(0, len(sample) - 1, min(QUERIES, len(sample))).astype(int).tolist():
        similarity = unit @ unit[query]
        order = [i for i in np.argsort(-similarity).tolist() if i != query][:NEIGHBOURS]
        neighbours.append((keys[query], [(keys[i], float(similarity[i])) for i in order]))
    return figure, neighbours, len(sample)


def _counts(values: list) -> list[tuple[Any, int]]:
    found: dict[Any, int] = {}
    for value in values:
        found[value] = found.get(value, 0) + 1
    return sorted(found.items(), key=lambda item: (-item[1], str(item[0])))


def build(
    uri: str,
    out: Path,
    storage_options: dict[str, Any] | None = None,
    iceberg: IcebergTable | None = None,
) -> Path:
    """Write the report of the output at `uri` to `out` (HTML); returns its path."""
    storage_options = storage_options or {}
    runs = summaries(uri, storage_options, iceberg)
    table = read_output(uri, storage_options, iceberg, columns=AGGREGATED)
    sample = read_output(
        uri, storage_options, iceberg, columns=["key", "labels", "embedding"], limit=SAMPLE, valid="embedding"
    )
    places = [place for run in runs.values() for place in _places(run)]
    thumbnails = Thumbnails(places, storage_options)

    keys, labels, scores = _top1(table)
    label_counts = pc.value_counts(labels).to_pylist()
    label_counts.sort(key=lambda item: (-item["counts"], str(item["values"])))
    top = label_counts[:TOP_LABELS]
    bars = go.Figure(go.Bar(x=[str(item["values"]) for item in top], y=[item["counts"] for item in top]))
    bars.update_layout(
        title=f"top-1 labels (the {len(top)} most frequent of {len(label_counts)})", yaxis_title="images"
    )
    histogram = go.Figure(go.Histogram(x=scores, xbins={"start": 0, "end": 1.0001, "size": 0.05}))
    histogram.update_layout(title="top-1 confidence", xaxis_title="top-1 score", yaxis_title="images")
    low = float(np.mean(scores < LOW_CONFIDENCE)) if len(scores) else 0.0
    embedding_map, neighbours, sampled = _map_and_neighbours(sample)

    sections = [
        f"<h2>Runs</h2>{_summary_table(runs)}",
        f"<h2>Labels and confidence</h2>{_figure(bars, 'labels')}{_figure(histogram, 'confidence')}"
        f"<p class='note'>{low:.1%} of {len(scores)} classified images have a top-1 score below {LOW_CONFIDENCE}.</p>",
        f"<h2>Throughput</h2>{_figure(_throughput(table), 'throughput')}",
        f"<h2>Embeddings</h2>{_figure(embedding_map, 'embeddings')}",
    ]
    label_list, key_list = labels.to_pylist(), keys.to_pylist()
    order = np.argsort(scores, kind="stable")
    tiles = []
    for item in top[:LABELS_SHOWN]:
        members = [i for i, label in enumerate(label_list) if label == item["values"]][:PER_LABEL]
        tiles.append(
            _tiles(
                f"label {item['values']}", [(key_list[i], f"{scores[i]:.3f}") for i in members], thumbnails
            )
        )
    tiles.append(
        _tiles(
            "least confident",
            [(key_list[i], f"{label_list[i]} {scores[i]:.3f}") for i in order[:LEAST_CONFIDENT]],
            thumbnails,
        )
    )
    for query, found in neighbours:
        tiles.append(
            _tiles(
                f"nearest neighbours of {query.rsplit('/', 1)[-1]}",
                [(query, "query")] + [(key, f"cosine {similarity:.3f}") for key, similarity in found],
                thumbnails,
            )
        )
    sections.append(f"<h2>Images</h2>{''.join(tiles)}")
    errors = table.filter(pc.equal(table.column("status"), "error"))
    error_rows = "".join(
        f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(str(error))}</td></tr>"
        for key, error in zip(
            errors.column("key").to_pylist()[:ERRORS_SHOWN],
            errors.column("error").to_pylist()[:ERRORS_SHOWN],
            strict=True,
        )
    )
    sections.append(
        f"<h2>Errors ({len(errors)})</h2><table class='errors'><tr><th>key</th><th>error</th></tr>{error_rows}</table>"
        + (
            f"<p class='note'>the first {ERRORS_SHOWN} of {len(errors)}</p>"
            if len(errors) > ERRORS_SHOWN
            else ""
        )
    )
    notes = (
        f"{len(table)} rows; labels, confidence and throughput over all of them; the map and the neighbours over "
        f"the first {sampled} rows with an embedding{' (sampled)' if sampled < len(scores) else ''}; thumbnails read "
        f"from the runs' input places only, at most {THUMBNAIL_PX} px."
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dinat-batch report: {html.escape(uri)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; }} td, th {{ border: 1px solid #ccc; padding: 3px 6px; }}
.tiles {{ display: flex; flex-wrap: wrap; gap: 8px; }} figure {{ margin: 0; width: {THUMBNAIL_PX + 20}px; font-size: 0.75em; }}
.thumb {{ max-width: {THUMBNAIL_PX}px; max-height: {THUMBNAIL_PX}px; display: block; }}
.nothumb {{ width: {THUMBNAIL_PX}px; height: {THUMBNAIL_PX // 2}px; background: #eee; color: #888; font-size: 0.8em; }}
.note {{ color: #555; font-size: 0.9em; }}
</style>
<script>{get_plotlyjs()}</script></head>
<body><h1>dinat-batch report</h1>
<p>{html.escape(uri)}, written {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}</p><p class="note">{html.escape(notes)}</p>
{"".join(sections)}
</body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
