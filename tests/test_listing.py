"""Listing page by page: the same entries fsspec lists, on S3 from pages of ListObjectsV2 (here two keys a
page), and the input's listing tasks: every object once, level by level, whole where a level is too wide
or holds a folder without a name, and a big folder cut by its names into parts listed side by side."""

import os
import random

import fsspec
import pyarrow.compute as pc
import pytest
import s3fs

from dinat_batch.pipeline import listing
from dinat_batch.pipeline.listing import pages
from dinat_batch.pipeline.output import Output
from dinat_batch.pipeline.parallel import in_threads
from dinat_batch.pipeline.stages import read
from dinat_batch.pipeline.stages.read import Span

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
    files, (deeper, below) = read._top._function(Span("s3://bkt/in/a"), {"anon": True}, 10, 100)
    assert files.num_rows == 0 and deeper == [] and below == [Span("s3://bkt/in/a")]
    files, more = read._below(below, {"anon": True}, 100)
    assert more == [] and sorted(files.column("uri").to_pylist()) == [
        "s3://bkt/in/a///z.jpg",
        "s3://bkt/in/a//y.jpg",
        "s3://bkt/in/a/x.jpg",
    ]


def test_folders_named_dot_or_dot_dot_are_hidden_as_any_dot_folder(monkeypatch):
    """S3 keeps `in/./x.jpg` and `in/../y.jpg` as keys of their own; a path library folds the names away."""
    keys = ["in/ok.jpg", "in/./x.jpg", "in/../y.jpg", "in/a/../z.jpg", "in/.git/w.jpg", "in/a//v.jpg"]
    _store_answers(monkeypatch, lambda request: _keys(request["Prefix"], keys, request.get("Delimiter")))
    below, _ = read._below([Span("s3://bkt/in")], {"anon": True}, 100)
    assert sorted(below.column("uri").to_pylist()) == ["s3://bkt/in/a//v.jpg", "s3://bkt/in/ok.jpg"]
    files, (deeper, _) = read._top._function(Span("s3://bkt/in"), {"anon": True}, 10, 100)
    assert files.column("uri").to_pylist() == ["s3://bkt/in/ok.jpg"] and deeper == [Span("s3://bkt/in/a")]


def test_pages_of_what_is_not_there_are_empty(object_store, tmp_path):
    fs = object_store.filesystem()
    assert [entry for page in pages(fs, "listing-no-such-bucket/x", True) for entry in page] == []
    object_store.make_bucket("listing")
    assert [entry for page in pages(fs, "listing/no-such-folder", False) for entry in page] == []
    assert list(pages(fsspec.filesystem("file"), str(tmp_path / "absent"), False)) == []


@pytest.fixture
def disk_tree(tmp_path, monkeypatch):
    fs, root = fsspec.filesystem("file", auto_mkdir=True), str(tmp_path / "tree")
    _tree(fs, root)
    (tmp_path / "tree" / "empty").mkdir()
    (tmp_path / "tree" / "link.jpg").symlink_to(tmp_path / "tree" / "a.jpg")
    (tmp_path / "tree" / "sub" / "link").symlink_to(tmp_path / "tree" / "h")
    monkeypatch.setattr(listing, "PAGE_KEYS", 2)
    return fs, root


def test_disk_pages_give_what_fsspec_lists_a_page_at_a_time(disk_tree):
    """fsspec's own entries (a symbolic link is `other`, not followed), never more than a page at once:
    its `find` and `ls` made every entry of a folder before returning one."""
    fs, root = disk_tree
    found, below = _entries(fs, root, recursive=True)
    assert len(found) > 1 and all(len(page) <= 2 for page in found)
    assert below == fs.find(root, detail=True)
    assert {name.removeprefix(f"{root}/") for name, entry in below.items() if entry["type"] == "other"} == {
        "link.jpg",
        "sub/link",
    }
    found, level = _entries(fs, root, recursive=False)
    assert len(found) > 1 and all(len(page) <= 2 for page in found)
    assert level == {entry["name"]: entry for entry in fs.ls(root, detail=True)} and root not in level
    assert list(pages(fs, f"{root}/a.jpg", True)) == [] == list(pages(fs, f"{root}/a.jpg", False))
    assert _entries(fs, f"file://{root}/", recursive=True)[1] == below  # as fsspec takes a path


