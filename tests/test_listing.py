"""Listing page by page: the same entries fsspec lists, on S3 from pages of ListObjectsV2 (here two keys a
page), and the input's listing tasks: every object once, level by level, whole where a level is too wide
or holds a folder without a name."""

import fsspec
import pytest
import s3fs

from dinat_batch.pipeline import listing
from dinat_batch.pipeline.listing import pages
from dinat_batch.pipeline.output import Output
from dinat_batch.pipeline.parallel import in_threads
from dinat_batch.pipeline.stages import read

FILES = ["a.jpg", "b.jpg", "c.txt", "sub/d.jpg", "sub/deeper/e.jpg", "sub-f.jpg", "_hidden/g.jpg", "h/i.jpg"]
VISIBLE = [name for name in FILES if not name.startswith("_")]


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


def _store_answers(monkeypatch, answer) -> None:
    """S3's ListObjectsV2 answered by `answer(request)` (SeaweedFS folds `//` in keys into `/`; S3 keeps it)."""
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", lambda fs, method, **request: answer(request))


def _keys(prefix: str, keys: list[str], delimiter: str | None) -> dict:
    """What S3 answers for these keys: one page, folders folded where a delimiter is asked."""
    below = [key[len(prefix) :] for key in keys if key.startswith(prefix)]
    if delimiter is None:
        return {"Contents": [{"Key": prefix + rest, "Size": 1, "ETag": '"e"'} for rest in below]}
    folders = sorted({prefix + rest.split("/")[0] + "/" for rest in below if "/" in rest})
    contents = [{"Key": prefix + rest, "Size": 1, "ETag": '"e"'} for rest in below if "/" not in rest]
    return {"Contents": contents, "CommonPrefixes": [{"Prefix": folder} for folder in folders]}


# keys S3 keeps as they are: the folder's own marker and a folder without a name (`a//`)
ODD_KEYS = ["in/", "in/top.jpg", "in/a/", "in/a/x.jpg", "in/a//y.jpg", "in/a///z.jpg", "in/b/w.jpg"]


def test_s3_pages_never_give_the_folder_itself_and_keep_keys_with_empty_names(monkeypatch):
    _store_answers(monkeypatch, lambda request: _keys(request["Prefix"], ODD_KEYS, request.get("Delimiter")))
    fs = s3fs.S3FileSystem(anon=True, skip_instance_cache=True)
    _, below = _entries(fs, "bkt/in", recursive=True)
    files = sorted(name for name, entry in below.items() if entry["type"] == "file")
    assert files == sorted(f"bkt/{key}" for key in ODD_KEYS if not key.endswith("/"))
    _, level = _entries(fs, "bkt/in", recursive=False)
    assert sorted(level) == ["bkt/in/a", "bkt/in/b", "bkt/in/top.jpg"]
    _, inner = _entries(fs, "bkt/in/a", recursive=False)
    assert sorted(inner) == ["bkt/in/a/", "bkt/in/a/x.jpg"] and inner["bkt/in/a/"]["type"] == "directory"


def test_a_level_holding_a_folder_without_a_name_is_listed_whole(monkeypatch):
    _store_answers(monkeypatch, lambda request: _keys(request["Prefix"], ODD_KEYS, request.get("Delimiter")))
    files, folders = read._top._function("s3://bkt/in/a", {"anon": True}, 10)
    assert folders == []
    assert sorted(files.column("uri").to_pylist()) == [
        "s3://bkt/in/a///z.jpg",
        "s3://bkt/in/a//y.jpg",
        "s3://bkt/in/a/x.jpg",
    ]


def test_folders_named_dot_or_dot_dot_are_hidden_as_any_dot_folder(monkeypatch):
    """S3 keeps `in/./x.jpg` and `in/../y.jpg` as keys of their own; a path library folds the names away."""
    keys = ["in/ok.jpg", "in/./x.jpg", "in/../y.jpg", "in/a/../z.jpg", "in/.git/w.jpg", "in/a//v.jpg"]
    _store_answers(monkeypatch, lambda request: _keys(request["Prefix"], keys, request.get("Delimiter")))
    below = read._below(["s3://bkt/in"], {"anon": True})
    assert sorted(below.column("uri").to_pylist()) == ["s3://bkt/in/a//v.jpg", "s3://bkt/in/ok.jpg"]
    files, folders = read._top._function("s3://bkt/in", {"anon": True}, 10)
    assert files.column("uri").to_pylist() == ["s3://bkt/in/ok.jpg"] and folders == ["s3://bkt/in/a"]


def test_pages_of_what_is_not_there_are_empty(object_store, tmp_path):
    fs = object_store.filesystem()
    assert [entry for page in pages(fs, "listing-no-such-bucket/x", True) for entry in page] == []
    object_store.make_bucket("listing")
    assert [entry for page in pages(fs, "listing/no-such-folder", False) for entry in page] == []
    assert list(pages(fsspec.filesystem("file"), str(tmp_path / "absent"), False)) == []


