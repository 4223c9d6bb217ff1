"""The local S3 server used by the demo and the tests: real auth, loopback only, nothing left running."""

import os

import pytest
import s3fs

from dinat_batch.infra.object_store import LocalObjectStore


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
    store = LocalObjectStore().start()
    pid, data_dir = store._process.pid, store.data_dir
    store.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not data_dir.exists()