def test_a_folder_below_that_cannot_be_read_raises_naming_it_unless_hidden(disk_tree, monkeypatch):
    """fsspec's `find` left such a folder out, and every image in it: not a row, not an error."""
    fs, root = disk_tree
    scandir = os.scandir

    def denied(path):
        if path in unreadable:
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(listing.os, "scandir", denied)
    unreadable = {f"{root}/sub", f"{root}/_hidden"}
    with pytest.raises(PermissionError, match=f"{root}/sub"):
        _entries(fs, root, recursive=True)
    assert len(_entries(fs, root, recursive=False)[1]) == 9
    unreadable.remove(f"{root}/sub")  # a hidden folder holds no input: left out, and what is below it
    assert f"{root}/sub/d.jpg" in _entries(fs, root, recursive=True)[1]
    os.mkdir(f"{root}/_hidden/below")
    unreadable.symmetric_difference_update({f"{root}/_hidden", f"{root}/_hidden/below"})
    assert f"{root}/_hidden/g.jpg" in _entries(fs, root, recursive=True)[1]
    with pytest.raises(PermissionError):
        _entries(fs, f"{root}/_hidden", recursive=True)


def _by_levels(uri: str) -> list[str]:
    """The files `list_objects` gets from its level tasks (`_top`), without Ray: every level listed."""
    levels, found = [Span(uri, root=os.path.realpath(uri))], []
    while levels:
        files, (deeper, below) = read._top._function(levels.pop(), {}, 10, 100)
        assert below == []
        found += files.column("uri").to_pylist()
        levels += deeper
    return sorted(found)


@pytest.mark.standalone
def test_a_level_with_an_empty_folder_on_a_disk_is_listed(tmp_path):
    """A folder with no entries gives no page on a disk (an S3 prefix has none such): its level task made
    a table of no tables and failed the run."""
    (tmp_path / "in" / "empty").mkdir(parents=True)
    assert _by_levels(str(tmp_path / "in")) == []
    (tmp_path / "in" / "a.jpg").write_bytes(b"a")
    assert _by_levels(str(tmp_path / "in")) == [str(tmp_path / "in" / "a.jpg")]


@pytest.fixture
def linked_input(tmp_path):
    """An input folder of links: to a file and a folder outside it, to itself, to the folder above it, to a
    pair of folders outside that link to each other, to a chain of six folders outside, between two of
    its own folders, to one of its hidden folders, to a FIFO, to nothing, and one a hidden folder's
    name."""
    names = ["outside/x.jpg", "outside/deep/y.jpg", "pair/a/pa.jpg", "pair/b/pb.jpg", "in/a.jpg"]
    names += ["in/s1/one.jpg", "in/s2/two.jpg", "in/.cache/data/c.jpg"]
    names += [f"chain/c{i}/{i}.jpg" for i in range(6)]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "in" / "sub").mkdir()
    os.mkfifo(tmp_path / "fifo")
    links = {
        "in/to_file.jpg": "outside/x.jpg",
        "in/to_folder": "outside",
        "in/loop": "in",
        "in/sub/above": ".",
        "in/pair": "pair/a",
        "pair/a/b": "pair/b",
        "pair/b/a": "pair/a",
        "in/s1/to_s2": "in/s2",
        "in/s2/to_s1": "in/s1",
        "in/fifo.jpg": "fifo",
        "in/nowhere.jpg": "absent.jpg",
        "in/_hidden": "outside",
        "in/data": "in/.cache/data",
        "in/chain": "chain/c0",
        **{f"chain/c{i}/next": f"chain/c{i + 1}" for i in range(5)},
    }
    for link, target in links.items():
        (tmp_path / link).symlink_to(tmp_path / target)
    return tmp_path / "in"


