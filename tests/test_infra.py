"""The deployment files parse, have the fields their kinds require, and agree with each other and with the
CLI: one image everywhere, entrypoints that the CLI accepts, the mounted config valid and free of keys."""

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import typer
import yaml

from dinat_batch.pipeline.cli import app
from dinat_batch.pipeline.config import RunConfig, redact

pytestmark = pytest.mark.standalone

INFRA = Path(__file__).resolve().parents[1] / "infra"
ROOT = INFRA.parent
DOCKERFILE = (INFRA / "docker" / "Dockerfile").read_text()
IMAGE = re.search(r"docker build .* -t (\S+) \.", DOCKERFILE).group(1)


def manifests() -> dict[str, dict]:
    found = {}
    for path in sorted((INFRA / "kuberay").glob("*.yaml")):
        (document,) = yaml.safe_load_all(path.read_text())
        found[document["kind"]] = document
    return found


KUBE = manifests()


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def accepts(command: list[str]) -> None:
    """Parse a `dinat-batch ...` command line with the CLI's own parser, without running it."""
    assert command[0] == "dinat-batch", command
    group = typer.main.get_command(app)
    sub = group.get_command(group.make_context("dinat-batch", command[1:2]), command[1])
    assert sub is not None, f"no such command: {command[1]}"
    sub.make_context(command[1], command[2:])


def test_every_kind_is_there_with_its_api():
    assert {kind: doc["apiVersion"] for kind, doc in KUBE.items()} == {
        "ConfigMap": "v1",
        "CronJob": "batch/v1",
        "RayCluster": "ray.io/v1",
        "RayCronJob": "ray.io/v1",
        "RayJob": "ray.io/v1",
    }


def test_one_image_everywhere():
    cluster = KUBE["RayCluster"]["spec"]
    job = KUBE["RayJob"]["spec"]["rayClusterSpec"]
    images = [c["image"] for spec in (cluster, job) for c in containers(spec["headGroupSpec"]["template"])]
    images += [
        c["image"]
        for spec in (cluster, job)
        for g in spec["workerGroupSpecs"]
        for c in containers(g["template"])
    ]
    images += [c["image"] for c in containers(KUBE["CronJob"]["spec"]["jobTemplate"]["spec"]["template"])]
    images.append(yaml.safe_load((INFRA / "cluster" / "aws.yaml").read_text())["docker"]["image"])
    assert set(images) == {IMAGE}


@pytest.mark.parametrize("spec", [KUBE["RayCluster"]["spec"], KUBE["RayJob"]["spec"]["rayClusterSpec"]])
def test_clusters_have_a_cpu_head_and_autoscaling_gpu_workers(spec):
    assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True
    (head,) = containers(spec["headGroupSpec"]["template"])
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    (worker,) = containers(gpu["template"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_entrypoints_are_cli_commands_on_the_mounted_config():
    job = KUBE["RayJob"]["spec"]
    cron = KUBE["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]
    commands = [
        shlex.split(job["entrypoint"]),
        shlex.split(KUBE["RayCronJob"]["spec"]["jobTemplate"]["entrypoint"]),
        containers(cron)[0]["command"],
    ]
    line = next(
        entry
        for entry in (INFRA / "cron" / "dinat-batch-nightly.crontab").read_text().splitlines()
        if entry[:1].isdigit()
    )
    fields = line.split(None, 5)
    assert len(fields) == 6 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5])
    command = shlex.split(fields[5].split(">>")[0])
    commands.append(["dinat-batch", *command[2:]])
    mounted = {
        m["mountPath"]
        for m in containers(job["rayClusterSpec"]["headGroupSpec"]["template"])[0]["volumeMounts"]
    }
    for command in commands:
        accepts(command)
        config = command[command.index("--config") + 1]
        assert config == "/etc/dinat-batch/job.yaml"
    assert "/etc/dinat-batch" in mounted


def test_schedules_and_cluster_references():
    cluster = KUBE["RayCluster"]["metadata"]["name"]
    raycron = KUBE["RayCronJob"]["spec"]
    assert raycron["jobTemplate"]["clusterSelector"] == {"ray.io/cluster": cluster}
    cron = KUBE["CronJob"]["spec"]
    command = containers(cron["jobTemplate"]["spec"]["template"])[0]["command"]
    assert command[command.index("--address") + 1] == f"http://{cluster}-head-svc:8265"
    for schedule in (cron["schedule"], raycron["schedule"]):
        assert len(schedule.split()) == 5
    assert cron["concurrencyPolicy"] == "Forbid" and cron["jobTemplate"]["spec"]["backoffLimit"] == 0
    job = KUBE["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True and isinstance(job["ttlSecondsAfterFinished"], int)


def test_the_shipped_job_config_is_valid_and_keyless():
    config = RunConfig.model_validate(yaml.safe_load(KUBE["ConfigMap"]["data"]["job.yaml"]))
    assert redact(config.storage_options) == config.storage_options
    assert config.device == "cuda"


def test_dockerfile_matches_the_project_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {re.split(r"[\[=<>]", d)[0]: d for d in project["project"]["dependencies"]}
    assert "rayproject/ray:2.60.0-" in DOCKERFILE and "==2.60.0" in pins["ray"]
    natten = re.search(r"natten==([\d.]+)", DOCKERFILE).group(1)
    assert pins["natten"].endswith(f"=={natten}")
    assert "torch==2.13.0 --index-url" in DOCKERFILE and "NATTEN_CUDA_ARCH" in DOCKERFILE
    (torchvision,) = project["project"]["optional-dependencies"]["gpu"]
    assert f"torch==2.13.0 {torchvision} --index-url" in DOCKERFILE
    for package in ("kernels", "pipeline", "jobs", "infra"):
        assert f"COPY --chown=ray:users {package} /opt/dinat-batch/{package}" in DOCKERFILE
