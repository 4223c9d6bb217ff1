"""URIs taken as one name: what `resolve` and `inside` place is what `filesystem` opens, with `::`, URLs
inside keys and dot segments."""

import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from dinat_batch.pipeline.locations import (
    filesystem,
    inside,
    options_for,
    redirected,
    resolve,
    split_protocol,
)
from dinat_batch.pipeline.objects import read_object
from dinat_batch.pipeline.stages.read import LOCATED, ReadRules, read_objects
from tests.web import QuietFiles, serving


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://b/k.jpg", ("s3", "b/k.jpg")),
        ("s3://b/crawl/https://host/a.jpg", ("s3", "b/crawl/https://host/a.jpg")),  # a URL in a key
        ("/in/a::b/c.jpg", (None, "/in/a::b/c.jpg")),
        ("/in/x://y", (None, "/in/x://y")),  # `/in/x` is no protocol
        ("C://data", (None, "C://data")),  # a Windows drive, as fsspec reads it
    ],
)
def test_only_a_leading_scheme_is_a_protocol(uri, expected):
    assert split_protocol(uri) == expected


def test_a_name_with_double_colons_is_opened_as_written(tmp_path):
    """fsspec alone reads `a::b/c.jpg` as a chain of filesystems and opens `a`."""
    (tmp_path / "a").write_bytes(b"the wrong file")
    (tmp_path / "a::b").mkdir()
    (tmp_path / "a::b" / "c.jpg").write_bytes(b"the image")
    for uri in (f"{tmp_path}/a::b/c.jpg", f"file://{tmp_path}/a::b/c.jpg"):
        fs, path = filesystem(uri, {})
        assert isinstance(fs, LocalFileSystem) and fs.cat_file(path) == b"the image"
    fs, path = filesystem("s3://b/a::b/c.jpg", {"anon": True})
    assert path == "b/a::b/c.jpg" and fs.split_path(path)[:2] == ("b", "a::b/c.jpg")


def test_an_output_behind_a_url_in_a_key_lies_inside_the_input():
    assert resolve("s3://b/in").covers(resolve("s3://b/in/x://y"))
    assert resolve("s3://b/crawl/https://host/a.jpg").path == "b/crawl/https:/host/a.jpg"


def _fetched(cell: str, allowed: str) -> tuple[bytes | None, str | None]:
    rules = ReadRules({}, 1 << 20, (resolve(allowed),))
    row = pa.table([[cell], [cell], pa.nulls(1, pa.string()), pa.nulls(1, pa.int64())], schema=LOCATED)
    read = read_objects(row, rules).to_pylist()[0]
    return read["data"], read["error"]


def test_a_cell_cannot_reach_past_its_allowed_places_by_double_colons(tmp_path, monkeypatch):
    """`SECRET::/../../listed/x.jpg` is under `listed/` by its path, and fsspec alone would open SECRET."""
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "x.jpg").write_bytes(b"allowed")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "s.jpg").write_bytes(b"secret")
    allowed = str(tmp_path / "listed")
    assert _fetched(f"{tmp_path}/listed/x.jpg", allowed) == (b"allowed", None)
    cell = f"{tmp_path}/secret/s.jpg::/../../listed/x.jpg"
    assert inside([resolve(allowed)], cell)  # where its path points; opened as written, it is not there
    data, error = _fetched(cell, allowed)
    assert data is None and error.startswith("ReadError")
    # fsspec opens `local:/x` as `/x`; it is not a name in the working folder, here an allowed one
    monkeypatch.chdir(tmp_path / "listed")
    data, error = _fetched(f"local:{tmp_path}/secret/s.jpg", allowed)
    assert data is None and error.startswith("ForbiddenURI")


@pytest.mark.parametrize(
    "cell",
    [
        "s3://other/k.jpg::/../../allowed/x.jpg",
        "s3://allowed/a/../x.jpg",  # kept in the key, refused, or a step up: stores differ
        "s3://allowed/./x.jpg",
        "s3://other/../allowed/x.jpg",
        "s3://allowed//x.jpg",  # the key `/x.jpg` on S3, folded into `x.jpg` by some stores
    ],
)
def test_dot_segments_and_empty_names_on_an_object_store_lie_nowhere(cell):
    assert resolve(cell, pattern=False).path.startswith("allowed/")
    assert not inside([resolve("s3://allowed")], cell)
    assert inside([resolve("s3://allowed")], "s3://allowed/a/x.jpg")


@pytest.mark.parametrize(
    "cell",
    [
        "https://host/in/%2e%2e/x.jpg",  # the client decodes it into a step up and takes it: /x.jpg
        "https://host/in/..%2Fx.jpg",  # a name that decodes into a step up, for some servers
        "https://host/in//x.jpg",
        "https://elsewhere/x?/../../host/in/x.jpg",  # a query is no part of where it goes
        "https://elsewhere/x#/../../host/in/x.jpg",  # nor is a fragment
        "https:///host/in/x.jpg",  # no host
    ],
)
def test_a_web_url_is_checked_as_its_client_sends_it(cell):
    assert not inside([resolve("https://host/in")], cell)
    assert inside([resolve("https://host/in")], "https://host/in/x.jpg")