LINKED = ["a.jpg", "nowhere.jpg", "to_file.jpg", "to_folder/x.jpg", "to_folder/deep/y.jpg", "pair/pa.jpg"]
LINKED += ["pair/b/pb.jpg", "s1/one.jpg", "s2/two.jpg", "data/c.jpg"]
LINKED += [f"chain/{'next/' * i}{i}.jpg" for i in range(listing.FOLDER_LINKS)]


@pytest.mark.standalone
def test_an_input_on_a_disk_is_listed_through_its_links(linked_input, caplog):
    """As `find -L` lists it, every image once under each name outside the input's own folders: a link to
    a file is that file, a link to a folder outside is listed below its own name; a link that loops back
    up, to a folder of the input (whose files have names of their own) but for a hidden one, or below
    FOLDER_LINKS others is not followed, the last logged; alike whole (`_below`) and a level at a time
    (`_top`). A link to a FIFO is no file, as a FIFO is not."""
    root = str(linked_input)
    whole, more = read._below([Span(root, root=root)], {}, 100)
    assert [record.getMessage().split(":")[0] for record in caplog.records] == [
        f"{root}/chain{'/next' * listing.FOLDER_LINKS}"
    ]
    assert more == []
    rows = {row["uri"].removeprefix(f"{root}/"): row for row in whole.to_pylist()}
    assert sorted(rows) == sorted(LINKED)
    target = os.stat(linked_input.parent / "outside" / "x.jpg")
    assert rows["to_file.jpg"]["size"] == target.st_size
    assert rows["to_file.jpg"]["version"] == f"{target.st_mtime}:{target.st_ino}"
    assert _by_levels(root) == sorted(f"{root}/{name}" for name in LINKED)
    assert read._below([Span(root)], {}, 100)[0].num_rows == 3  # no input root: no link followed


@pytest.mark.standalone
def test_a_link_to_nothing_is_an_error_row_and_a_new_input_once_fetched(linked_input):
    root = str(linked_input)
    listed = read._below([Span(root, root=root)], {}, 100)[0]
    rows = read.read_listed(
        listed.filter(pc.equal(listed.column("uri"), f"{root}/nowhere.jpg")), read.ReadRules({}, 1 << 20)
    )
    assert rows.column("error").to_pylist() == [
        f"ReadError: could not read {root}/nowhere.jpg: FileNotFoundError: [Errno 2] No such file or "
        f"directory: '{root}/nowhere.jpg'"
    ]
    (linked_input.parent / "absent.jpg").write_bytes(b"fetched")
    again = {row["uri"]: row for row in read._below([Span(root, root=root)], {}, 100)[0].to_pylist()}
    before = {row["uri"]: row for row in listed.to_pylist()}
    assert again[f"{root}/nowhere.jpg"]["size"] == len(b"fetched")
    assert again[f"{root}/nowhere.jpg"]["version"] != before[f"{root}/nowhere.jpg"]["version"]
    (linked_input / "to_file.jpg").unlink()  # pointed at another file of the same time: changed
    (linked_input / "to_file.jpg").symlink_to(linked_input.parent / "outside" / "deep" / "y.jpg")
    os.utime(
        linked_input.parent / "outside" / "deep" / "y.jpg",
        ns=(0, os.stat(linked_input.parent / "outside" / "x.jpg").st_mtime_ns),
    )
    moved = {row["uri"]: row for row in read._below([Span(root, root=root)], {}, 100)[0].to_pylist()}
    assert moved[f"{root}/to_file.jpg"]["version"] != before[f"{root}/to_file.jpg"]["version"]


@pytest.mark.standalone
def test_a_glob_on_a_disk_reads_links_to_files_and_enters_no_linked_folder(linked_input):
    root = str(linked_input)
    globbed = read._glob._function(f"{root}/*.jpg", {}).column("uri").to_pylist()
    assert sorted(globbed) == [f"{root}/{name}" for name in ("a.jpg", "nowhere.jpg", "to_file.jpg")]
    deeper = read._glob._function(f"{root}/*/*.jpg", {}).column("uri").to_pylist()
    assert sorted(deeper) == [f"{root}/{name}" for name in ("s1/one.jpg", "s2/two.jpg")]


