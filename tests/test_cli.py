"""`dinat-batch predict` as a user runs it, on a checkpoint folder and local images."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from dinat_batch.pipeline.cli import app
from dinat_batch.pipeline.config import ConfigError, RunConfig
from dinat_batch.pipeline.model.export import random_model, save_checkpoint
from tests.data import direct_predictions, image_folder
from tests.model.test_dinat import shortened


def test_predict_prints_top_k_and_flags_broken_images(tmp_path):
    folder = save_checkpoint(random_model(shortened("dinat-mini-in1k-224"), seed=2), tmp_path / "ckpt")
    image = tmp_path / "photo.png"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    image.write_bytes(buf.getvalue())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")

    result = CliRunner().invoke(
        app, ["predict", str(image), str(broken), "--model", str(folder), "--top-k", "3"]
    )
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0] == str(image) and lines[4] == str(broken)
    assert "error: ImageDecodeError(undecodable): not a recognised image format" in lines[5]

    ids, scores, _ = direct_predictions(folder, {"photo": image.read_bytes()}, top_k=3)["photo"]
    for line, score, label_id in zip(lines[1:4], scores.tolist(), ids, strict=True):
        assert line.split() == [f"{score:.4f}", f"LABEL_{label_id}", f"({label_id})"]


def test_predict_refuses_bad_options_and_models(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "x.jpg", "--storage-options", "{not json"])
    assert result.exit_code == 2 and "not valid JSON" in result.output
    result = runner.invoke(app, ["predict", "x.jpg", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "no config.json" in result.output


def test_run_from_a_config_file_with_flag_overrides(tmp_path, tiny_model, ray_session):
    images = image_folder(tmp_path / "images", 3, {"broken.jpg": b""})
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {images}\noutput: {tmp_path / 'out'}\nmodel: {tiny_model}\ntop_k: 5\nbatch_size: 2\n"
    )

    result = CliRunner().invoke(app, ["run", "--config", str(job), "--top-k", "2"])

    assert result.exit_code == 0, result.output
    assert "4 images, 3 ok, 1 errors (ImageDecodeError(empty): 1)" in result.output
    assert f"output: {tmp_path / 'out'} (committed" in result.output
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 4
    assert {len(labels) for labels in table.column("labels").to_pylist() if labels} == {2}
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text())["config"]["top_k"] == 2

    again = CliRunner().invoke(app, ["run", "--config", str(job)])
    assert again.exit_code == 2 and "already holds a run that finished" in again.output


def test_run_names_the_invalid_field_before_any_work(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("input: s3://bucket/images\noutput: s3://bucket/out\nbatchsize: 8\n")
    result = CliRunner().invoke(app, ["run", "--config", str(job), "--top-k", "0"])
    assert result.exit_code == 2
    assert "top_k (--top-k)" in result.output and "batchsize" in result.output
    result = CliRunner().invoke(app, ["run", "--output", "out"])
    assert result.exit_code == 2 and "input (--input): Field required" in result.output


@pytest.mark.apart
def test_demo_runs_end_to_end_and_stops_everything(tmp_path):
    """The README's first command, offline: a random dinat-mini, said so, its report written, and nothing
    left running."""

    done = subprocess.run(
        [str(Path(sys.executable).parent / "dinat-batch"), "demo"],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = tmp_path / "demo-report.html"
    assert f"report (one HTML page, opens offline): {report}" in done.stdout
    assert (
        report.stat().st_size > 1_000_000 and "truncated.jpg" in report.read_text()
    )  # plotly.js, an error row
    assert "RANDOMLY INITIALISED" in done.stdout
    assert "27 images, 24 ok, 3 errors" in done.stdout
    assert "│ error   │      3 │" in done.stdout
    # its own store is gone (found by its port: other test processes may run stores of their own)
    port = re.search(r"local S3 \(SeaweedFS\) on http://127.0.0.1:(\d+)", done.stdout).group(1)
    found = subprocess.run(["pgrep", "-f", f"weed server .*-s3.port={port} "], capture_output=True, text=True)
    assert found.stdout == ""


def test_max_error_rate_fails_the_run_after_writing_its_rows(tmp_path, tiny_model, ray_session):
    images = image_folder(tmp_path / "images", 3, {"broken.jpg": b"not a jpeg"})
    args = ["run", "--input", str(images), "--model", str(tiny_model), "--output"]

    failed = CliRunner().invoke(app, [*args, str(tmp_path / "strict"), "--max-error-rate", "0.2"])
    assert failed.exit_code == 1
    assert "1 of 4 rows are errors (25.0%), above max_error_rate 20.0%" in failed.output
    assert not (tmp_path / "strict" / "_SUCCESS").exists()
    failure = json.loads((tmp_path / "strict" / "_FAILURE").read_text())
    assert failure["errors_by_kind"] == {"ImageDecodeError(undecodable)": 1} and "above" in failure["failed"]
    assert pq.read_table(tmp_path / "strict").num_rows == 4

    passed = CliRunner().invoke(app, [*args, str(tmp_path / "lenient"), "--max-error-rate", "0.25"])
    assert passed.exit_code == 0, passed.output


def test_every_config_field_has_its_flag_and_help():
    runner = CliRunner()
    for command, skipped in (("run", set()), ("nightly", {"run_id"})):  # a nightly run names itself
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "300", "TERM": "dumb"}).output
        assert ("--run-id" in text) == (command == "run")
        for name, field in RunConfig.model_fields.items():
            flag = f"--{name.replace('_', '-')}"
            if name in skipped:
                continue
            assert flag in text, (command, flag)
            assert field.description[:40] in " ".join(text.split()), (command, name)


def test_flags_of_every_type_reach_the_config(monkeypatch):
    seen = {}

    def capture(config):
        seen["config"] = config
        raise ConfigError("captured, not run")

    monkeypatch.setattr("dinat_batch.pipeline.run.run", capture)
    flags = {
        "--input": "s3://in/images",
        "--output": "s3://out/table",
        "--top-k": "3",
        "--max-error-rate": "0.5",
        "--compile": "graphs",
        "--rows-per-file": "1000",
        "--chunk-rows": "64",
        "--lease-timeout": "30",
        "--max-bytes-per-image": "1024",
        "--storage-options": '{"endpoint_url": "http://127.0.0.1:9000"}',
    }
    args = [part for pair in flags.items() for part in pair]
    args += ["--allowed-uri-prefixes", "s3://in", "--allowed-uri-prefixes", "s3://more", "--overwrite"]
    assert "captured, not run" in CliRunner().invoke(app, ["run", *args]).output
    config = seen["config"]
    assert (config.top_k, config.max_error_rate, config.compile) == (3, 0.5, "graphs")
    assert (config.rows_per_file, config.chunk_rows, config.lease_timeout) == (1000, 64, 30.0)
    assert config.max_bytes_per_image == 1024 and config.overwrite is True
    assert config.allowed_uri_prefixes == ["s3://in", "s3://more"]
    assert config.storage_options == {"endpoint_url": "http://127.0.0.1:9000"}
    assert config.batch_size is None and config.uri_column is None  # not given: the defaults

    refused = CliRunner().invoke(app, ["run", *args[:4], "--compile", "fast"])
    assert refused.exit_code == 2 and "fast" in refused.output
    refused = CliRunner().invoke(app, ["run", *args[:4], "--storage-options", "[1]"])
    assert refused.exit_code == 2 and "must be a JSON object" in refused.output