def test_other_stores_are_listed_by_fsspec(tmp_path):
    root = str(tmp_path / "tree")
    fs = fsspec.filesystem("file", auto_mkdir=True)
    fs.mkdir(root)
    _tree(fs, root)
    _, below = _entries(fs, root, recursive=True)
    assert set(below) == {f"{root}/{name}" for name in FILES}
    _, level = _entries(fs, root, recursive=False)
    assert set(level) == {f"{root}/{name.split('/')[0]}" for name in FILES} and root not in level


def test_listing_tasks_give_each_object_once(s3_tree, object_store):
    _, root = s3_tree
    uri, options = f"s3://{root}", object_store.storage_options
    below = read._below([f"{uri}/sub", f"{uri}/h", f"{uri}/nothing-here"], options)
    assert sorted(below.column("uri").to_pylist()) == [
        f"{uri}/{name}" for name in ("h/i.jpg", "sub/d.jpg", "sub/deeper/e.jpg")
    ]
    assert read._below([f"{uri}/nothing-here"], options).schema == read.LISTING
    files, folders = read._top._function(uri, options, 10)
    assert sorted(files.column("uri").to_pylist()) == [f"{uri}/{name}" for name in FILES if "/" not in name]
    assert sorted(folders) == [f"{uri}/h", f"{uri}/marker", f"{uri}/sub"]
    files, folders = read._top._function(uri, options, 2)  # more folders than it may hand on: all below
    assert folders == [] and sorted(files.column("uri").to_pylist()) == sorted(
        f"{uri}/{name}" for name in VISIBLE
    )


def test_an_input_is_listed_by_tasks_every_object_once(s3_tree, object_store, ray_session):
    _, root = s3_tree
    uri = f"s3://{root}"
    rows = read.list_objects(uri, object_store.storage_options).take_all()
    assert sorted(row["uri"] for row in rows) == sorted(f"{uri}/{name}" for name in VISIBLE)
    assert {row["uri"]: row["size"] for row in rows}[f"{uri}/sub/d.jpg"] == len(b"sub/d.jpg")


class _Calls:
    """A Ray remote function whose `.remote` calls are recorded (their first argument)."""

    def __init__(self, function, calls: list):
        self.function, self.calls = function, calls

    def remote(self, *args):
        self.calls.append(args[0])
        return self.function.remote(*args)


def _deeper_tree(object_store, root: str) -> list[str]:
    """Below one folder `only/`, ten folders of three images, and hidden files."""
    object_store.make_bucket("listing")
    names = ["top.jpg", "only/mid.jpg", "only/_hidden/h.jpg", "only/f0/_h/z.jpg"]
    names += [f"only/f{i}/{j}.jpg" for i in range(10) for j in range(3)]
    fs = object_store.filesystem()
    in_threads(lambda name: fs.pipe_file(f"{root}/{name}", b"x"), names)
    return [name for name in names if "_h" not in name]


@pytest.fixture
def listing_calls(monkeypatch) -> tuple[list, list]:
    levels, below = [], []
    monkeypatch.setattr(read, "_top", _Calls(read._top, levels))
    monkeypatch.setattr(read, "_find", _Calls(read._find, below))
    monkeypatch.setattr(read, "LISTING_TASKS", 2)
    return levels, below


def test_a_level_of_few_folders_is_listed_one_level_deeper(object_store, ray_session, listing_calls):
    """With 2 listing tasks wanted, the input's level and `only/` are each listed by a task of their own,
    and the ten folders below shared by 8 tasks."""
    visible = _deeper_tree(object_store, "listing/deeper")
    uri = "s3://listing/deeper"
    rows = read.list_objects(uri, object_store.storage_options).take_all()
    assert sorted(row["uri"] for row in rows) == sorted(f"{uri}/{name}" for name in visible)
    levels, below = listing_calls
    assert levels == [uri, f"{uri}/only"]
    assert len(below) == 8
    assert sorted(folder for group in below for folder in group) == [f"{uri}/only/f{i}" for i in range(10)]


def test_a_level_of_too_many_folders_is_listed_whole(object_store, ray_session, listing_calls, monkeypatch):
    """`only/` holds more folders than a level may hand the driver: its task lists all below it."""
    monkeypatch.setattr(read, "FOLDERS_PER_LEVEL", 5)
    visible = _deeper_tree(object_store, "listing/wide")
    uri = "s3://listing/wide"
    rows = read.list_objects(uri, object_store.storage_options).take_all()
    assert sorted(row["uri"] for row in rows) == sorted(f"{uri}/{name}" for name in visible)
    levels, below = listing_calls
    assert levels == [uri, f"{uri}/only"] and below == []


def test_a_survey_takes_a_folder_without_a_name_for_someone_elses(monkeypatch):
    """An output holding `out//x`: not the output folder itself, and nothing the pipeline wrote."""
    _store_answers(monkeypatch, lambda request: _keys(request["Prefix"], ["out/_SUCCESS", "out//x"], "/"))
    entries = Output("s3://bkt/out", {"anon": True})._entries("bkt/out")
    assert sorted((entry.name, entry.type) for entry in entries) == [
        ("bkt/out//", "other"),
        ("bkt/out/_SUCCESS", "file"),
    ]