@pytest.mark.parametrize(
    "cell",
    ["https://host\\@evil/in/x.jpg", "https://host:99999/in/x.jpg", "https://[::1/in", "/in/a\x00.jpg"],
)
def test_a_cell_that_cannot_be_opened_lies_nowhere_and_raises_nothing(cell):
    """One bad cell is that row's error, not its read task's end."""
    assert not inside([resolve("https://host/in"), resolve("/in")], cell)


def test_allowed_web_places_are_spelled_as_their_urls_are_sent():
    for place in ("https://Host:443/in", "https://user@host/in", "https://host/in/"):
        assert inside([resolve(place)], "https://host/in/x.jpg"), place
    assert inside([resolve("https://host/my photos")], "https://host/my%20photos/x.jpg")


@pytest.mark.parametrize(
    "cell",
    [
        "https://allowed/a/my%20photo.jpg",
        "https://allowed/a/Caf%C3%A9.jpg",
        "https://allowed/a/x.jpg?X-Amz-Credential=AK%2F2026&X-Amz-Signature=ab",  # a presigned URL
        "https://allowed/a/x.jpg?u=https://elsewhere/y.jpg",  # a query is not a path
        "s3://allowed/a/my photo+1=2 Café.jpg",
    ],
)
def test_encoded_and_unusual_names_in_an_allowed_place_are_inside(cell):
    protocol = cell.split("://")[0]
    assert inside([resolve(f"{protocol}://allowed/a")], cell)


def test_a_glob_with_nothing_before_its_wildcard_is_the_working_folders(tmp_path, monkeypatch):
    """Not a prefix of the folders beside it (`/tmp/rv*` would cover `/tmp/rv-secret/`)."""
    (tmp_path / "rv").mkdir()
    monkeypatch.chdir(tmp_path / "rv")
    for pattern in ("*.jpg", "file:*.jpg", "local:*"):
        assert resolve(pattern) == resolve(str(tmp_path / "rv")), pattern
    assert not resolve("*.jpg").covers(resolve(str(tmp_path / "rv-secret" / "x.jpg")))
    assert resolve(".*.jpg").covers(resolve(str(tmp_path / "rv" / ".hidden.jpg")))
    assert not resolve(".*.jpg").covers(resolve(str(tmp_path / "rv" / "visible.jpg")))


class _Redirecting(QuietFiles):
    """A web server whose `/in/moved.jpg` redirects to `/secret.jpg`, outside `/in/`."""

    def do_GET(self):
        if self.path == "/in/moved.jpg":
            self.send_response(302)
            self.send_header("Location", "/secret.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    do_HEAD = do_GET


def test_a_redirect_out_of_an_allowed_web_place_is_not_followed(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jpg").write_bytes(b"allowed")
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    with serving(tmp_path, _Redirecting) as root:
        assert _fetched(f"{root}/in/x.jpg", f"{root}/in") == (b"allowed", None)
        data, error = _fetched(f"{root}/in/moved.jpg", f"{root}/in")
        assert data is None and error.startswith("ForbiddenURI") and "secret" not in error
        # the user's own client options neither lift the refusal nor break it
        for web in (
            {"client_kwargs": {"raise_for_status": True}},
            {"client_kwargs": None},
            {"allow_redirects": True},
        ):
            options = {"http": web}
            fs, path = filesystem(f"{root}/in/moved.jpg", options)
            with pytest.raises(OSError) as raised:
                read_object(fs, path)
            assert redirected(raised.value)
        fs, path = filesystem(f"{root}/in/moved.jpg", {}, redirects=True)  # `dinat-batch predict`
        assert read_object(fs, path) == b"secret"


def test_each_protocol_gets_its_own_options_and_web_urls_none_of_a_stores():
    store = {"key": "k", "client_kwargs": {"endpoint_url": "http://127.0.0.1:8333"}}
    web = {"headers": {"User-Agent": "dinat-batch"}}
    assert options_for("s3://b/x.jpg", store) == options_for("/data/x.jpg", store) == store
    assert options_for("https://host/x.jpg", store) == options_for("HTTP://host/x.jpg", store) == {}
    both = store | {"https": web, "s3": {"anon": True}}
    assert options_for("https://host/x.jpg", both) == web and options_for("http://host/x.jpg", both) == {}
    assert options_for("s3a://b/x.jpg", both) == options_for("s3://b/x.jpg", both) == {"anon": True}
    assert options_for("gs://b/x.jpg", both) == store  # the shared ones, without the protocols' entries
    assert options_for("simplecache::s3://b/model", both) == both  # fsspec picks each link's entry


def test_a_web_url_reads_beside_an_object_stores_options(tmp_path):
    """S3's client settings given to aiohttp's session failed every web row of a table on a custom S3
    endpoint (ClientSession got endpoint_url)."""
    (tmp_path / "x.jpg").write_bytes(b"pixels")
    store = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}
    with serving(tmp_path) as root:
        fs, path = filesystem(f"{root}/x.jpg", store)
        assert read_object(fs, path, None, 100) == b"pixels"
