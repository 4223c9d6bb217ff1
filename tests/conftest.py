"""Session-wide fixtures: one real S3 server (SeaweedFS on loopback) and one Ray instance for the whole
test session, and a tiny DiNAT checkpoint for pipeline runs."""

import pytest
import ray

from dinat_batch.infra.object_store import LocalObjectStore
from tests.data import tiny_checkpoint


@pytest.fixture(scope="session")
def object_store():
    with LocalObjectStore() as store:
        yield store


@pytest.fixture(scope="session")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-weight checkpoint folder in Hugging Face layout (64 x 64 input, 12 labels)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    """A private download cache for models fetched from URIs."""
    monkeypatch.setenv("DINAT_BATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"
