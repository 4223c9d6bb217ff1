"""`dinat-batch submit | status | logs | stop` as a user runs them, against a real Ray head with its job
server and token authentication, started on loopback by the test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dinat_batch.infra.local_ray import LocalRayHead
from dinat_batch.jobs.submit import SubmitError, submit
from dinat_batch.pipeline.config import DRIVER_CPUS, RunConfig
from tests.data import image_folder

pytestmark = pytest.mark.apart

CLI = str(Path(sys.executable).parent / "dinat-batch")


@pytest.fixture(scope="module")
def head():
    with LocalRayHead(num_cpus=4) as started:
        yield started


def cli(head, *args, timeout=300):
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | head.env | {"RAY_ADDRESS": head.address},
    )


def test_submit_wait_status_logs_and_refused_twice(head, tmp_path, tiny_model):
    images = image_folder(tmp_path / "images", 3)
    job = tmp_path / "job.json"
    output = tmp_path / "out"
    job.write_text(json.dumps({"input": str(images), "output": str(output), "model": str(tiny_model)}))

    first = cli(head, "submit", "--config", str(job), "--wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    job_id = first.stdout.splitlines()[0].removeprefix("submitted ")
    assert job_id.startswith("dinat-run-")
    assert "3 images, 3 ok, 0 errors" in first.stdout and first.stdout.rstrip().endswith(
        f"{job_id}: SUCCEEDED"
    )
    assert pq.read_table(output).num_rows == 3

    again = cli(head, "submit", "--config", str(job))
    assert again.returncode == 2 and f"already submitted as {job_id}" in again.stderr

    status = cli(head, "status", job_id).stdout
    assert status.startswith(f"{job_id}: SUCCEEDED")
    assert f"model: {tiny_model}" in status and "dinat_batch_config_sha256: " in status
    assert "entrypoint: dinat-batch run --config job.yaml" in status
    assert "3 images, 3 ok" in cli(head, "logs", job_id).stdout
    assert "already ended" in cli(head, "stop", job_id).stdout


def test_submission_refuses_credentials(head, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "input: s3://b/in\noutput: s3://b/out\nstorage_options: {key: AKIAEXAMPLE, secret: s3cr3t}\n"
    )
    refused = cli(head, "submit", "--config", str(job))
    assert refused.returncode == 2 and "carries credentials" in refused.stderr
    plain = tmp_path / "plain.yaml"
    plain.write_text("input: s3://b/in\noutput: s3://b/out\n")
    refused = cli(head, "submit", "--config", str(plain), "--env", "AWS_SECRET_ACCESS_KEY=s3cr3t")
    assert refused.returncode == 2 and "looks like a credential" in refused.stderr
    assert "s3cr3t" not in refused.stdout + refused.stderr


@pytest.mark.parametrize(
    "fields",
    [
        {"storage_options": {"client_kwargs": {"headers": {"Authorization": "Bearer abc.def"}}}},
        {"storage_options": {"config_kwargs": {"proxies": {"https": "http://u:pw@proxy:3128"}}}},
        {"storage_options": {"connection_string": "DefaultEndpointsProtocol=https;AccountKey=abc=="}},
        {"storage_options": {"token": "ya29.x"}},
        {"input": "https://host/images.parquet?sv=2024&sig=abcdef"},
        {"ray_address": "ray://admin:hunter2@head:10001"},
    ],
)
def test_submission_refuses_credentials_anywhere(fields):
    config = RunConfig(**({"input": "s3://b/in", "output": "s3://b/out"} | fields))
    with pytest.raises(SubmitError, match="carries credentials") as refused:
        submit(None, config)
    assert "hunter2" not in str(refused.value) and "abc==" not in str(refused.value)


def test_submission_accepts_safe_settings():
    safe = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}}
    config = RunConfig(
        input="s3://b/in",
        output="s3://b/out",
        storage_options=safe | {"config_kwargs": {"retries": {"max_attempts": 10, "mode": "adaptive"}}},
    )
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'submit_job'"):
        submit(None, config)  # past the checks: it reaches the (absent) client


def test_the_cpus_held_for_the_driver_go_with_the_job():
    """The run refuses a CPU pool that needs them (run._leave_cpus): it has to know them."""

    class Client:
        def submit_job(self, **job):
            self.job = job
            return job["submission_id"]

    client = Client()
    submit(client, RunConfig(input="s3://b/in", output="s3://b/out"), env={"A": "1"}, entrypoint_num_cpus=0.5)
    assert client.job["entrypoint_num_cpus"] == 0.5
    assert client.job["runtime_env"]["env_vars"] == {"A": "1", DRIVER_CPUS: "0.5"}
