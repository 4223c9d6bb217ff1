"""Set operations on Ray datasets: one task for small sets, Ray's hash joins and groupings for large ones;
both routes give the same rows, and the digest of a column equals the digest of its values."""

import pyarrow as pa
import pytest
import ray

from dinat_batch.pipeline import selection
from dinat_batch.pipeline.digest import KeyDigest


def dataset(table: pa.Table, blocks: int = 3) -> ray.data.Dataset:
    size = -(-table.num_rows // blocks)
    return ray.data.from_arrow([table.slice(start, size) for start in range(0, table.num_rows, size)])


def rows(result: ray.data.Dataset, by: str) -> list[dict]:
    return sorted(result.take_all(), key=lambda row: row[by])


def keys_of(group: pa.Table) -> pa.Table:
    return pa.table(
        {"uri": [group.column("source")[0].as_py()], "keys": [sorted(group.column("key").to_pylist())]}
    )


@pytest.fixture(params=["one task", "hash partitioned"])
def route(request, monkeypatch):
    monkeypatch.setattr(selection, "SMALL", 10**9 if request.param == "one task" else 0)
    monkeypatch.setattr(selection, "ROWS_PER_PARTITION", 8)  # two partitions even for a few rows
    # one aggregator actor holds both partitions: the same route, half the actor starts (seconds each)
    monkeypatch.setattr(ray.data.DataContext.get_current(), "max_hash_shuffle_aggregators", 1)
    return request.param


def test_routes_give_the_same_rows(route, ray_session):
    listing = pa.table(
        {
            "uri": [f"s3://b/{i:02d}.tar" for i in range(12)],
            "version": [str(i % 3) for i in range(12)],
        }
    )
    seen = pa.table({"uri": ["s3://b/01.tar", "s3://b/02.tar", "s3://b/99.tar"], "version": ["1", "0", "0"]})
    left = rows(
        selection.without(dataset(listing), dataset(seen, 2), ("uri", "version"), ("uri", "version")), "uri"
    )
    # 01 matches on both columns; 02 has another version: changed, so it stays
    assert [row["uri"] for row in left] == [f"s3://b/{i:02d}.tar" for i in range(12) if i != 1]

    done = pa.table(
        {
            "key": ["s3://b/03.tar#a", "s3://b/03.tar#b", "s3://b/05.tar#a", "s3://b/77.tar#x"],
            "source": ["s3://b/03.tar", "s3://b/03.tar", "s3://b/05.tar", "s3://b/77.tar"],
        }
    )
    grouped = selection.each_group(dataset(done, 2), "source", keys_of)
    assert rows(grouped, "uri") == [
        {"uri": "s3://b/03.tar", "keys": ["s3://b/03.tar#a", "s3://b/03.tar#b"]},
        {"uri": "s3://b/05.tar", "keys": ["s3://b/05.tar#a"]},
        {"uri": "s3://b/77.tar", "keys": ["s3://b/77.tar#x"]},
    ]
    attached = {
        row["uri"]: row["keys"] for row in selection.attach(dataset(listing), grouped, "uri").take_all()
    }
    assert len(attached) == 12 and "s3://b/77.tar" not in attached
    assert list(attached["s3://b/03.tar"]) == ["s3://b/03.tar#a", "s3://b/03.tar#b"]
    assert attached["s3://b/04.tar"] is None


def test_digest_of_a_column(ray_session):
    uris = [f"s3://b/{i}.jpg" for i in range(50)]
    assert selection.digest(dataset(pa.table({"uri": uris}), 4), "uri") == KeyDigest().add(uris)
