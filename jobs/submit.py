"""Submitting the pipeline to a Ray cluster as a Ray job, and following it.

The submission id is derived from the job's identity (the config's hash; the date too for a nightly run),
so submitting the same job twice is refused by the job server instead of running twice. The config
travels in the job's working directory; credentials never do: they come from the cluster's environment
(instance roles, Kubernetes secrets, AWS_* variables), because runtime environments and metadata are
shown in plain text by the dashboard and `ray job list`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.job_submission import JobStatus, JobSubmissionClient

from dinat_batch.pipeline.config import DRIVER_CPUS, RunConfig, is_secret_name, redact, redact_properties

TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
CONFIG_NAME = "job.yaml"


class SubmitError(RuntimeError):
    """A submission the job server would refuse or that would leak a credential; says what to do."""


def config_hash(config: RunConfig) -> str:
    """What makes two submissions the same job: every field but run_id, credentials redacted."""
    data = config.redacted()
    data.pop("run_id")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def submission_id(config: RunConfig, nightly_date: dt.date | None = None) -> str:
    digest = config_hash(config)[:16]
    return f"dinat-nightly-{nightly_date.isoformat()}-{digest}" if nightly_date else f"dinat-run-{digest}"


# credentials written into a value rather than a setting's name: URL user info, connection strings,
# signed URLs, authorization headers
_CREDENTIAL_TEXT = re.compile(
    r"://[^/@\s:]+:[^/@\s]+@|AccountKey=|SharedAccessSignature=|[?&](sig|X-Amz-Signature|X-Amz-Credential)="
    r"|\bBearer\s|\bBasic\s[A-Za-z0-9+/=]{8,}|password=",
    re.IGNORECASE,
)


def _strings(value: Any, where: str) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _strings(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in _strings(v, f"{where}[{i}]")]
    return [(where, value)] if isinstance(value, str) else []


def _refuse_secrets(config: RunConfig, env: dict[str, str]) -> None:
    """Refuse a submission that carries any credential: anything in storage_options beyond the settings
    known to be safe, and any value anywhere that looks like one."""
    data = config.model_dump(mode="json")
    hidden = [
        where
        for where, value in _strings(redact(config.storage_options), "storage_options")
        + _strings(redact_properties(config.iceberg_catalog), "iceberg_catalog")
        if value == "***"
    ]
    written = [where for where, value in _strings(data, "") if _CREDENTIAL_TEXT.search(value)]
    if hidden or written:
        raise SubmitError(
            f"the config carries credentials ({', '.join(sorted(set(hidden + written)))}); a submitted "
            "config is visible to anyone who can list the cluster's jobs. Remove them and give the cluster "
            "its own (instance role, Kubernetes secret, AWS_* variables on the workers)"
        )
    leaking = [name for name, value in env.items() if is_secret_name(name) or _CREDENTIAL_TEXT.search(value)]
    if leaking:
        raise SubmitError(
            f"--env {', '.join(leaking)} looks like a credential; runtime_env variables are shown in plain "
            "text by the dashboard. Set it on the cluster instead"
        )


def submit(
    client: JobSubmissionClient,
    config: RunConfig,
    nightly_date: dt.date | None = None,
    env: dict[str, str] | None = None,
    working_dir: Path | None = None,
    image: str | None = None,
    entrypoint_num_cpus: float = 1,
) -> str:
    """Submit `dinat-batch run` (or `nightly`) with this config; returns the submission id."""
    env = env or {}
    _refuse_secrets(config, env)
    job_id = submission_id(config, nightly_date)
    command = f"dinat-batch nightly --config {CONFIG_NAME} --date {nightly_date}" if nightly_date else None
    runtime_env: dict = {"env_vars": env | {DRIVER_CPUS: str(entrypoint_num_cpus)}}
    if image:
        runtime_env["image_uri"] = image
    with tempfile.TemporaryDirectory(prefix="dinat-job-") as tmp:
        folder = Path(tmp) / "job"
        if working_dir:
            shutil.copytree(working_dir, folder)
        else:
            folder.mkdir()
        (folder / CONFIG_NAME).write_text(json.dumps(config.model_dump(mode="json"), indent=2))
        runtime_env["working_dir"] = str(folder)
        try:
            return client.submit_job(
                entrypoint=command or f"dinat-batch run --config {CONFIG_NAME}",
                submission_id=job_id,
                runtime_env=runtime_env,
                entrypoint_num_cpus=entrypoint_num_cpus,
                metadata={
                    "dinat_batch_config_sha256": config_hash(config),
                    "model": config.model,
                    "input": config.input,
                    "output": config.output,
                    **({"nightly_date": nightly_date.isoformat()} if nightly_date else {}),
                },
            )
        except RuntimeError as err:
            if "already exists" not in str(err):
                raise
            status = client.get_job_status(job_id)
            raise SubmitError(
                f"this job was already submitted as {job_id} (status {status.value}); follow it with "
                f"`dinat-batch status {job_id}`, or change the config to run a different job"
            ) from err


def follow(
    client: JobSubmissionClient, job_id: str, echo: Callable[[str], None], poll_seconds: float = 2.0
) -> JobStatus:
    """Print the job's logs as they grow until it ends; returns its final status."""
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            echo(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_seconds)
