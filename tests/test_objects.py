"""An object read whole or up to a limit: on the S3 server in one GET, empty ones included; on a disk and
a web server as fsspec reads them, the limit kept."""

import fsspec
import pytest

from dinat_batch.pipeline.objects import read_object
from tests.web import serving


def test_an_object_is_one_get(object_store, s3_requests):
    object_store.make_bucket("objects")
    fs = object_store.filesystem()
    fs.pipe_file("objects/small.jpg", b"0123456789")
    fs.pipe_file("objects/empty.jpg", b"")
    s3_requests.clear()
    assert read_object(fs, "objects/small.jpg") == b"0123456789"
    assert read_object(fs, "objects/small.jpg", limit=4) == b"0123"
    assert read_object(fs, "objects/small.jpg", size=10) == b"0123456789"
    assert s3_requests == ["get_object"] * 3  # no HEAD for the size first, as a plain cat_file asks
    assert read_object(fs, "objects/empty.jpg", size=0) == b"" and len(s3_requests) == 3  # listed empty: none
    # a range from byte 0 of nothing is refused (416): the size, asked then, says it is empty
    assert read_object(fs, "objects/empty.jpg") == b"" and s3_requests[3:] == ["get_object", "head_object"]
    with pytest.raises(FileNotFoundError):
        read_object(fs, "objects/missing.jpg")
    assert s3_requests[5:] == ["get_object"]


def test_a_limit_holds_on_a_web_server_that_ignores_ranges(tmp_path):
    """fsspec's HTTP filesystem reads a whole answer whatever range it asked for: the limit is read
    through a file."""
    (tmp_path / "big.jpg").write_bytes(b"x" * 1_000_000)
    with serving(tmp_path) as root:
        assert read_object(fsspec.filesystem("http"), f"{root}/big.jpg", limit=11) == b"x" * 11


def test_a_file_on_disk_too(tmp_path):
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
