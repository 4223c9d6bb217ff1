"""Faults during a run lose nothing: an inference actor killed mid-run, a driver killed mid-run and the
same command run again (it resumes), an object store that fails transiently (retried) or for good (a
clear error, nothing committed); on the session's real Ray and S3 server."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from typer.testing import CliRunner

from dinat_batch.infra.processes import descendants
from dinat_batch.pipeline.cli import app
from dinat_batch.pipeline.run import run
from tests.data import image_folder, photos
from tests.fault_proxy import FaultProxy

CLI = str(Path(sys.executable).parent / "dinat-batch")
COUNT = 96


def chunk_files(output: Path) -> list[Path]:
    """What a run has written so far: its chunk files in the output's staging folder."""
    return sorted(output.glob("_staging/*/chunk-*.parquet"))


def wait_for(condition, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def exactly_once(output: Path, expected: set[str]) -> None:
    keys = pq.read_table(output, columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) and set(keys) == expected


def test_inference_actor_killed_mid_run(tmp_path, tiny_model, ray_session):
    source = image_folder(tmp_path / "images", COUNT)
    output = tmp_path / "out"
    killed = []

    def kill_the_actor_after_its_first_rows():
        wait_for(lambda: chunk_files(output))
        found = subprocess.run(["pgrep", "-f", r"MapBatches\(Predictor\)"], capture_output=True, text=True)
        # only this session's actors (its Ray runs under this process): another test process may run too
        for pid in {int(pid) for pid in found.stdout.split()} & set(descendants(os.getpid())):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_the_actor_after_its_first_rows)
    killer.start()
    config = {"input": str(source), "output": str(output), "model": str(tiny_model)}
    summary = run(config | {"batch_size": 2, "read_batch_size": 8})
    killer.join()

    assert killed, "the actor was not found running"
    assert summary.ok == COUNT
    exactly_once(output, {str(path) for path in source.iterdir()})


def test_driver_killed_then_the_same_command_resumes(tmp_path, tiny_model, ray_session):
    """With the default settings (no small rows_per_file), a killed driver has already committed its
    first batches as chunk files; the same command is refused while the dead driver's lease is fresh,
    then takes the output over and resumes: every key once, in files of rows_per_file rows."""
    source = image_folder(tmp_path / "images", COUNT)
    output = tmp_path / "out"
    job = tmp_path / "job.json"
    config = {"input": str(source), "output": str(output), "model": str(tiny_model)}
    config |= {"batch_size": 2, "read_batch_size": 8}
    job.write_text(json.dumps(config))
    # the driver joins the session's cluster, so that killing it kills nothing else
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [CLI, "run", "--config", str(job)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_for(lambda: len(chunk_files(output)) >= 2 or driver.poll() is not None)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    written_before = sum(len(pq.read_table(path)) for path in chunk_files(output))
    assert not (output / "_SUCCESS").exists() and written_before > 0

    # the refused attempt in this process (on the session's Ray): a driver of its own costs seconds of CPU
    refused = CliRunner().invoke(app, ["run", "--config", str(job)])
    assert refused.exit_code == 2 and "another run holds this output: run " in refused.stderr
    # the taker's own lease_timeout decides when a silent holder counts as dead
    job.write_text(json.dumps(config | {"lease_timeout": 3}))
    time.sleep(3)
    again = subprocess.run(
        [CLI, "run", "--config", str(job)], env=env, capture_output=True, text=True, timeout=600
    )

    assert again.returncode == 0, again.stderr[-3000:]
    assert "took over the output's lease" in again.stderr
    manifest = json.loads((output / "_SUCCESS").read_text())
    assert manifest["ok"] == COUNT and written_before <= manifest["resumed"] < COUNT
    assert [entry["name"] for entry in manifest["files"]] == [
        path.name for path in sorted(output.glob("*.parquet"))
    ]
    exactly_once(output, {str(path) for path in source.iterdir()})


def through(proxy: FaultProxy, object_store, **botocore) -> dict:
    """The store's storage options with the proxy as endpoint and short timeouts, so that slow answers
    are timeouts."""
    options = object_store.storage_options
    return options | {
        "client_kwargs": options["client_kwargs"] | {"endpoint_url": proxy.endpoint},
        "config_kwargs": {"read_timeout": 1.0, "connect_timeout": 1.0} | botocore,
    }


def test_transient_object_store_faults_are_retried(object_store, tiny_model, ray_session):
    object_store.make_bucket("faults")  # new buckets take SeaweedFS seconds: both tests share one
    fs = object_store.filesystem()
    files = {f"faults/transient/images/{name}": data for name, data in photos(24).items()}
    fs.pipe(files)
    with FaultProxy(object_store.endpoint) as proxy:
        summary = run(
            {
                "input": "s3://faults/transient/images",
                "output": "s3://faults/transient/out",
                "model": str(tiny_model),
                "storage_options": through(proxy, object_store),
            }
        )
    assert (summary.ok, summary.errors) == (24, 0), summary.errors_by_kind
    assert set(proxy.injected) == {"slow_down", "reset", "slow"}, proxy.injected
    fs.invalidate_cache()
    keys = pq.read_table("faults/transient/out", filesystem=fs, columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(f"s3://{path}" for path in files)


def test_a_store_down_for_good_ends_the_run_with_a_clear_error(object_store, tiny_model, ray_session):
    object_store.make_bucket("faults")
    fs = object_store.filesystem()
    fs.pipe({f"faults/down/images/{name}": data for name, data in photos(2).items()})
    with (
        FaultProxy(object_store.endpoint, permanent=True) as proxy,
        pytest.raises(OSError, match=r"SlowDown|reduce your request rate"),
    ):
        run(
            {
                "input": "s3://faults/down/images",
                "output": "s3://faults/down/out",
                "model": str(tiny_model),
                # botocore's own retries off: s3fs's still run, and the test waits seconds, not a minute
                "storage_options": through(proxy, object_store, retries={"max_attempts": 1}),
            }
        )
    fs.invalidate_cache()
    assert not fs.exists("faults/down/out/_SUCCESS")
