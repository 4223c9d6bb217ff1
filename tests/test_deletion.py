"""Deleting a run's files in bulk: exactly the files named, on S3 in requests of 1,000 keys per bucket, a
refusal by the store never taken for a deletion, and stores without bulk deletions served key by key."""

import fsspec
import pytest
from botocore.exceptions import ClientError
from s3fs.errors import translate_boto_error

from dinat_batch.pipeline.deletion import delete_files
from dinat_batch.pipeline.parallel import in_threads


def _put(fs, paths: list[str]) -> None:
    in_threads(lambda path: fs.pipe_file(path, b"x"), paths)


def _left(fs, folder: str) -> list[str]:
    """The files under `folder` (SeaweedFS lists a folder emptied of its files as a file of its own)."""
    return [path for path in fs.find(folder) if path != folder]


def _on_s3(object_store, name: str, bucket: str = "deletion") -> tuple:
    object_store.make_bucket(bucket)
    return object_store.filesystem(), f"{bucket}/{name}"


def _requests(fs, monkeypatch, answer=None) -> list[tuple[str, list[str]]]:
    """The DeleteObjects requests `fs` makes from here on: (bucket, keys) each; `answer(bucket, keys)`
    stands in for the store where given."""
    made = []
    call = fs.call_s3

    def recorded(method, Bucket, Delete):
        keys = [entry["Key"] for entry in Delete["Objects"]]
        made.append((Bucket, keys))
        return answer(Bucket, keys) if answer else call(method, Bucket=Bucket, Delete=Delete)

    monkeypatch.setattr(fs, "call_s3", recorded)
    return made


def test_s3_deletes_exactly_the_files_named_in_requests_of_a_thousand(object_store, monkeypatch):
    fs, root = _on_s3(object_store, "bulk")
    _, other = _on_s3(object_store, "bulk", bucket="deletion-other")
    ours = [f"{root}/_staging/run.0/chunk-{i:05d}.parquet" for i in range(1203)] + [f"{other}/part-0.parquet"]
    theirs = [f"{root}/_staging/run.0/notes.txt", f"{root}/part-0.parquet", f"{root}2/chunk-00000.parquet"]
    _put(fs, ours + theirs)
    made = _requests(fs, monkeypatch)
    delete_files(fs, [*ours, f"{root}/never-there.parquet"])  # a file already gone is no error
    assert sorted((bucket, len(keys)) for bucket, keys in made) == [
        ("deletion", 204),
        ("deletion", 1000),
        ("deletion-other", 1),
    ]
    assert sorted(_left(fs, root)) == sorted(theirs[:2])
    assert _left(fs, f"{root}2") == [theirs[2]] and _left(fs, other) == []


def test_s3_keys_the_store_kept_raise_and_stay(object_store, monkeypatch):
    """S3 answers a DeleteObjects request that it carried out only in part with 200 and a list of the keys it
    kept: denied (a policy, an object lock) raises, naming one; throttled is asked again, key by key."""
    fs, root = _on_s3(object_store, "refused")
    paths = [f"{root}/chunk-{i}.parquet" for i in range(3)]
    _put(fs, paths)
    locked = paths[1].split("/", 1)[1]
    call = fs.call_s3

    def one_locked(bucket, keys):
        gone = [{"Key": key} for key in keys if key != locked]
        call("delete_objects", Bucket=bucket, Delete={"Objects": gone, "Quiet": True})
        return {"Errors": [{"Key": locked, "Code": "AccessDenied", "Message": "Access Denied"}]}

    _requests(fs, monkeypatch, one_locked)
    with pytest.raises(
        PermissionError, match=rf"kept 1 of the files .* s3://deletion/{locked}: AccessDenied"
    ):
        delete_files(fs, paths)
    assert _left(fs, root) == [paths[1]]  # the other two went

    monkeypatch.undo()
    throttled = iter([[{"Key": locked, "Code": "SlowDown", "Message": "Reduce your request rate"}]])

    def slow_once(bucket, keys):
        call(
            "delete_objects", Bucket=bucket, Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True}
        )
        return {"Errors": next(throttled, [])}

    made = _requests(fs, monkeypatch, slow_once)
    _put(fs, paths)
    delete_files(fs, paths)
    assert [keys for _, keys in made] == [[path.split("/", 1)[1] for path in paths], [locked]]
    assert _left(fs, root) == []


def test_a_refused_request_raises_and_a_store_without_bulk_deletions_is_served_key_by_key(
    object_store, monkeypatch
):
    fs, root = _on_s3(object_store, "whole")
    paths = [f"{root}/chunk-{i}.parquet" for i in range(3)]
    _put(fs, paths)

    def denied(bucket, keys):
        raise PermissionError("Access Denied")

    _requests(fs, monkeypatch, denied)
    with pytest.raises(PermissionError):
        delete_files(fs, paths)

    def no_bulk(bucket, keys):  # older MinIO, Ceph and the like, to botocore's CRC32 in place of Content-MD5
        error = {"Error": {"Code": "InvalidRequest", "Message": "Missing required header: Content-MD5"}}
        raise translate_boto_error(ClientError(error, "DeleteObjects"))

    made = _requests(fs, monkeypatch, no_bulk)
    delete_files(fs, [*paths, f"{root}/never-there.parquet"])
    assert len(made) == 1 and _left(fs, root) == []


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
