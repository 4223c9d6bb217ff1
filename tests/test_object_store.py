"""The local S3 server used by the demo and the tests: real auth, loopback only, nothing left running."""

import os
import socket
from pathlib import Path

import pytest
import s3fs

from dinat_batch.infra import object_store as store_module
from dinat_batch.infra import processes
from dinat_batch.infra.object_store import LocalObjectStore, _unserved
from dinat_batch.infra.processes import GaveUp, free_port


def test_round_trip_and_wrong_credentials_refused(object_store):
    object_store.make_bucket("store-test")
    fs = object_store.filesystem()
    fs.pipe("store-test/a.bin", b"payload")
    assert fs.cat("store-test/a.bin") == b"payload"
    assert object_store.endpoint.startswith("http://127.0.0.1:")
    intruder = s3fs.S3FileSystem(
        key="nobody",
        secret="wrong",
        client_kwargs={"endpoint_url": object_store.endpoint},
        skip_instance_cache=True,
    )
    with pytest.raises(PermissionError):
        intruder.cat("store-test/a.bin")


def test_stop_leaves_no_process_and_no_files():
    """Not even weed's unix sockets, which it leaves in /tmp when it is killed."""
    store = LocalObjectStore().start()
    pid, data_dir = store._process.pid, store.data_dir
    grpc = [Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock") for name, port in store._grpc_ports.items()]
    try:
        assert all(path.is_socket() for path in grpc)
        assert (data_dir / "s3.sock").is_socket() and (data_dir / "filer.sock").is_socket()
    finally:
        store.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not data_dir.exists() and not any(path.exists() for path in grpc)


def test_a_socket_in_use_is_not_removed(tmp_path):
    """At a path of ours another weed may serve (it took the port first): only a socket nobody listens
    on is weed's leftover."""
    with socket.socket(socket.AF_UNIX) as left:  # bound, never listened on, closed: as weed leaves it
        left.bind(str(tmp_path / "left.sock"))
    with socket.socket(socket.AF_UNIX) as served:
        served.bind(str(tmp_path / "served.sock"))
        served.listen()
        assert not _unserved(tmp_path / "served.sock") and _unserved(tmp_path / "left.sock")
    (tmp_path / "file.sock").write_text("")
    assert not _unserved(tmp_path / "file.sock") and not _unserved(tmp_path / "absent.sock")


@pytest.fixture
def taken_port():
    """A loopback port another process listens on and never answers: handed out as the first free port
    of every launch, as when another process takes it between the pick and weed's bind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def _launches(monkeypatch, taken: int, spoiled: int) -> list[int]:
    """The pids of weed's launches from now on; the first `spoiled` pick `taken` as their first port."""
    pids: list[int] = []
    launch = LocalObjectStore._launch

    def launch_counted(store):
        picks = iter([taken] if len(pids) < spoiled else [])
        monkeypatch.setattr(store_module, "free_port", lambda: next(picks, None) or free_port())
        launch(store)
        pids.append(store._process.pid)

    monkeypatch.setattr(LocalObjectStore, "_launch", launch_counted)
    return pids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_port_taken_before_weed_binds_it_starts_weed_again_on_others(monkeypatch, taken_port):
    pids = _launches(monkeypatch, taken_port, spoiled=1)
    with LocalObjectStore() as store:
        # two launches, or more where another process took a port of the second one too
        assert len(pids) >= 2 and store.port != taken_port and _gone(pids[0])
        store.make_bucket("retried")
        store.filesystem().pipe("retried/a.bin", b"payload")
        assert store.filesystem().cat("retried/a.bin") == b"payload"


def test_a_port_taken_at_every_start_gives_up_with_the_reason_and_leaves_nothing(monkeypatch, taken_port):
    pids = _launches(monkeypatch, taken_port, spoiled=2)
    monkeypatch.setattr(processes, "STARTS", 2)
    store = LocalObjectStore()
    with pytest.raises(GaveUp, match=f"127.0.0.1:{taken_port}.*address already in use") as raised:
        store.start()
    assert len(pids) == 2 and all(map(_gone, pids))
    assert any("an earlier start: weed exited" in note for note in raised.value.__notes__)
    assert not store.data_dir.exists()
