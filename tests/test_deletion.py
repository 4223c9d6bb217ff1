"""Deleting a run's files in bulk: exactly the files named, on S3 in requests of 1,000 keys, and a refusal
by the store never taken for a deletion."""

from concurrent.futures import ThreadPoolExecutor

import fsspec
import pytest

from dinat_batch.pipeline.deletion import delete_files


def _put(fs, paths: list[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda path: fs.pipe_file(path, b"x"), paths))


def _on_s3(object_store, name: str) -> tuple:
    object_store.make_bucket("deletion")
    return object_store.filesystem(), f"deletion/{name}"


def test_s3_deletes_exactly_the_files_named_in_requests_of_a_thousand(object_store, monkeypatch):
    fs, root = _on_s3(object_store, "bulk")
    ours = [f"{root}/_staging/run.0/chunk-{i:05d}.parquet" for i in range(1203)]
    theirs = [f"{root}/_staging/run.0/notes.txt", f"{root}/part-0.parquet", f"{root}2/chunk-00000.parquet"]
    _put(fs, ours + theirs)
    requests = []
    call = fs.call_s3

    def counted(method, **kwargs):
        requests.append((method, len(kwargs["Delete"]["Objects"])))
        return call(method, **kwargs)

    monkeypatch.setattr(fs, "call_s3", counted)
    delete_files(fs, [*ours, f"{root}/never-there.parquet"])  # a file already gone is no error
    assert sorted(requests) == [("delete_objects", 204), ("delete_objects", 1000)]
    fs.invalidate_cache()
    assert sorted(fs.find(root)) == sorted(theirs[:2])
    assert fs.find(f"{root}2") == [theirs[2]]


def test_s3_keys_the_store_kept_raise_and_stay(object_store, monkeypatch):
    """S3 answers a DeleteObjects request that it carried out only in part with 200 and a list of the keys it
    kept (denied by a policy, an object lock): the removal raises, naming one, and that file stays."""
    fs, root = _on_s3(object_store, "refused")
    paths = [f"{root}/chunk-{i}.parquet" for i in range(3)]
    _put(fs, paths)
    locked = paths[1].split("/", 1)[1]
    call = fs.call_s3

    def one_locked(method, Bucket, Delete):
        objects = [entry for entry in Delete["Objects"] if entry["Key"] != locked]
        answer = call(method, Bucket=Bucket, Delete={**Delete, "Objects": objects})
        return {**answer, "Errors": [{"Key": locked, "Code": "AccessDenied", "Message": "Access Denied"}]}

    monkeypatch.setattr(fs, "call_s3", one_locked)
    with pytest.raises(OSError, match=rf"kept 1 of 3 files .* s3://deletion/{locked}: AccessDenied"):
        delete_files(fs, paths)
    fs.invalidate_cache()
    assert fs.find(root) == [paths[1]]


def test_a_refused_request_raises(object_store, monkeypatch):
    fs, root = _on_s3(object_store, "denied")
    paths = [f"{root}/chunk-0.parquet"]
    _put(fs, paths)

    def denied(method, **kwargs):
        raise PermissionError("Access Denied")

    monkeypatch.setattr(fs, "call_s3", denied)
    with pytest.raises(PermissionError):
        delete_files(fs, paths)
    assert fs.find(root) == paths


@pytest.mark.standalone
def test_other_stores_delete_file_by_file(monkeypatch):
    fs = fsspec.filesystem("memory")
    ours = [f"/deletion/run/chunk-{i}.parquet" for i in range(40)]
    _put(fs, [*ours, "/deletion/run/notes.txt"])
    delete_files(fs, [*ours, "/deletion/run/never-there.parquet"])
    assert fs.find("/deletion") == ["/deletion/run/notes.txt"]

    def denied(path):
        raise PermissionError(path)

    monkeypatch.setattr(fs, "rm_file", denied)
    with pytest.raises(PermissionError, match=r"notes\.txt"):
        delete_files(fs, ["/deletion/run/notes.txt"])