@pytest.mark.standalone
def test_a_disk_listing_follows_no_link_unless_asked(linked_input):
    """The output's, a table's and the nightly ledgers' own folders: a link there is never theirs."""
    fs = fsspec.filesystem("file")
    listed = {entry["name"]: entry["type"] for page in pages(fs, str(linked_input), True) for entry in page}
    links = ["to_file.jpg", "to_folder", "loop", "pair", "nowhere.jpg", "fifo.jpg", "_hidden", "sub/above"]
    links += ["data", "chain", "s1/to_s2", "s2/to_s1"]
    assert {name for name, kind in listed.items() if kind == "other"} == {
        f"{linked_input}/{n}" for n in links
    }


def test_a_local_input_is_listed_by_tasks_through_its_links(linked_input, ray_session):
    rows = read.list_objects(str(linked_input), {}).take_all()
    assert sorted(row["uri"] for row in rows) == sorted(f"{linked_input}/{name}" for name in LINKED)


def test_other_stores_are_listed_by_fsspec(monkeypatch):
    fs, root = fsspec.filesystem("memory"), "/listing-tree"
    _tree(fs, root)
    found, below = _entries(fs, root, recursive=True)
    assert len(found) == 1 and set(below) == {f"{root}/{name}" for name in FILES}
    _, level = _entries(fs, root, recursive=False)
    assert set(level) == {f"{root}/{name.split('/')[0]}" for name in FILES} and root not in level


def test_listing_tasks_give_each_object_once(s3_tree, object_store):
    _, root = s3_tree
    uri, options = f"s3://{root}", object_store.storage_options
    below, _ = read._below([Span(f"{uri}/{name}") for name in ("sub", "h", "nothing-here")], options, 100)
    assert sorted(below.column("uri").to_pylist()) == [
        f"{uri}/{name}" for name in ("h/i.jpg", "sub/d.jpg", "sub/deeper/e.jpg")
    ]
    assert read._below([Span(f"{uri}/nothing-here")], options, 100)[0].schema == read.LISTING
    files, (deeper, below) = read._top._function(Span(uri), options, 10, 100)
    assert sorted(files.column("uri").to_pylist()) == [f"{uri}/{name}" for name in FILES if "/" not in name]
    assert sorted(span.uri for span in deeper) == [f"{uri}/h", f"{uri}/marker", f"{uri}/sub"] and below == []
    files, (deeper, below) = read._top._function(
        Span(uri), options, 2, 100
    )  # more folders than it may hand on
    assert files.num_rows == 0 and deeper == [] and below == [Span(uri)]


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
    assert levels == [Span(uri), Span(f"{uri}/only")]
    assert len(below) == 8
    assert sorted(span.uri for group in below for span in group) == [f"{uri}/only/f{i}" for i in range(10)]


def test_a_level_of_too_many_folders_is_listed_whole(object_store, ray_session, listing_calls, monkeypatch):
    """`only/` holds more folders than a level may hand the driver: it is handed on, to be listed whole."""
    monkeypatch.setattr(read, "FOLDERS_PER_LEVEL", 5)
    visible = _deeper_tree(object_store, "listing/wide")
    uri = "s3://listing/wide"
    rows = read.list_objects(uri, object_store.storage_options).take_all()
    assert sorted(row["uri"] for row in rows) == sorted(f"{uri}/{name}" for name in visible)
    levels, below = listing_calls
    assert levels == [Span(uri), Span(f"{uri}/only")] and below == [[Span(f"{uri}/only")]]


def test_a_survey_takes_a_folder_without_a_name_for_someone_elses(monkeypatch):
    """An output holding `out//x`: not the output folder itself, and nothing the pipeline wrote."""
    _store_answers(monkeypatch, lambda request: _keys(request["Prefix"], ["out/_SUCCESS", "out//x"], "/"))
    entries = Output("s3://bkt/out", {"anon": True})._entries("bkt/out")
    assert sorted((entry.name, entry.type) for entry in entries) == [
        ("bkt/out//", "other"),
        ("bkt/out/_SUCCESS", "file"),
    ]


