"""`dinat-batch query` on real pipeline output, local and s3://: SQL in every format, summary, similarity."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dinat_batch.pipeline.cli import app
from dinat_batch.pipeline.run import run
from tests.data import photos


@pytest.fixture(scope="module", params=["local", "s3"])
def finished(request, tmp_path_factory, tiny_model, ray_session, object_store):
    """(output URI, storage options JSON, the output table) of one finished run with an error row."""
    import fsspec

    if request.param == "local":
        root, options = str(tmp_path_factory.mktemp("query")), {}
    else:
        object_store.make_bucket("query-tests")
        root, options = "s3://query-tests", object_store.storage_options
    for name, data in {**photos(5), "broken.jpg": b"garbage"}.items():
        with fsspec.open(f"{root}/images/{name}", "wb", **options) as f:
            f.write(data)
    output = f"{root}/out"
    run({"input": f"{root}/images", "output": output, "model": str(tiny_model), "storage_options": options})
    fs, path = fsspec.core.url_to_fs(output, **options)
    return output, json.dumps(options), pq.read_table(path, filesystem=fs)


def query(finished, *args):
    output, options, _ = finished
    return CliRunner().invoke(app, ["query", output, "--storage-options", options, *args])


def test_sql_in_every_format(finished, tmp_path):
    sql = "SELECT key, status, labels FROM predictions ORDER BY key"
    table = query(finished, "--sql", sql)
    assert table.exit_code == 0, table.output
    assert "broken.jpg" in table.output and "│ error" in table.output

    rows = [
        json.loads(line) for line in query(finished, "--sql", sql, "--format", "json").output.splitlines()
    ]
    assert len(rows) == 6 and rows[0]["key"].endswith("broken.jpg") and rows[0]["labels"] is None
    assert len(rows[1]["labels"]) == 5

    csv_lines = query(finished, "--sql", sql, "--format", "csv").output.splitlines()
    assert csv_lines[0] == "key,status,labels" and len(csv_lines) == 7

    target = tmp_path / "result.parquet"
    assert query(finished, "--sql", sql, "--format", "parquet", "--out", str(target)).exit_code == 0
    assert pq.read_table(target).num_rows == 6


def test_summary(finished):
    result = query(finished, "--summary", "--format", "json")
    assert result.exit_code == 0, result.output
    sections = json.loads(result.output)
    (run_row,) = sections["runs"]
    assert (run_row["images"], run_row["ok"], run_row["errors"]) == (6, 5, 1)
    assert sections["errors by kind"] == [{"kind": "ImageDecodeError(undecodable)", "images": 1}]
    assert sum(row["images"] for row in sections["top labels"]) == 5
    assert "top labels:" in query(finished, "--summary").output


def test_similar_matches_numpy_cosine(finished):
    _, _, table = finished
    ok = table.filter(table["status"].to_numpy(zero_copy_only=False) == "ok")
    keys = ok["key"].to_pylist()
    vectors = np.stack(ok["embedding"].to_numpy(zero_copy_only=False))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = vectors @ vectors[0]
    expected = [keys[i] for i in np.argsort(-similarity) if i != 0][:3]

    result = query(finished, "--similar", keys[0], "--k", "3", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [row["key"] for row in rows] == expected
    np.testing.assert_allclose(
        [row["similarity"] for row in rows], sorted(similarity[1:])[::-1][:3], atol=1e-5
    )


def test_refusals(finished, tmp_path):
    assert "exactly one of" in query(finished, "--summary", "--sql", "SELECT 1").output
    missing = query(finished, "--similar", "no-such-key")
    assert missing.exit_code == 2 and "no row with key 'no-such-key'" in missing.output
    bad_sql = query(finished, "--sql", "SELECT nope FROM predictions")
    assert bad_sql.exit_code == 2 and "nope" in bad_sql.output
    (tmp_path / "part.parquet").write_bytes(b"")
    unfinished = CliRunner().invoke(app, ["query", str(tmp_path), "--summary"])
    assert unfinished.exit_code == 2 and "no _SUCCESS marker" in unfinished.output
