"""Wires the stages (`pipeline/stages/`) into one Ray Data plan and runs it: list -> read -> decode (CPU
tasks) -> infer (actor pool) -> chunk files -> compaction -> `_SUCCESS`. Returns the run summary, which is also the marker's manifest.

A run is planned (model checked, inputs listed), executed into an output it holds the lease of, and
committed through `pipeline/output.py`; the nightly job uses the same three steps on a partition.
"""

from __future__ import annotations

import _thread
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from difflib import get_close_matches
from typing import Any

import ray
import torch
from pydantic import BaseModel
from ray.data.exceptions import ExecutionTimeoutError

from dinat_batch.pipeline.config import BUILTIN_RESOURCES, DRIVER_CPUS, ConfigError, RunConfig
from dinat_batch.pipeline.gpu_decoding import default_share, unsupported
from dinat_batch.pipeline.iceberg import IcebergTable
from dinat_batch.pipeline.lease import Lease
from dinat_batch.pipeline.locations import options_for, resolve
from dinat_batch.pipeline.model import ModelChanged, ModelPin, load_model
from dinat_batch.pipeline.model.preprocessing import PreprocessConfig
from dinat_batch.pipeline.model.runtime import resolve_compile
from dinat_batch.pipeline.output import FAILURE, SUCCESS, Compacted, Output, VerificationFailed
from dinat_batch.pipeline.ownership import Ownership
from dinat_batch.pipeline.resume import Resume, resume, unfinished
from dinat_batch.pipeline.selection import digest
from dinat_batch.pipeline.stages import CPU_TASK, decode, infer, read, write
from dinat_batch.pipeline.stages.infer import Actors, ActorSettings

logger = logging.getLogger(__name__)


class Stalled(RuntimeError):
    """The run made no progress for `stall_timeout` seconds: nothing was committed, its rows are kept."""


class ActorsFailedToStart(RuntimeError):
    """An inference actor's constructor raised, and Ray Data replaced no more (infer.FAILED_STARTS)."""


class ErrorRateExceeded(RuntimeError):
    """More error rows than the config allows: the run wrote its rows and `_FAILURE`, not `_SUCCESS`."""


class RunSummary(BaseModel):
    run_id: str
    input: str
    input_format: str
    output: str
    model: str
    model_sha256: str
    model_revision: str | None  # for a hub id, the commit every actor loaded
    checkpoint_sha256: str  # of the weights and both configs: the model, for a resume or a retry
    device: str
    decode: str  # where JPEGs were decoded: cpu, or gpu for a share of them
    device_decode_share: float  # the share of JPEGs decoded on the GPU
    images: int
    resumed: int  # rows kept from earlier attempts that died before their marker
    ok: int
    errors: int
    retryable_errors: (
        int  # of `errors`: failed reads (the store, not the image), retried by a resume or rerun
    )
    errors_by_kind: dict[str, int]
    files: int  # table files committed
    started_at: datetime
    finished_at: datetime
    listing_seconds: float
    seconds: float
    images_per_second: float
    config: dict[str, Any]


@dataclass
class Plan:
    """What a run will do, settled before any image is read: the model, the actors, the inputs."""

    config: RunConfig
    run_id: str
    attempt: str  # this start of the run: the name of its staging folder
    kind: str
    listing: ray.data.MaterializedDataset  # uri, size, version of each image file, shard or table to read
    preprocessing: PreprocessConfig
    model_sha256: str
    model_pin: ModelPin  # the checkpoint every actor loads
    num_features: int
    actors: Actors
    device_share: float  # of the JPEGs, decoded by the GPU actors; 0: every image decoded on the CPU
    started_at: datetime
    listing_seconds: float
    guard: StallGuard  # the stall guard it is carried out under: the stages add an actor's node to its needs

    def owner(self, output: Output) -> Ownership:
        return Ownership(self.run_id, self.model_pin.sha256, self.attempt, output.identity)