class _S3:
    """ListObjectsV2 as S3 answers it, in its order (UTF-8 bytes: Python's for `str`): `Prefix`,
    `Delimiter` folding folders, `StartAfter`, `MaxKeys` and continuation. Or a store of another order
    (`order`, a sort key also used against `StartAfter`), or one that ignores `StartAfter`."""

    def __init__(self, keys: list[str], start_after: bool = True, order=None):
        self.order = order or (lambda name: name)
        self.keys, self.start_after = sorted(keys, key=self.order), start_after

    def answer(self, method: str, request: dict) -> dict:
        assert method == "list_objects_v2", method
        prefix, delimiter = request["Prefix"], request.get("Delimiter")
        after = request.get("ContinuationToken") or (
            request.get("StartAfter", "") if self.start_after else ""
        )
        names = []
        for key in self.keys:
            rest = key[len(prefix) :]
            name = prefix + rest.split("/")[0] + "/" if delimiter and "/" in rest else key
            # nothing at or before the place asked, a folder given on the page before included
            if key.startswith(prefix) and self.order(name) > self.order(after) and name not in names[-1:]:
                names.append(name)
        page, more = names[: request["MaxKeys"]], len(names) > request["MaxKeys"]
        return {
            "Contents": [{"Key": name, "Size": 1, "ETag": '"e"'} for name in page if name in self.keys],
            "CommonPrefixes": [{"Prefix": name} for name in page if name not in self.keys],
            "IsTruncated": more,
            **({"NextContinuationToken": page[-1]} if more else {}),
        }


def _served(monkeypatch, store: _S3) -> None:
    monkeypatch.setattr(
        s3fs.S3FileSystem, "call_s3", lambda fs, method, **request: store.answer(method, request)
    )


def _listed_by_parts(monkeypatch, store: _S3, wide: int, most: int = 1000) -> tuple[list[str], list[Span]]:
    """The files of `s3://bkt/in`, listed one level at a time and then whole, as `list_objects` does
    without Ray, every span cut where it has more than `wide` entries, a level listed whole where it has
    more than `most` folders; and the spans that were listed."""
    _served(monkeypatch, store)
    monkeypatch.setattr(listing, "PAGE_KEYS", 3)
    options, files, listed = {"anon": True}, [], []
    level, whole = [Span("s3://bkt/in")], []
    while level:
        span = level.pop()
        table, (deeper, below) = read._top._function(span, options, most, wide)
        files, level, whole, listed = (
            files + table.column("uri").to_pylist(),
            level + deeper,
            whole + below,
            [*listed, span],
        )
    while whole:
        assert len(listed) < 10_000, "a span cut into itself, listed without end"
        table, more = read._below(whole[:1], options, wide)
        files, whole, listed = files + table.column("uri").to_pylist(), whole[1:] + more, [*listed, whole[0]]
    return files, listed


def _odd_names(count: int, unnamed: bool = False) -> list[str]:
    """Names that stores sort differently (`a/` against `a!`), keys that are stems of others (`a`, `a/b`),
    folders' marker objects (`a/`), empty names (`a//b`; `//b` at the top too, if `unnamed`), characters
    past ASCII and capitals; and hexadecimal names, as big flat folders have."""
    draw = random.Random(13)
    names = {"".join(draw.choice("aAb/!.0é~_") for _ in range(draw.randint(1, 6))) for _ in range(count)}
    names |= {f"{draw.getrandbits(32):08x}.jpg" for _ in range(count)}
    return [f"in/{name}" for name in names if unnamed or not name.startswith("/")]


def _visible(keys: list[str]) -> list[str]:
    return sorted(
        f"s3://bkt/{key}" for key in keys if not key.endswith("/") and not listing.hidden(key, "in")
    )


