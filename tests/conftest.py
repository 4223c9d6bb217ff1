"""Session-wide fixtures: one real S3 server (SeaweedFS on loopback) for the whole test session."""

import pytest

from infra.object_store import LocalObjectStore


@pytest.fixture(scope="session")
def object_store():
    with LocalObjectStore() as store:
        yield store


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    """A private download cache for models fetched from URIs."""
    monkeypatch.setenv("DINAT_BATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"
