"""Several machines: a local Ray cluster of three nodes (a head without CPUs and two workers,
`infra/local_cluster.py`) runs the pipeline from S3 to S3 as a user would, `dinat-batch run` as a driver
process joined to it; worker nodes are killed, replaced and added while it runs. Every run must give each
input key exactly one row."""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dinat_batch.infra.local_cluster import LocalCluster
from dinat_batch.pipeline.faults import HOLD_ENV, HOLD_STARTS_ENV, SLOW_ENV
from tests.data import photos

pytestmark = pytest.mark.apart

CLI = str(Path(sys.executable).parent / "dinat-batch")
BUCKET = "multinode"
COUNT = 32
# on each worker node: a run whose actors ask for one holds one actor per node, as one per GPU on GPU nodes
SLOT = {"inference": 1}
# each model call waits on the workers, as on a slow accelerator, spending no CPU: runs outlast node
# changes; and while the hold file exists, calls wait for it to go
SLOW = {SLOW_ENV: "1.0"}


@pytest.fixture(scope="module")
def hold(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hold") / "calls"


@pytest.fixture(scope="module")
def hold_starts(hold) -> Path:
    return hold.with_name("starts")


@pytest.fixture(scope="module")
def cluster(hold, hold_starts):
    workers = SLOW | {HOLD_ENV: str(hold), HOLD_STARTS_ENV: str(hold_starts)}
    with LocalCluster(
        workers=2, cpus_per_worker=2, resources_per_worker=SLOT, env_per_worker=workers
    ) as started:
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


@dataclass
class Driver:
    """A `dinat-batch run` process joined to the cluster, its output going to a file (a pipe nobody reads
    until the end would block a talkative run)."""

    process: subprocess.Popen
    log: Path

    def running(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text()[-3000:]

    def finish(self, timeout: float) -> int:
        """The exit status; a driver still running after `timeout` seconds is killed and fails the test."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the run did not stop within {timeout:.0f} s: {self.output()}")


def start_driver(cluster, object_store, tmp_path, prefix: str, **settings) -> Driver:
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
    log = tmp_path / f"{prefix}.log"
    with log.open("w") as out:
        # stdout block-buffered, as when a user's shell redirects it: Ray's lines must still come first
        env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
        process = subprocess.Popen(
            [CLI, "run", "--config", str(job)],
            env=env | cluster.driver_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Driver(process, log)


def exactly_once(fs, prefix: str, expected: set[str]) -> None:
    files = [path for path in fs.ls(f"{BUCKET}/{prefix}-out") if path.endswith(".parquet")]
    keys = []
    for path in files:
        with fs.open(path, "rb") as f:
            keys += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) and set(keys) == expected


def wait_for_rows(fs, prefix: str, driver: Driver, timeout: float = 300) -> None:
    """Until the run has written its first chunk files: it is mid-way."""
    deadline = time.monotonic() + timeout
    while not fs.glob(f"{BUCKET}/{prefix}-out/_staging/*/chunk-*.parquet"):
        assert driver.running(), driver.output()
        assert time.monotonic() < deadline, "no rows written in time"
        time.sleep(0.2)
        fs.invalidate_cache()


def actors(cluster) -> dict[int, str]:
    """The process id of each inference actor running now, and the live worker node it runs on."""
    found = subprocess.run(["pgrep", "-f", r"MapBatches\(Predictor\)"], capture_output=True, text=True)
    running = {int(pid) for pid in found.stdout.split()}
    return {
        pid: node.name
        for node in cluster.workers
        if node.process.poll() is None
        for pid in cluster.processes(node)
        if pid in running
    }


def wait_for_actor(
    cluster, driver: Driver, on: set[str] = frozenset(), timeout: float = 300
) -> dict[int, str]:
    """The inference actors (`actors`) once one runs, and one on each node of `on`."""
    deadline = time.monotonic() + timeout
    while not ((found := actors(cluster)) and on <= set(found.values())):
        where = f" on {', '.join(sorted(on - set(found.values())))}" if on else ""
        assert driver.running(), f"the run ended before an actor ran{where}: {driver.output()}"
        assert time.monotonic() < deadline, f"no actor ran{where} within {timeout:.0f} s"
        time.sleep(0.2)
    return found


def test_node_lost_without_replacement_finishes_on_what_remains(cluster, object_store, bucket, tmp_path):
    """(c) the worker node running the inference actor lost for good: the run finishes on the node left,
    within a bounded time. (Runs first: the next test replaces the nodes.)"""
    expected = images(bucket, "lost")
    driver = start_driver(cluster, object_store, tmp_path, "lost", max_actors=4, cpu_threads=1)
    wait_for_rows(bucket, "lost", driver)
    on = next(iter(wait_for_actor(cluster, driver).values()))
    cluster.kill(next(node for node in cluster.workers if node.name == on))
    assert driver.finish(600) == 0, driver.output()
    exactly_once(bucket, "lost", expected)


def test_nodes_lost_mid_run_then_nodes_join_and_the_pool_grows_onto_them(
    cluster, object_store, bucket, tmp_path, hold
):
    """(a) every key once; (b) mid-run every worker node is SIGKILLed and a new one joins: the run
    completes; (d) a second node joins while the first one's actor works: the pool grows onto the joined
    nodes, an actor on each, more than were lost (Ray restarts lost actors, which alone bring back no
    more). Each actor asks for the one `inference` slot of a node, as a GPU actor for a GPU node's one GPU.
    The second node has more CPUs, as a GPU node has beside its GPU: Ray Data adds an actor only when the
    CPUs it shares out among the stages leave one for it (on two 2-CPU nodes they did not). Model calls
    are held from the loss until the pool has grown: however slowly the nodes start, the run cannot end
    first."""
    expected = images(bucket, "replaced", 4 * COUNT)  # still running when its nodes are lost
    # one worker node to start on, so one actor to lose (the test before leaves one; alone, this one finds
    # two, whose two lost actors restarted would fill both joined nodes without the pool growing)
    for node in [node for node in cluster.workers if node.process.poll() is None][1:]:
        cluster.kill(node)
    driver = start_driver(
        cluster, object_store, tmp_path, "replaced", max_actors=4, cpu_threads=1, actor_resources=SLOT
    )
    wait_for_rows(bucket, "replaced", driver)
    hold.touch()
    try:
        lost = actors(cluster)
        for node in cluster.workers:
            cluster.kill(node)
        assert driver.running(), "the run ended before its nodes were lost: give it more images"
        first = cluster.add_worker()
        wait_for_actor(cluster, driver, on={first.name})
        second = cluster.add_worker(cpus=6)
        # which node a restarted actor and a new one land on is a race; how many there are is not
        grown = wait_for_actor(cluster, driver, on={first.name, second.name})
        # one `inference` slot per node and one node at the loss: one actor lost, two running is growth
        assert len(lost) <= 1, f"{len(lost)} actors at the loss, on one node of one slot"
        assert len(grown) > len(lost), f"{len(lost)} actors lost, {len(grown)} running: the pool did not grow"
    finally:
        hold.unlink()
    assert driver.finish(600) == 0, driver.output()
    exactly_once(bucket, "replaced", expected)
    cluster.kill(second)  # the next test runs on one small node, as before: fewer processes to start


def test_a_node_lost_while_its_actor_starts_is_replaced(cluster, object_store, bucket, tmp_path, hold_starts):
    """The node an inference actor is starting on (a big model loading) is lost, as a spot instance taken
    back just after it joined, and another joins: the actor starts there (Ray restarts it; a start that
    raises is another matter, `infer.FAILED_STARTS`) and the run completes, every key once. (Leaves one
    worker node, as the test before does.)"""
    for node in [node for node in cluster.workers if node.process.poll() is None][1:]:
        cluster.kill(node)  # one node to start on: the actor cannot start on another
    expected = images(bucket, "starting")
    hold_starts.touch()
    waiting = Path(f"{hold_starts}.waiting")
    try:
        driver = start_driver(cluster, object_store, tmp_path, "starting", actor_resources=SLOT)
        on = next(iter(wait_for_actor(cluster, driver).values()))
        deadline = time.monotonic() + 120
        while not waiting.exists():  # the actor is in its start, held
            assert driver.running() and time.monotonic() < deadline, driver.output()
            time.sleep(0.2)
        assert not bucket.glob(f"{BUCKET}/starting-out/_staging/*/chunk-*.parquet")
        bucket.invalidate_cache()  # the listing above would be the one read at the end
        cluster.kill(next(node for node in cluster.workers if node.name == on))
        hold_starts.unlink()
        joined = cluster.add_worker()
        wait_for_actor(cluster, driver, on={joined.name})
    finally:
        hold_starts.unlink(missing_ok=True)
        waiting.unlink(missing_ok=True)
    assert driver.finish(600) == 0, driver.output()
    assert "died during initialization" not in driver.log.read_text()  # Ray's restart, not a new actor
    exactly_once(bucket, "starting", expected)


def test_every_node_lost_fails_clearly_in_bounded_time(cluster, object_store, bucket, tmp_path):
    """(c) the last worker node lost, none left to run the stages: the run fails within its stall_timeout
    with a clear error instead of waiting forever, and the same command can resume later. (Runs last:
    the cluster has no workers after it.)"""
    images(bucket, "stalled", 4 * COUNT)
    # not lower: Ray Data's own no-progress guard gets the same timeout, and counts the actor's start; on
    # a busy machine (CI's three lanes on two cores) a start took over 30 s and ended the run before it
    # wrote a row
    driver = start_driver(cluster, object_store, tmp_path, "stalled", stall_timeout=45)
    wait_for_rows(bucket, "stalled", driver)
    lost = time.monotonic()
    for node in cluster.workers:
        cluster.kill(node)  # a node gone already is left alone
    assert driver.finish(150) == 1, driver.output()
    # the last lines the user reads, after Ray's log lines about the lost nodes
    last = "\n".join(driver.output().splitlines()[-2:])
    assert "made no progress for 45 s (stall_timeout)" in last, driver.output()
    assert time.monotonic() - lost < 105  # 45 s without a node, plus noticing the loss and stopping
    assert not bucket.exists(f"{BUCKET}/stalled-out/_SUCCESS")
