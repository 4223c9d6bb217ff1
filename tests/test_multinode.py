"""Several machines: a local Ray cluster of three nodes (a head without CPUs and two workers,
`infra/local_cluster.py`) runs the pipeline from S3 to S3 as a user would, `dinat-batch run` as a driver
process joined to it; worker nodes are killed, replaced and added while it runs. Every run must give each
input key exactly one row."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dinat_batch.infra.local_cluster import LocalCluster
from tests.data import photos

pytestmark = pytest.mark.apart

CLI = str(Path(sys.executable).parent / "dinat-batch")
BUCKET = "multinode"
COUNT = 32


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=2, cpus_per_worker=2) as started:
        yield started


@pytest.fixture(scope="module")
def bucket(object_store, tiny_model):
    """The bucket, with the model in it: the workers share no disk with the driver."""
    object_store.make_bucket(BUCKET)
    fs = object_store.filesystem()
    for path in tiny_model.iterdir():
        fs.pipe(f"{BUCKET}/model/{path.name}", path.read_bytes())
    return fs


def images(fs, prefix: str, count: int = COUNT) -> set[str]:
    for name, data in photos(count).items():
        fs.pipe(f"{BUCKET}/{prefix}/{name}", data)
    return {f"s3://{BUCKET}/{prefix}/{name}" for name in photos(count)}


def start_driver(cluster, object_store, tmp_path, prefix: str, **settings) -> subprocess.Popen:
    job = tmp_path / f"{prefix}.json"
    config = {
        "input": f"s3://{BUCKET}/{prefix}",
        "output": f"s3://{BUCKET}/{prefix}-out",
        "model": f"s3://{BUCKET}/model",
        "storage_options": object_store.storage_options,
        "batch_size": 2,
        "read_batch_size": 4,
    }
    job.write_text(json.dumps(config | settings))
    return subprocess.Popen(
        [CLI, "run", "--config", str(job)],
        env=os.environ | cluster.driver_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def exactly_once(fs, prefix: str, expected: set[str]) -> None:
    files = [path for path in fs.ls(f"{BUCKET}/{prefix}-out") if path.endswith(".parquet")]
    keys = []
    for path in files:
        with fs.open(path, "rb") as f:
            keys += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) and set(keys) == expected


def wait_for_rows(fs, prefix: str, driver: subprocess.Popen, timeout: float = 300) -> None:
    """Until the run has written its first chunk files: it is mid-way."""
    deadline = time.monotonic() + timeout
    while not fs.glob(f"{BUCKET}/{prefix}-out/_staging/*/chunk-*.parquet"):
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no rows written in time"
        time.sleep(0.2)
        fs.invalidate_cache()


def actor_nodes(cluster) -> list[str]:
    """The live worker node of each inference actor running now."""
    found = subprocess.run(["pgrep", "-f", r"MapBatches\(Predictor\)"], capture_output=True, text=True)
    actors = {int(pid) for pid in found.stdout.split()}
    return [
        node.name
        for node in cluster.workers
        if node.process.poll() is None
        for pid in cluster.processes(node)
        if pid in actors
    ]


def wait_for_actor(cluster, driver: subprocess.Popen) -> str:
    """The node of an inference actor, once one runs."""
    while not (nodes := actor_nodes(cluster)):
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        time.sleep(0.2)
    return nodes[0]


def test_node_lost_without_replacement_finishes_on_what_remains(cluster, object_store, bucket, tmp_path):
    """(c) the worker node running the inference actor lost for good: the run finishes on the node left,
    within a bounded time. (Runs first: the next test replaces the nodes.)"""
    expected = images(bucket, "lost")
    driver = start_driver(cluster, object_store, tmp_path, "lost", max_actors=4, cpu_threads=1)
    wait_for_rows(bucket, "lost", driver)
    lost = next(node for node in cluster.workers if node.name == wait_for_actor(cluster, driver))
    cluster.kill(lost)
    _, errors = driver.communicate(timeout=600)
    assert driver.returncode == 0, errors[-3000:]
    exactly_once(bucket, "lost", expected)


def test_nodes_lost_mid_run_then_one_joins_and_the_pool_grows_onto_it(
    cluster, object_store, bucket, tmp_path
):
    """(a) every key once; (b) mid-run every worker node is SIGKILLed and a new one joins: the run
    completes; (d) the actor pool grows onto the node that joined."""
    expected = images(bucket, "replaced", 4 * COUNT)  # still running when its nodes are lost
    driver = start_driver(cluster, object_store, tmp_path, "replaced", max_actors=4, cpu_threads=1)
    wait_for_rows(bucket, "replaced", driver)
    for node in cluster.workers:
        cluster.kill(node)
    assert driver.poll() is None, "the run ended before its nodes were lost: give it more images"
    joined = cluster.add_worker()
    grew = False
    while driver.poll() is None and not grew:
        grew = joined.name in actor_nodes(cluster)
        time.sleep(0.2)
    _, errors = driver.communicate(timeout=600)
    assert driver.returncode == 0, errors[-3000:]
    assert grew, "no inference actor ran on the node that joined"
    exactly_once(bucket, "replaced", expected)


def test_every_node_lost_fails_clearly_in_bounded_time(cluster, object_store, bucket, tmp_path):
    """(c) the last worker node lost, none left to run the stages: the run fails within its stall_timeout
    with a clear error instead of waiting forever, and the same command can resume later. (Runs last:
    the cluster has no workers after it.)"""
    images(bucket, "stalled", 4 * COUNT)
    # not much lower: Ray Data's own no-progress guard gets the same timeout, and on a busy machine an
    # actor's start alone has taken over 10 s (seen in CI)
    driver = start_driver(cluster, object_store, tmp_path, "stalled", stall_timeout=30)
    wait_for_rows(bucket, "stalled", driver)
    lost = time.monotonic()
    for node in cluster.workers:
        if node.process.poll() is None:
            cluster.kill(node)
    try:
        _, errors = driver.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        driver.kill()
        pytest.fail(f"the run did not stop: {driver.communicate()[1][-3000:]}")
    assert driver.returncode == 1
    assert "made no progress for 30 s (stall_timeout)" in errors, errors[-3000:]
    assert time.monotonic() - lost < 90  # 30 s without a node, plus noticing the loss and stopping
    assert not bucket.exists(f"{BUCKET}/stalled-out/_SUCCESS")