def _actors(config: RunConfig, resources: dict[str, float], nodes: list[dict[str, float]]) -> Actors:
    """GPU actors where GPUs exist (or are asked for, for autoscaling clusters that start without any), so
    that a CPU-only cluster never waits for a GPU that will not come. A GPU pool has no default bound: it
    grows onto each GPU node that joins while the run goes on, as far as the autoscaler lets the cluster
    grow. A CPU actor runs its model on `cpu_threads` cores, by default the CPUs Ray declares on the
    largest live node that has what the actors ask for (they follow a container's CPU limit), so by
    default there is one: CPU clusters are for trying things out (set max_actors, with cpu_threads, to
    use more machines); eager, it runs a one-thread lane per core (see `Actors`), no more than its own
    node declares CPUs (`infer.on_this_node`). `resources`: the cluster's, as Ray totals them; `nodes`: its
    live nodes' resources."""
    gpus, asks = int(resources.get("GPU", 0)), dict(config.actor_resources)
    if config.device == "cuda" or (config.device == "auto" and gpus > 0):
        max_size = config.max_actors
        return Actors("cuda", 1, min(config.min_actors, max_size or config.min_actors), max_size, asks)
    max_size = config.max_actors or 1
    cores = config.cpu_threads or _node_cores(nodes, asks)
    compiled = resolve_compile(config.compile, torch.device("cpu")) != "off"
    lanes, threads = (1, cores) if compiled else (cores, 1)
    return Actors("cpu", 0, min(config.min_actors, max_size), max_size, asks, lanes, threads)


def _node_cores(nodes: list[dict[str, float]], asks: dict[str, float]) -> int:
    """The CPUs Ray declares on the largest of `nodes` that has each resource of `asks` (where the actors
    may run); where none declares any (an autoscaling cluster before its first such worker), the cores
    this process may use (`infer.process_cpus`: a container's CPU quota and the process's affinity)."""
    fit = [node for node in nodes if all(node.get(name, 0) >= amount for name, amount in asks.items())]
    declared = max((node.get("CPU", 0) for node in fit), default=0)
    return max(int(declared), 1) if declared else infer.process_cpus()


def _leave_cpus(
    actors: Actors, resources: dict[str, float], free: dict[str, float], stall_timeout: float
) -> None:
    """Refuse a CPU pool whose smallest size would hold every CPU of the cluster but the submitted job's
    driver's (`DRIVER_CPUS`): Ray Data gives each actor one for the whole run, and no read or decode task
    (`CPU_TASK`) could start beside them; the run would wait out its stall_timeout (30 minutes by default)
    without an error. Warn where it would hold every CPU free now (`free`: Ray's available resources;
    other jobs hold the rest), which may yet be freed. A cluster declaring no CPU yet (an autoscaler's) is
    let through: its CPUs come with its nodes."""
    total, task = resources.get("CPU", 0), CPU_TASK["num_cpus"]
    if actors.device != "cpu" or not total:
        return
    driver = float(os.environ.get(DRIVER_CPUS) or 0)
    pool = f"the CPU inference pool starts with {actors.min_size} actor{'s' * (actors.min_size != 1)}"
    if total - driver - actors.min_size < task:
        most = math.floor(total - driver - task)
        fix = f"set min_actors to at most {most}, or run" if most >= 1 else "run"
        held = f", {driver:g} of them held by this job's driver (--entrypoint-num-cpus)" if driver else ""
        raise ConfigError(
            f"{pool} (min_actors, clipped to max_actors), each holding one of the cluster's {total:g} CPUs "
            f"for the run{held}: none would be left for the read and decode tasks ({task:g} each); {fix} "
            "on more CPUs"
        )
    if free.get("CPU", 0) - actors.min_size < task:
        logger.warning(
            "%s, each holding a CPU for the run, and %g of the cluster's %g CPUs are free now: the read and "
            "decode tasks wait for other work to free CPUs, and the run stops after stall_timeout (%.0f s) "
            "if none does",
            pool,
            free.get("CPU", 0),
            total,
            stall_timeout,
        )


def _device_share(
    config: RunConfig, actors: Actors, preprocessing: PreprocessConfig, resources: dict[str, float]
) -> float:
    """The share of JPEGs the CPU stage sends on to be decoded by the GPU actors, on a cluster of
    `resources`. The default weighs the cluster's CPUs against the GPUs the pool can use."""
    reason = unsupported(preprocessing, actors.device)
    if config.decode == "gpu" and reason is not None:
        raise ConfigError(f"decode: gpu cannot run here: {reason}. Set decode to auto or cpu (--decode)")
    if config.decode == "cpu" or reason is not None:
        return 0.0
    if config.device_decode_share is not None:
        return config.device_decode_share
    if config.decode == "gpu":
        return 1.0
    gpus = resources.get("GPU", 0)
    return default_share(resources.get("CPU", 0), min(gpus, actors.max_size or gpus))


