"""The job configuration: one pydantic model, loaded from YAML or JSON and overridden by CLI flags.

Everything that crosses a process or a file is validated here, before any data is read, with errors that
name the field. `storage_options` may carry credentials: `redacted()` is the only form that is logged or
written anywhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dinat_batch.pipeline.locations import canonical_protocol, protocol_entry, resolve

DEFAULT_MODEL = "shi-labs/dinat-mini-in1k-224"
DEFAULT_MAX_PIXELS = 100_000_000  # ~10k x 10k; bigger declared sizes are treated as decompression bombs
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Ray's own resources, which it refuses among custom ones: the run asks for the CPUs and GPUs itself
BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
# Ray counts resources in units of 1/10000
ResourceAmount = Annotated[float, Field(ge=0.0001, allow_inf_nan=False)]
_USERINFO = re.compile(r"://[^/@\s]+@")  # http://user:password@host in a safe setting's value
_SECRET_NAME = re.compile(r"key|secret|token|password|credential|session|auth|sig", re.IGNORECASE)
# storage_options settings shown as they are; every other value in storage_options is redacted, so a
# credential under a name nobody foresaw (a header, a connection string) is never written or logged
SAFE_STORAGE_OPTIONS = frozenset(
    {
        "client_kwargs",
        "config_kwargs",
        "s3",
        "retries",
        "endpoint_url",
        "region_name",
        "use_ssl",
        "verify",
        "anon",
        "addressing_style",
        "signature_version",
        "connect_timeout",
        "read_timeout",
        "max_attempts",
        "mode",
        "max_pool_connections",
        "requester_pays",
        "version_aware",
        "cache_regions",
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "default_block_size",
        "default_fill_cache",
        "default_cache_type",
        "max_concurrency",
        "project",
        "auto_mkdir",
    }
)


# the config fields that shape the rows: a finished output is topped up only by the same job
SAME_JOB = ("input", "model", "input_format", "image_column", "uri_column", "top_k")


# Set by `dinat-batch submit` in the job's environment: the CPUs Ray holds for the job's driver
# (entrypoint_num_cpus) for the whole run, which the cluster's total still counts (see run._leave_cpus)
DRIVER_CPUS = "DINAT_BATCH_DRIVER_CPUS"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and what to change."""