@pytest.mark.parametrize(("wide", "most"), [(4, 1000), (40, 1000), (4, 3), (10**6, 1000)])
def test_a_folder_cut_by_its_names_lists_every_key_once(monkeypatch, wide, most):
    keys = _odd_names(300)
    files, listed = _listed_by_parts(monkeypatch, _S3(keys), wide, most)
    assert sorted(files) == _visible(keys)
    assert (len([span for span in listed if span.stem]) > 16) == (wide < 10**6)


def test_folders_below_too_big_for_a_task_are_cut_in_turn(monkeypatch):
    """Folders handed on to be listed whole (a level of more than `most`), each with more than `wide`
    keys: cut into the folders' own names, not handed back whole."""
    keys = [f"in/{i}/{j:02d}.jpg" for i in range(5) for j in range(40)] + [f"in/{c}.jpg" for c in "abcdefgh"]
    files, listed = _listed_by_parts(monkeypatch, _S3(keys), 4, most=2)
    assert sorted(files) == _visible(keys)
    stems = {span.stem for span in listed if span.uri == "s3://bkt/in"}
    assert {f"{i}/" for i in range(5)} <= stems and any(len(stem) > 2 and stem[1] == "/" for stem in stems)


@pytest.mark.parametrize(
    "store",
    [
        pytest.param(lambda keys: _S3(keys, start_after=False), id="StartAfter ignored"),
        pytest.param(lambda keys: _S3(keys, order=lambda name: (name.lower(), name)), id="lower case first"),
        pytest.param(_S3, id="a folder without a name at the top"),
    ],
)
def test_a_folder_that_cannot_be_cut_is_listed_whole(monkeypatch, store):
    keys = _odd_names(100, unnamed=True)
    files, listed = _listed_by_parts(monkeypatch, store(keys), 4)
    assert sorted(files) == _visible(keys)
    assert not [span for span in listed if span.uri == "s3://bkt/in" and span.stem]


def test_cut_parts_cover_each_name_once_and_names_that_cannot_be_cut(monkeypatch):
    store = _S3(["in/a", "in/a!", "in/a/b", "in/a0", "in/b", "in/c\U0010ffffd", "in/c"])
    _served(monkeypatch, store)
    fs = s3fs.S3FileSystem(anon=True, skip_instance_cache=True)
    parts = listing.cut(fs, "bkt/in", "a", ["bkt/in/a", "bkt/in/a/"])
    # cut on to single names, short of 16 parts: `a!` and `a0` are names, `a/` a folder
    assert [entry["name"] for entry in parts.exact] == ["bkt/in/a", "bkt/in/a!", "bkt/in/a0"]
    assert parts.stems == ["a/"]
    assert listing.cut(fs, "bkt/in", "", []) is None  # `c` + the last character
    assert listing.cut(fsspec.filesystem("memory"), "in", "", []) is None
    # keys listed before the cut that its parts do not hold: a store whose order is not S3's
    assert listing.cut(fs, "bkt/in", "a", ["bkt/in/a", "bkt/in/A1"]) is None


def test_a_flat_folder_is_cut_for_tasks_side_by_side(object_store, ray_session, listing_calls, monkeypatch):
    """Against SeaweedFS, which sorts a folder `a/` before `a!`: every object once; the input's level is
    cut into more spans than the 2 listing tasks wanted, each listed whole (and cut again) by a task."""
    object_store.make_bucket("listing")
    # SeaweedFS takes no key with an empty name or one named `.` or `..` in it
    names = [name.removeprefix("in/") for name in _odd_names(60)]
    names = [name for name in names if not {"", ".", ".."} & set(name.split("/")) and name[-1] != "/"]
    fs, uri = object_store.filesystem(), "s3://listing/flat"
    in_threads(lambda name: fs.pipe_file(f"listing/flat/{name}", b"x"), names)
    monkeypatch.setattr(read, "SPAN_ENTRIES", 10)
    rows = read.list_objects(uri, object_store.storage_options).take_all()
    visible = [name for name in names if not listing.hidden(f"flat/{name}", "flat")]
    assert sorted(row["uri"] for row in rows) == sorted(f"{uri}/{name}" for name in visible)
    levels, below = listing_calls
    assert levels == [Span(uri)] and len([span for group in below for span in group if span.stem]) >= 16