def local_cpus() -> float:
    """The CPUs a local Ray declares: the machine's, as Ray counts them (a container's CPU quota too), and
    at least two. An inference actor holds one of Ray's CPUs for the whole run; on a machine of one, the
    read and decode tasks beside it would never start, and the run would wait out its stall_timeout."""
    return max(2, ray._private.utils.get_num_cpus())


@contextmanager
def ray_connection(address: str | None) -> Iterator[None]:
    """Join the configured or ambient Ray cluster, else start a local one; leave it (or stop the local
    one) afterwards, before a failed run's error is printed: leaving flushes the workers' deduplicated
    log lines, which at the process's exit would print after the error and bury it (a lost node's raylet
    dump is dozens of lines). `address="local"` for a local one: a bare init would follow a stale
    `ray_current_cluster` file left by a dead `ray start` head and wait a minute for it."""
    connected = not ray.is_initialized()
    if connected:
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address, logging_level="WARNING")
        else:
            ray.init(address="local", include_dashboard=False, logging_level="WARNING", num_cpus=local_cpus())
    try:
        yield
    finally:
        if connected:
            try:
                ray.shutdown()
            except Exception:  # the run's own error, if any, is the one to report
                logger.warning("leaving the Ray cluster failed", exc_info=True)


@contextmanager
def cluster(config: RunConfig) -> Iterator[None]:
    """Connected to the config's Ray cluster (`ray_connection`), its paths checked against the cluster."""
    with ray_connection(config.ray_address):
        refuse_node_local_paths(config)
        yield


def refuse_node_local_paths(config: RunConfig, nodes: int | None = None) -> None:
    """On a cluster of several nodes a local path names a different folder on each: the driver would list
    files the workers cannot read, actors would not find a model folder, and the table's chunks would
    scatter over the workers' own disks. Refused before any work unless `shared_filesystem` says the path
    is a mount they all share. `nodes`: the cluster's live nodes (default: asked of Ray); an autoscaling
    cluster that starts as one node and grows is not caught here."""
    nodes = sum(node["Alive"] for node in ray.nodes()) if nodes is None else nodes
    if nodes <= 1 or config.shared_filesystem:
        return
    local = [
        f"{name} {uri!r}"
        for name, uri in (("input", config.input), ("output", config.output))
        if resolve(uri).protocol == "file"
    ]
    model = resolve(config.model)
    if model.protocol == "file" and os.path.exists(model.path):
        local.append(f"model {config.model!r}")  # a hub id is not a path
    if local:
        raise ConfigError(
            f"{' and '.join(local)}: local paths, but the Ray cluster has {nodes} nodes, each with its own "
            "disk. Use object storage (s3://...), or set shared_filesystem: true (--shared-filesystem) if "
            "every node mounts these paths"
        )


@dataclass(frozen=True)
class CheckedModel:
    """What the driver's model check settles, in the driver alone, before any Ray work; `started_at`: the
    run's start, of which the check is the first step."""

    preprocessing: PreprocessConfig
    sha256: str
    pin: ModelPin  # which checkpoint it loaded: for a hub id, the commit its default branch pointed at
    num_features: int
    started_at: datetime


def check_model(config: RunConfig) -> CheckedModel:
    """Load the model once in the driver, so that a missing, corrupt or mis-shaped checkpoint fails before
    any work (ConfigError, ModelLoadError)."""
    started_at = datetime.now(UTC)
    model = load_model(
        config.model, device="cpu", storage_options=options_for(config.model, config.storage_options)
    )
    if not model.preprocessing.do_resize:
        raise ConfigError(
            f"{config.model}: its preprocessor does not resize; batched inference needs one size"
        )
    return CheckedModel(
        model.preprocessing, model.weights_sha256, model.pin, model.config.num_features, started_at
    )


