"""Session-wide fixtures: one real S3 server (SeaweedFS on loopback) and one Ray instance for the whole test
session, and a tiny DiNAT checkpoint for pipeline runs.

`make test` runs the suite as three lanes of pytest processes (tests/lanes.py): the cluster lane holds every
test that is neither marked `standalone` nor `apart`, or that uses the Ray instance or the S3 server while
marked `standalone`, in order, so that they share one of each; the apart lane holds the tests that start Ray
clusters of their own (`apart`: several nodes, a job server, the demo), which use no process of the cluster
lane's; the standalone lane (models, kernels, images, configs: pure computation) runs beside both, as two
processes (`--part 1/2`, `--part 2/2`: every other test). A test that kills processes (an actor, a node)
kills only its own process tree's, never another lane's. A standalone test must not start Ray itself. Plain
`pytest` runs every lane in one process."""

import pytest
import ray
import s3fs
from fsspec.asyn import sync_wrapper

from dinat_batch.infra.object_store import LocalObjectStore
from dinat_batch.pipeline.faults import FAILED_STARTS_ENV
from tests.data import tiny_checkpoint

SHARED = {"ray_session", "object_store"}


LANES = ("cluster", "apart", "standalone")


def pytest_addoption(parser):
    parser.addoption("--lane", choices=LANES, help="run one lane (tests/lanes.py)")
    parser.addoption("--part", default="1/1", help="K/N: every Nth of the selected tests from the Kth on")


def lane_of(item: pytest.Item) -> str:
    if item.get_closest_marker("apart") is not None:
        return "apart"
    if item.get_closest_marker("standalone") is not None and not SHARED & set(item.fixturenames):
        return "standalone"
    return "cluster"


def pytest_collection_modifyitems(config, items):
    lane = config.getoption("lane")
    part, parts = map(int, config.getoption("part").split("/"))
    kept = [item for item in items if lane in (None, lane_of(item))][part - 1 :: parts]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


@pytest.fixture(scope="session")
def object_store():
    with LocalObjectStore() as store:
        yield store


@pytest.fixture(scope="session")
def failed_starts_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("failed-starts")


@pytest.fixture(scope="session")
def ray_session(failed_starts_folder):
    # the actors' processes have the environment Ray starts with: a test makes their starts fail by
    # putting files in this folder (`failed_starts`), empty otherwise
    with pytest.MonkeyPatch.context() as env:
        env.setenv(FAILED_STARTS_ENV, str(failed_starts_folder))
        # "local": a new instance, never the Ray head another test process (or a stale file) points at
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=512 * 2**20,
            resources={"inference": 1},  # for runs whose actors ask for a custom resource (actor_resources)
            logging_level="ERROR",
        )
        yield
        ray.shutdown()


@pytest.fixture
def failed_starts(ray_session, failed_starts_folder):
    """The folder in which each file is one inference actor start that fails (`faults.actor_start`),
    emptied afterwards."""
    yield failed_starts_folder
    for token in failed_starts_folder.iterdir():
        token.unlink()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-weight checkpoint folder in Hugging Face layout (64 x 64 input, 12 labels)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def process_malloc_as_is(monkeypatch):
    """For tests that build a CPU Predictor in this process: its `hold_freed_memory` would change this
    process's allocator for the tests after it."""
    monkeypatch.setattr("dinat_batch.pipeline.stages.infer.hold_freed_memory", lambda: False)


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    """A private download cache for models fetched from URIs."""
    monkeypatch.setenv("DINAT_BATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def s3_requests(monkeypatch) -> list[str]:
    """The S3 requests this process makes from here on, by method (`list_objects_v2`, `get_object`...).
    s3fs's `call_s3` was made of `_call_s3` when its class was: both are replaced."""
    made: list[str] = []
    call = s3fs.S3FileSystem._call_s3

    async def recorded(fs, method, *args, **kwargs):
        made.append(method)
        return await call(fs, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", recorded)
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", sync_wrapper(recorded))
    return made
