"""`dinat-batch report`: one self-contained page, checked in a real browser (Debian's Chromium, driven by
Playwright) with the network off: no console error, no request leaving the page, every chart drawn and
every thumbnail decoded. The screenshot is kept in test-artifacts/."""

import datetime as dt
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from dinat_batch.pipeline.cli import app
from dinat_batch.pipeline.config import RunConfig
from dinat_batch.pipeline.locations import resolve
from dinat_batch.pipeline.report import Thumbnails, _map_and_neighbours, _throughput
from tests.data import image_folder

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHARTS = ["labels", "confidence", "throughput", "embeddings"]


def render(page_path: Path, screenshot: Path) -> dict:
    """Open the page from disk offline; what the browser saw."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Chromium is missing: `make test` installs it (apt-get install chromium)"
    problems, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        context = browser.new_context(offline=True, viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.on("console", lambda message: message.type == "error" and problems.append(message.text))
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("request", lambda request: requests.append(request.url))
        page.goto(page_path.as_uri(), wait_until="load")
        page.wait_for_function(
            "ids => ids.every(id => document.querySelector(`#${id} .main-svg`))", arg=CHARTS, timeout=30_000
        )
        seen = page.evaluate(
            """ids => ({
                charts: ids.filter(id => document.querySelector(`#${id} .main-svg`)),
                points: document.querySelectorAll('#embeddings .scatterlayer .trace, #embeddings canvas').length,
                thumbnails: [...document.querySelectorAll('img.thumb')].map(i => i.complete && i.naturalWidth > 0),
            })""",
            CHARTS,
        )
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    seen["problems"] = problems
    seen["outside"] = [url for url in requests if not url.startswith(("file:", "data:", "blob:"))]
    return seen


def test_a_report_of_a_run_opens_offline_with_every_chart_and_thumbnail(tmp_path, tiny_model, ray_session):
    from dinat_batch.pipeline.run import run

    images = image_folder(tmp_path / "in", 8, extra={"broken.jpg": b"not a jpeg"})
    config = RunConfig(input=str(images), output=str(tmp_path / "out"), model=str(tiny_model), batch_size=4)
    run(config)
    written = CliRunner().invoke(app, ["report", config.output, "--out", str(tmp_path / "report.html")])
    assert written.exit_code == 0, written.output
    page = tmp_path / "report.html"
    text = page.read_text()
    assert "broken.jpg" in text and "DecodeError" in text  # the error row, with its message
    ARTIFACTS.mkdir(exist_ok=True)
    seen = render(page, ARTIFACTS / "report.png")
    assert seen["problems"] == [] and seen["outside"] == []
    assert seen["charts"] == CHARTS
    assert seen["thumbnails"] and all(seen["thumbnails"]), seen["thumbnails"]
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_thumbnails_come_only_from_where_the_run_read(tmp_path):
    """A key outside the run's input places (a table naming a local system file) shows no thumbnail."""
    images = image_folder(tmp_path / "in", 1)
    inside = str(next(images.iterdir()))
    thumbnails = Thumbnails([resolve(str(images))], {})
    assert thumbnails(inside).startswith("data:image/jpeg;base64,")
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(inside, outside)
    assert thumbnails(str(outside)) is None and thumbnails("file:///etc/hostname") is None
    assert thumbnails(f"{inside}#member.jpg") is None
    (images / "[x]").mkdir()  # a folder name with a glob character must not shorten the checked path
    assert thumbnails(f"{images}/[x]/../../elsewhere.jpg") is None
    assert thumbnails(f" {inside}") is None  # opened as written: not the file the check would see
    assert thumbnails(f"{outside}::/../in/{Path(inside).name}") is None  # inside by its path, not opened
    bomb = images / "bomb.png"  # inside, but declares 36M pixels in a few kB: never decoded
    Image.new("L", (6000, 6000)).save(bomb)
    assert thumbnails(str(bomb)) is None


def test_throughput_bins_and_a_map_without_non_finite_rows():
    """A steady run shows a steady rate to its last bin; NaN embeddings are left off the map."""
    start = dt.datetime(2026, 11, 29, tzinfo=dt.UTC)
    moments = [start + dt.timedelta(seconds=i / 10) for i in range(3001)]  # 10 images/s for 300 s
    rows = pa.table(
        {"run_id": ["r"] * len(moments), "processed_at": pa.array(moments, pa.timestamp("us", tz="UTC"))}
    )
    rates = _throughput(rows).data[0].y
    assert len(rates) == 60 and min(rates) >= 9.5 and max(rates) <= 10.5
    embedding = pa.array([[1.0, 0.0], [0.0, 1.0], [float("nan"), 1.0], [1.0, 1.0]], pa.list_(pa.float32(), 2))
    sample = pa.table({"key": list("abcd"), "labels": [["x"]] * 4, "embedding": embedding})
    figure, neighbours, kept = _map_and_neighbours(sample)
    assert sum(len(trace.x) for trace in figure.data) == 3
    assert kept == 3 and all(key != "c" for query, found in neighbours for key, _ in [(query, 0), *found])


@pytest.mark.parametrize("flags", [["--iceberg-table", "dinat.t"], ["--iceberg-catalog", json.dumps({})]])
def test_iceberg_report_needs_table_and_catalog(tmp_path, flags):
    result = CliRunner().invoke(app, ["report", str(tmp_path), *flags])
    assert result.exit_code == 2 and "needs both" in result.output
