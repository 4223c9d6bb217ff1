"""Listing page by page: the same entries fsspec lists, on S3 from pages of ListObjectsV2 (here two keys a
page), and an input listing task's rows in blocks, every object once."""

import fsspec
import pytest

from dinat_batch.pipeline import listing
from dinat_batch.pipeline.listing import pages
from dinat_batch.pipeline.parallel import in_threads
from dinat_batch.pipeline.stages import read

FILES = ["a.jpg", "b.jpg", "c.txt", "sub/d.jpg", "sub/deeper/e.jpg", "sub-f.jpg", "_hidden/g.jpg", "h/i.jpg"]


def _tree(fs, root: str) -> None:
    in_threads(lambda name: fs.pipe_file(f"{root}/{name}", name.encode()), FILES)


@pytest.fixture
def s3_tree(object_store, monkeypatch, request):
    object_store.make_bucket("listing")
    fs, root = object_store.filesystem(), f"listing/{request.node.name}"
    _tree(fs, root)
    fs.pipe_file(f"{root}/marker/", b"")  # a folder's marker object, as consoles make them
    monkeypatch.setattr(listing, "PAGE_KEYS", 2)
    return fs, root


def _entries(fs, root: str, recursive: bool) -> tuple[list[list[dict]], dict[str, dict]]:
    found = list(pages(fs, root, recursive))
    return found, {entry["name"]: entry for page in found for entry in page}


def test_s3_pages_list_every_file_below_with_what_fsspec_tells_of_each(s3_tree):
    fs, root = s3_tree
    found, entries = _entries(fs, root, recursive=True)
    assert len(found) > 1 and all(len(page) <= 2 for page in found)
    files = {name for name, entry in entries.items() if entry["type"] == "file"}
    assert files == {f"{root}/{name}" for name in FILES}
    assert {name for name, entry in entries.items() if entry["type"] == "directory"} == {f"{root}/marker"}
    assert fs.dircache == {}  # nothing kept beyond the page
    for name in files:
        info = fs.info(name)
        assert (entries[name]["size"], entries[name]["ETag"]) == (info["size"], info["ETag"])


def test_s3_pages_of_one_level_hold_its_files_and_folders(s3_tree):
    fs, root = s3_tree
    found, entries = _entries(fs, root, recursive=False)
    assert len(found) > 1
    kinds = {name.removeprefix(f"{root}/"): entry["type"] for name, entry in entries.items()}
    folders = {"sub", "_hidden", "h", "marker"}
    assert kinds == {name: "file" for name in FILES if "/" not in name} | dict.fromkeys(folders, "directory")
    fs.invalidate_cache()
    assert set(entries) == {entry["name"].rstrip("/") for entry in fs.ls(root, detail=True)}


def test_pages_of_what_is_not_there_are_empty(object_store, tmp_path):
    fs = object_store.filesystem()
    assert [entry for page in pages(fs, "listing-no-such-bucket/x", True) for entry in page] == []
    object_store.make_bucket("listing")
    assert [entry for page in pages(fs, "listing/no-such-folder", False) for entry in page] == []
    assert list(pages(fsspec.filesystem("file", auto_mkdir=True), str(tmp_path / "absent"), False)) == []


def test_other_stores_are_listed_by_fsspec(tmp_path):
    root = str(tmp_path / "tree")
    fs = fsspec.filesystem("file", auto_mkdir=True)
    fs.mkdir(root)
    _tree(fs, root)
    _, below = _entries(fs, root, recursive=True)
    assert set(below) == {f"{root}/{name}" for name in FILES}
    _, level = _entries(fs, root, recursive=False)
    assert set(level) == {f"{root}/{name.split('/')[0]}" for name in FILES} and root not in level


def test_a_listing_task_gives_every_object_once_in_blocks(s3_tree, object_store, monkeypatch):
    _, root = s3_tree
    monkeypatch.setattr(read, "LISTING_BLOCK_ROWS", 3)
    uri = f"s3://{root}"
    blocks = list(read._find._function([uri], object_store.storage_options))
    assert len(blocks) > 1 and all(block.num_rows < 3 + listing.PAGE_KEYS for block in blocks)
    uris = [uri for block in blocks for uri in block.column("uri").to_pylist()]
    visible = [name for name in FILES if not name.startswith("_")]
    assert sorted(uris) == sorted(f"{uri}/{name}" for name in visible)
    *files, folders = read._top._function(uri, object_store.storage_options)
    assert sorted(u for block in files for u in block.column("uri").to_pylist()) == [
        f"{uri}/{name}" for name in FILES if "/" not in name
    ]
    assert sorted(folders) == [f"{uri}/h", f"{uri}/marker", f"{uri}/sub"]


def test_a_listing_task_of_nothing_gives_one_empty_block(object_store):
    object_store.make_bucket("listing")
    blocks = list(read._find._function(["s3://listing/empty-folder"], object_store.storage_options))
    assert [block.num_rows for block in blocks] == [0] and blocks[0].schema == read.LISTING


def test_an_input_is_listed_by_tasks_every_object_once(s3_tree, object_store, ray_session):
    _, root = s3_tree
    uri = f"s3://{root}"
    rows = read.list_objects(uri, object_store.storage_options).take_all()
    visible = [name for name in FILES if not name.startswith("_")]
    assert sorted(row["uri"] for row in rows) == sorted(f"{uri}/{name}" for name in visible)
    assert {row["uri"]: row["size"] for row in rows}[f"{uri}/sub/d.jpg"] == len(b"sub/d.jpg")


class _Calls:
    """A Ray remote function whose `.remote` calls are recorded (their first argument)."""

    def __init__(self, function, calls: list):
        self.function, self.calls = function, calls

    def remote(self, *args):
        self.calls.append(args[0])
        return self.function.remote(*args)


def test_a_level_of_few_folders_is_listed_one_level_deeper(object_store, ray_session, monkeypatch, tmp_path):
    """Below one folder `only/`, ten folders: with 2 listing tasks wanted, the input's level and `only/`
    are each listed by a task of their own, and the ten folders shared by 8 tasks."""
    object_store.make_bucket("listing")
    fs, root = object_store.filesystem(), "listing/deeper"
    names = ["top.jpg", "only/mid.jpg", "only/_hidden/h.jpg", "only/f0/_h/z.jpg"]
    names += [f"only/f{i}/{j}.jpg" for i in range(10) for j in range(3)]
    in_threads(lambda name: fs.pipe_file(f"{root}/{name}", b"x"), names)
    levels, below = [], []
    monkeypatch.setattr(read, "_top", _Calls(read._top, levels))
    monkeypatch.setattr(read, "_find", _Calls(read._find, below))
    monkeypatch.setattr(read, "LISTING_TASKS", 2)
    uri = f"s3://{root}"
    rows = read.list_objects(uri, object_store.storage_options).take_all()
    assert sorted(row["uri"] for row in rows) == sorted(f"{uri}/{name}" for name in names if "_h" not in name)
    assert levels == [uri, f"{uri}/only"]
    assert len(below) == 8
    assert sorted(folder for group in below for folder in group) == [f"{uri}/only/f{i}" for i in range(10)]