class RunConfig(BaseModel):
    """One pipeline run: where the images are, which model, where the Parquet goes, how to schedule it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="prefix, glob, file, .tar shards or Parquet table (any fsspec URI)")
    output: str = Field(
        description="directory for the Parquet dataset, or the Iceberg table's location (any fsspec URI)"
    )
    model: str = Field(DEFAULT_MODEL, description="hub id, local folder or fsspec URI of an HF checkpoint")
    input_format: Literal["auto", "files", "webdataset", "parquet"] = Field(
        "auto", description="auto: from the extensions found under the input"
    )
    image_column: str = Field(
        "image", description="Parquet input: column of image bytes (or a struct with a `bytes` field)"
    )
    uri_column: str | None = Field(None, description="Parquet input: column of image URIs instead of bytes")
    output_format: Literal["parquet", "iceberg"] = Field(
        "parquet",
        description="parquet: files listed by _SUCCESS; iceberg: a table in iceberg_catalog, one snapshot "
        "per run",
    )
    iceberg_table: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)+$", description="Iceberg: namespace.table"
    )
    iceberg_catalog: dict[str, str] = Field(
        default_factory=dict,
        description='Iceberg: pyiceberg catalog properties, e.g. {"type": "sql", "uri": "sqlite:////x/cat.db"}'
        ', {"type": "rest", "uri": ...} or {"type": "glue"}',
    )
    top_k: int = Field(5, ge=1, le=1000, description="labels and scores kept per image")
    batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="images per model call; default: on a CPU 8 per lane (32 where the actor has one lane: "
        "compiled), on a GPU as many as fit its free memory",
    )
    min_actors: int = Field(1, ge=1, description="smallest inference actor pool")
    max_actors: int | None = Field(
        None,
        ge=1,
        description="default: on GPUs no bound, the pool grows onto every GPU node that joins; one on a "
        "CPU-only cluster",
    )
    actor_resources: dict[str, ResourceAmount] = Field(
        default_factory=dict,
        description='custom Ray resources each inference actor asks for, e.g. {"h100": 1} where one worker '
        "group declares it: actors run only there, one per unit",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: GPU actors when the cluster has GPUs now; cuda: wait for them (autoscaling)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="on a GPU: autocast of the matrix products, weights and norms stay float32"
    )
    compile: Literal["auto", "off", "on", "graphs"] = Field(
        "auto",
        description="torch.compile the model (graphs: with CUDA graphs); auto: graphs on a GPU with torch >= 2.13",
    )
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="where JPEGs are decoded: cpu, gpu (nvJPEG in the actors) or auto: on the CPUs, with "
        "a share on the GPU where the cluster has few CPUs per GPU (device_decode_share)",
    )
    device_decode_share: float | None = Field(
        None,
        ge=0,
        le=1,
        description="the share of JPEGs the GPU actors decode, chosen by key; the CPU tasks decode the rest. "
        "Default: all with decode: gpu; with auto, 1 - CPUs / (11 x GPUs): none at 11 or more CPUs per GPU, "
        "a quarter at 8 (fitted on 500 x 375 JPEGs; larger photos cost the CPUs more)",
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="cores a CPU actor's model uses: eager, one call per core at a time, each on one thread "
        "(holding its batch's activations: ~0.3 GB for dinat-mini; set batch_size to hold less); compiled, "
        "one call on that many threads. Default: the CPUs Ray declares on the largest node with the "
        "actor_resources; an actor runs no more lanes than its own node declares CPUs, nor than fit in half the "
        "memory Ray declares there beside what it holds (one call measured at start)",
    )
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger declared images are decode errors")
    max_bytes_per_image: int = Field(
        64 * 2**20,
        ge=1,
        description="larger images are TooLarge error rows; objects and tar members are not read past it",
    )
    allowed_uri_prefixes: list[str] | None = Field(
        None,
        description="Parquet uri_column: where listed URIs may point; default: the input's own bucket",
    )
    read_batch_size: int = Field(64, ge=1, description="objects fetched concurrently per read task")
    rows_per_file: int = Field(
        100_000, ge=1, description="target rows per output Parquet file (small chunks are compacted)"
    )
    chunk_rows: int | None = Field(
        None,
        ge=1,
        description="rows per chunk file written while running; default: each inference batch as it "
        "comes, so a crash loses only the batches in flight",
    )
    stall_timeout: float = Field(
        1800.0,
        gt=0,
        description="fail a run that makes no progress for this many seconds, e.g. on a cluster that lost "
        "every node able to run one of its stages; raise it where a cluster waits long for capacity",
    )
    lease_timeout: float = Field(
        600.0, gt=0, description="seconds without a heartbeat after which another run takes the output over"
    )
    max_error_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="fail the run (rows written, no _SUCCESS) above this share of error rows",
    )
    overwrite: bool = Field(False, description="replace an existing output instead of refusing")
    shared_filesystem: bool = Field(
        False,
        description="local paths are one filesystem every node mounts (NFS, Lustre, ...); without it a "
        "cluster of several nodes refuses local input, output and model paths",
    )
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]+$",
        max_length=128,
        description="default: UTC time and a random suffix",
    )
    ray_address: str | None = Field(None, description="default: RAY_ADDRESS, else a local Ray")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description='fsspec options, may hold keys; a protocol\'s own under its name ({"https": {...}}), '
        "used for its URIs instead of the others, which web URLs never get",
    )

    @field_validator("input", "output", "model")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("storage_options")
    @classmethod
    def _one_entry_per_protocol(cls, value: dict[str, Any]) -> dict[str, Any]:
        seen: dict[str, str] = {}
        for name, options in value.items():
            if protocol_entry(name, options):
                protocol = canonical_protocol(name)
                if protocol in seen:
                    raise ValueError(
                        f"storage_options has two entries for {protocol} URIs ({seen[protocol]!r} and "
                        f"{name!r}): only one would be used. Keep one"
                    )
                seen[protocol] = name
        return value

    @field_validator("actor_resources")
    @classmethod
    def _custom_resources_only(cls, value: dict[str, float]) -> dict[str, float]:
        reserved = {name.upper() for name in BUILTIN_RESOURCES}
        builtin = sorted(name for name in value if name.upper() in reserved)
        if builtin:
            raise ValueError(
                f"{', '.join(builtin)}: Ray's own resources, not custom ones; the run asks for CPUs and GPUs "
                "itself (device: cuda for GPU actors)"
            )
        return value

    @model_validator(mode="after")
    def _output_apart_from_input(self) -> RunConfig:
        source, target = resolve(self.input), resolve(self.output)
        if source.covers(target):
            where = "is the input" if source == target else "lies inside the input"
            raise ValueError(
                f"output {self.output!r} {where} {self.input!r} (both resolve to {source} and {target}): "
                "a run would read its own output. Choose an output outside the input"
            )
        if target.covers(source):
            raise ValueError(
                f"the input {self.input!r} lies inside the output {self.output!r} ({source} is under "
                f"{target}): --overwrite would delete it. Choose an output beside the input, not above it"
            )
        return self

    @model_validator(mode="after")
    def _decode_share_applies(self) -> RunConfig:
        if self.device_decode_share is not None and self.decode == "cpu":
            raise ValueError(
                "device_decode_share is for decode auto or gpu: decode cpu decodes every image on the CPUs. "
                "Remove the share, or set decode to auto or gpu"
            )
        if self.device_decode_share == 0 and self.decode == "gpu":
            raise ValueError(
                "decode gpu with device_decode_share 0 would decode nothing on the GPU: set decode to cpu, "
                "or the share above 0"
            )
        return self

    @model_validator(mode="after")
    def _iceberg_settings(self) -> RunConfig:
        if self.output_format == "iceberg" and not (self.iceberg_table and self.iceberg_catalog):
            raise ValueError(
                "output_format iceberg needs iceberg_table (namespace.table) and iceberg_catalog (e.g. "
                '{"type": "sql", "uri": "sqlite:////path/catalog.db"})'
            )
        if self.output_format == "parquet" and (self.iceberg_table or self.iceberg_catalog):
            raise ValueError("iceberg_table and iceberg_catalog are for output_format iceberg")
        return self

    def redacted(self) -> dict[str, Any]:
        """The config as JSON-able data with every credential (in storage_options and in the Iceberg
        catalog's properties) replaced by '***'."""
        data = self.model_dump(mode="json")
        data["storage_options"] = redact(data["storage_options"])
        data["iceberg_catalog"] = redact_properties(data["iceberg_catalog"])
        return data


def is_secret_name(name: str) -> bool:
    """Whether a variable of this name looks like it holds a credential (key, secret, token, ...)."""
    return bool(name) and bool(_SECRET_NAME.search(name))


def redact(value: Any, name: str = "") -> Any:
    """storage_options with every value outside SAFE_STORAGE_OPTIONS replaced by '***' (a protocol's own
    entry, `{"s3": {...}}`, is redacted as the options it holds)."""
    if name and name not in SAFE_STORAGE_OPTIONS:
        return "***"
    if isinstance(value, dict):
        # a protocol's entry, at the top only (where `options_for` reads them), holds options of its own
        return {
            k: redact(v, "" if not name and protocol_entry(str(k), v) else str(k)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, name) for v in value]
    return _USERINFO.sub("://***@", value) if isinstance(value, str) else value


def redact_properties(properties: dict[str, str]) -> dict[str, str]:
    """Catalog properties with the values of credential-like names (s3.secret-access-key, token,
    credential, ...) replaced by '***' and user:password@ removed from URIs."""
    return {
        name: "***" if is_secret_name(name) else _USERINFO.sub("://***@", value)
        for name, value in properties.items()
    }


def load_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """A RunConfig from a YAML or JSON file, with `overrides` (CLI flags; None means not given) on top."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read the config file {path}: {err.strerror}") from err
        try:
            loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ConfigError(
                f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}"
            ) from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config fields, not {type(loaded).__name__}")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe(err, path)) from err


def flag_name(field: str) -> str:
    """The command-line flag of a config field: `--top-k` for `top_k`."""
    return f"--{field.replace('_', '-')}"


def describe(err: ValidationError, path: Path | None = None) -> str:
    """One line per invalid field, naming it as the config file and the CLI flag spell it."""
    where = f" in {path}" if path else ""
    lines = [f"invalid job configuration{where}:"]
    for problem in err.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "(config)"
        flag = f" ({flag_name(str(problem['loc'][0]))})" if problem["loc"] else ""
        lines.append(f"  {field}{flag}: {problem['msg']}")
    return "\n".join(lines)
