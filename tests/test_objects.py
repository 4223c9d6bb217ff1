"""An object read whole or up to a limit in one GET, empty ones included, on the S3 server and a disk."""

import pytest
import s3fs

from dinat_batch.pipeline.objects import read_object


@pytest.fixture
def requests(monkeypatch) -> list[str]:
    made = []
    call = s3fs.S3FileSystem._call_s3

    async def recorded(fs, method, *args, **kwargs):
        made.append(method)
        return await call(fs, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", recorded)
    return made


def test_an_object_is_one_get(object_store, requests):
    object_store.make_bucket("objects")
    fs = object_store.filesystem()
    fs.pipe_file("objects/small.jpg", b"0123456789")
    fs.pipe_file("objects/empty.jpg", b"")
    requests.clear()
    assert read_object(fs, "objects/small.jpg") == b"0123456789"
    assert read_object(fs, "objects/small.jpg", limit=4) == b"0123"
    assert read_object(fs, "objects/small.jpg", size=10) == b"0123456789"
    assert requests == ["get_object"] * 3  # no HEAD for the size first, as a plain cat_file asks
    assert read_object(fs, "objects/empty.jpg", size=0) == b"" and len(requests) == 3  # listed empty: none
    assert read_object(fs, "objects/empty.jpg") == b""  # a range from byte 0 of nothing: asked again
    with pytest.raises(FileNotFoundError):
        read_object(fs, "objects/missing.jpg")


def test_a_file_on_disk_too(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "empty").write_bytes(b"")
    assert (
        read_object(fs, str(tmp_path / "a")) == b"abc"
        and read_object(fs, str(tmp_path / "a"), limit=1) == b"a"
    )
    assert read_object(fs, str(tmp_path / "empty")) == b""
    with pytest.raises(FileNotFoundError):
        read_object(fs, str(tmp_path / "missing"))