def plan(config: RunConfig, run_id: str, model: CheckedModel, guard: StallGuard) -> Plan:
    """List the inputs (on the connected Ray) and settle the actors; raises ConfigError before any image
    is read. `guard`: the stall guard the plan is carried out under."""
    preprocessing = model.preprocessing
    resources = ray.cluster_resources()
    nodes = _live_nodes()
    actors = _actors(config, resources, nodes)
    _leave_cpus(actors, resources, ray.available_resources(), config.stall_timeout)
    undeclared = _undeclared(actors.resources, nodes)
    if undeclared:
        logger.warning(
            "actor_resources asks for %s, which no node of the cluster declares now: the actors wait for a "
            "node that does (an autoscaler's), and the run stops after stall_timeout (%.0f s) if none comes",
            ", ".join(undeclared),
            config.stall_timeout,
        )
    device_share = _device_share(config, actors, preprocessing, resources)
    if actors.device == "cuda":
        logger.info(
            "decode %s: %.0f%% of the JPEGs decoded on the GPUs, the rest on the CPUs (the cluster has %g "
            "CPUs, %g GPUs)",
            config.decode,
            100 * device_share,
            resources.get("CPU", 0),
            resources.get("GPU", 0),
        )
    t0 = time.monotonic()
    listing = read.list_objects(config.input, config.storage_options)
    kind, listing = read.choose_kind(config, listing)
    if kind == "parquet":
        read.check_table(listing.take(1)[0]["uri"], config)
    return Plan(
        config,
        run_id,
        f"{run_id}.{uuid.uuid4().hex[:8]}",
        kind,
        listing,
        preprocessing,
        model.sha256,
        model.pin,
        model.num_features,
        actors,
        device_share,
        model.started_at,
        round(time.monotonic() - t0, 3),
        guard,
    )


def execute(
    plan: Plan, output: Output, lease: Lease, listing: ray.data.Dataset | None = None, replace: bool = False
) -> tuple[RunSummary, Compacted]:
    """Process `listing` (default: the plan's) into `output`, whose lease this process holds, and compact
    and check its rows; `finish` then commits them. `replace`: see `Output.prepare`."""
    config = plan.config
    listing = (plan.listing if listing is None else listing).materialize()
    listed = listing.count()  # from its blocks' metadata: what it held when it was made
    owner = plan.owner(output)
    if output.iceberg is not None:
        output.iceberg.ensure(plan.num_features, partitioned=output.scope is not None)
    earlier = output.prepare(config.overwrite, owner, config.model_dump(mode="json"), replace)
    t0 = time.monotonic()
    # rows earlier attempts wrote for inputs that are no longer listed (deleted since, or taken by
    # another nightly date) are left out: the table holds one row per input listed now
    kept = resume(output, earlier, listing, plan.kind, config.uri_column is not None, owner)
    if plan.kind == "files":
        todo = unfinished(listing, kept.done)
        if todo.count():
            _execute(plan, todo, output, owner, None)
        expected = digest(listing, "uri")
        read.unchanged(expected.count, listed, "images", "nothing was committed")
    else:
        sources = listed
        if sources:
            _execute(plan, listing, output, owner, kept)
        expected, recorded = output.source_digest(plan.attempt)
        if recorded != sources:
            raise VerificationFailed(
                f"{recorded} of {sources} {plan.kind} sources were read to the end: nothing was "
                "committed; run the same command again"
            )
    compacted = output.compact(owner, lease, expected, config.rows_per_file)
    finished = time.monotonic()
    images = compacted.ok + compacted.errors
    summary = RunSummary(
        run_id=plan.run_id,
        input=config.input,
        input_format=plan.kind,
        output=output.uri,
        model=config.model,
        model_sha256=plan.model_sha256,
        model_revision=plan.model_pin.revision,
        checkpoint_sha256=plan.model_pin.sha256,
        device=plan.actors.device,
        decode="gpu" if plan.device_share else "cpu",
        device_decode_share=plan.device_share,
        images=images,
        resumed=kept.resumed,
        ok=compacted.ok,
        errors=compacted.errors,
        retryable_errors=compacted.retryable,
        errors_by_kind=compacted.errors_by_kind,
        files=len(compacted.files),
        started_at=plan.started_at,
        finished_at=datetime.now(UTC),
        listing_seconds=plan.listing_seconds,
        seconds=round(finished - t0 + plan.listing_seconds, 3),
        images_per_second=round((images - kept.resumed) / max(finished - t0, 1e-9), 2),
        config=config.redacted(),
    )
    return summary, compacted


def finish(
    output: Output,
    lease: Lease,
    summary: RunSummary,
    compacted: Compacted,
    max_error_rate: float | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the marker: `_SUCCESS`, or `_FAILURE` and ErrorRateExceeded above the error budget. The
    manifest is the summary, `extra`, and the committed files."""
    manifest = summary.model_dump(mode="json") | (extra or {}) | {"files": compacted.files}
    rate = summary.errors / max(summary.images, 1)
    if max_error_rate is not None and rate > max_error_rate:
        rows = output.uri if output.iceberg is None else output.iceberg.uri(output.data_path)
        reason = (
            f"{summary.errors} of {summary.images} rows are errors ({rate:.1%}), above max_error_rate "
            f"{max_error_rate:.1%}; the rows are in {rows}, this summary in {output.uri}/{FAILURE}"
        )
        output.publish(lease, FAILURE, manifest | {"failed": reason})
        raise ErrorRateExceeded(reason)
    output.publish(lease, SUCCESS, manifest)


def run(config: RunConfig | dict[str, Any]) -> RunSummary:
    """Run the pipeline once; raises ConfigError or ModelLoadError before any data is read, LeaseHeld
    when another run holds the output. Joins Ray as `ray_connection` says and leaves it at the end: call
    `ray.init` first to stay connected."""
    if not isinstance(config, RunConfig):
        config = RunConfig.model_validate(config)
    run_id = config.run_id or f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    output = Output(config.output, config.storage_options, IcebergTable.of(config))
    with cluster(config):
        # on the cluster, whose tasks read a resume's many footers; before the lease, since a folder of
        # someone's files gets none
        output.refuse_foreign()
        # the lease before any other work: a run refused for a live holder has listed nothing
        with output.lease(run_id, config.lease_timeout) as lease:
            with planned_under_guard(config, run_id) as planned:
                summary, compacted = execute(planned, output, lease)
            finish(output, lease, summary, compacted, config.max_error_rate)
    return summary


@contextmanager
def planned_under_guard(config: RunConfig, run_id: str) -> Iterator[Plan]:
    """The model checked in the driver, then the plan, made and carried out under the stall guard: the
    block holds the steps that wait on Ray; the model check before it and the marker after it do not."""
    model = check_model(config)
    with stall_guard(config.stall_timeout) as guard:
        yield plan(config, run_id, model, guard)


class StallGuard:
    """What the stall guard asks of the cluster's live nodes: a CPU for the listing, the selection, the
    stages, the compaction and a nightly ledger, and while the stages run a node with all that one
    inference actor asks for (`actor`: a GPU, custom resources)."""

    def __init__(self):
        self.actor: dict[str, float] = {}

    @contextmanager
    def inferring(self, asks: dict[str, float]) -> Iterator[None]:
        """An actor's node is needed during the block (the stages), not before or after it: an autoscaler
        lets idle GPU nodes go once inference ends, and a long compaction on the CPUs left is no stall."""
        self.actor = dict(asks)
        yield
        self.actor = {}  # not when the stages fail: a stall's message names what they lacked

    def missing(self, nodes: list[dict[str, float]]) -> list[str]:
        """What the live nodes (`nodes`: each one's resources) lack of what the work needs."""
        actor = self.actor  # once: the stages may end while the watcher asks
        lacking = [] if any(node.get("CPU", 0) > 0 for node in nodes) else ["CPU"]
        if actor and not any(_holds(node, actor) for node in nodes):
            lacking.append(" + ".join(f"{name} {amount:g}" for name, amount in sorted(actor.items())))
        return lacking

    def explain(self, nodes: list[dict[str, float]]) -> str:
        """The stall message's account of what is missing, naming what `actor_resources` asks for and no
        node declares (a misspelt name, where the nodes run)."""
        lacking = self.missing(nodes)
        if not lacking:
            return ""
        unknown = _undeclared(self.actor, nodes)
        hint = ""
        if unknown and "CPU" not in lacking:
            declared = _declared(nodes)
            named = [
                f"{name} (did you mean {close[0]}?)"
                if (close := get_close_matches(name, declared, 1))
                else name
                for name in unknown
            ]
            hint = f"; actor_resources asks for {', '.join(named)}, which no node declares"
        return f" (no live node has {', '.join(lacking)}{hint})"


def _holds(node: dict[str, float], wanted: dict[str, float]) -> bool:
    return all(node.get(name, 0) >= amount for name, amount in wanted.items())


def _undeclared(wanted: dict[str, float], nodes: list[dict[str, float]]) -> list[str]:
    """The custom resources of `wanted` that none of `nodes` declares: misspelt, or on nodes yet to come."""
    declared = _declared(nodes)
    return sorted(name for name in wanted if name not in BUILTIN_RESOURCES and name not in declared)


def _declared(nodes: list[dict[str, float]]) -> set[str]:
    return {name for node in nodes for name in node}


def _live_nodes() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


@contextmanager
def stall_guard(timeout: float) -> Iterator[StallGuard]:
    """Raises Stalled once the cluster's live nodes have lacked what the work needs (`StallGuard`) for
    `timeout` seconds, by interrupting the main thread: around the steps that wait on Ray (listing and
    selection tasks, the stages, compaction, a nightly ledger), from the listing to the marker. A cluster
    that autoscales from no workers counts its first nodes' provisioning too. Ray Data's own no-progress
    guard misses this case (tasks retried without end on nodes that are gone count as progress), and plain
    Ray tasks have none. Only the main thread can be interrupted; elsewhere Ray Data's guard on the
    written dataset is all there is."""
    guard = StallGuard()
    stalled, stop, deciding = threading.Event(), threading.Event(), threading.Lock()

    def watch() -> None:
        since = None
        while not stop.wait(1.0):
            since = (since or time.monotonic()) if guard.missing(_live_nodes()) else None
            if since is not None and time.monotonic() - since > timeout:
                with deciding:  # never once the guarded block has ended
                    if not stop.is_set():
                        stalled.set()
                        _thread.interrupt_main()
                return

    ignored = False
    if threading.current_thread() is threading.main_thread():
        # a driver started in the background by a shell script ignores SIGINT, and then interrupt_main
        # does nothing: the guard's own interrupt must still land, others stay ignored as asked
        ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        if ignored:
            signal.signal(signal.SIGINT, lambda *_: _raise_if(stalled))
        threading.Thread(target=watch, daemon=True).start()
    try:
        yield guard
    except (ExecutionTimeoutError, KeyboardInterrupt) as err:
        with deciding:
            stop.set()
        if isinstance(err, KeyboardInterrupt) and not stalled.is_set():
            raise
        raise Stalled(
            f"the run made no progress for {timeout:.0f} s (stall_timeout): the cluster cannot run its "
            f"work{_explained(guard)}: it lost every node that could, or an autoscaler has not brought one "
            "yet (raise stall_timeout where capacity comes slowly). Nothing was committed and the rows written "
            "so far are kept: run the same command again once the cluster has room"
        ) from err
    finally:
        with deciding:
            stop.set()
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _explained(guard: StallGuard) -> str:
    try:
        return guard.explain(_live_nodes())
    except Exception:  # a cluster whose head is gone cannot say; the message stands without it
        return ""


def _raise_if(stalled: threading.Event) -> None:
    if stalled.is_set():
        raise KeyboardInterrupt


def _execute(
    plan: Plan, listing: ray.data.Dataset, output: Output, owner: Ownership, kept: Resume | None
) -> None:
    """The Ray Data plan: read, decode, infer, write (pipeline.stages); `kept`: the containers' rows
    that earlier attempts finished."""
    config = plan.config
    records = output.ray_target(output.sources(plan.attempt))
    settings = ActorSettings.of(config, plan.run_id, plan.actors, plan.device_share > 0, plan.model_pin)
    done = kept.done if kept else None
    image_bytes = plan.preprocessing.height * plan.preprocessing.width * 3
    rows = read.dataset(plan.kind, listing, config, done, records, infer.call_batch(settings), image_bytes)
    decoded = decode.apply(rows, plan.preprocessing, config.max_pixels, plan.device_share)
    predicted = infer.apply(decoded, settings, plan.actors)
    folder, filesystem = output.ray_target(output.staging(plan.attempt))
    # Ray Data's own guard against an execution without progress, read from the written dataset's context
    predicted.context.execution_no_progress_timeout_s = config.stall_timeout
    with plan.guard.inferring(plan.actors.asks()), _failed_actor_starts():
        written = write.apply(
            predicted, folder, filesystem, owner, write.output_schema(plan.num_features), config.chunk_rows
        )
    output.wrote(written, owner)


@contextmanager
def _failed_actor_starts() -> Iterator[None]:
    """The inference actors' failure to start as the run's error: their refusal of another checkpoint
    (ModelChanged) as itself, any other error saying what to do. Ray hands the driver an ActorDiedError
    with the last actor's traceback as text, ending in its error's type and message."""
    marker = f"{ModelChanged.__module__}.{ModelChanged.__qualname__}: "
    try:
        yield
    except ray.exceptions.RayActorError as err:
        if not err.actor_init_failed:
            raise
        text = str(err)
        if marker in text:
            raise ModelChanged(text.rsplit(marker, 1)[1].strip()) from err
        raise ActorsFailedToStart(
            f"an inference actor failed to start and was not replaced (a run replaces up to "
            f"{infer.FAILED_STARTS} in a row): fix what its error below names and run the same command "
            f"again; the rows written so far are kept.\n{text}"
        ) from err
