"""The inference stage: an actor pool, the model loaded once per actor; batches of uint8 pixels (or JPEG
bytes to decode on the GPU) in, output rows out."""

from __future__ import annotations

import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray.data.context import AutoscalingConfig

from dinat_batch.pipeline.config import DEFAULT_MAX_PIXELS, RunConfig
from dinat_batch.pipeline.errors import error_column
from dinat_batch.pipeline.faults import actor_start, slow_call
from dinat_batch.pipeline.gpu_decoding import DECODE_BUDGET, DeviceDecoder, nvjpeg, probe, unsupported
from dinat_batch.pipeline.locations import options_for
from dinat_batch.pipeline.model import ModelPin, load_model
from dinat_batch.pipeline.model.runtime import (
    CPU_BATCH,
    DTYPES,
    LANE_BATCH,
    MAX_AUTO_BATCH,
    CompileMode,
    Outputs,
    Runner,
    hold_freed_memory,
    label_names,
    peak_growth,
    resident_bytes,
)
from dinat_batch.pipeline.stages import Stage
from dinat_batch.pipeline.stages.decode import STAGE as DECODED
from dinat_batch.pipeline.stages.decode import host_pixels
from dinat_batch.pipeline.stages.write import COLUMNS, Provenance, output_rows, output_schema

# no resources of its own: what each actor asks for besides a CPU (a GPU, custom resources) depends on the
# cluster and the run's config, which the plan settles (`Actors`)
STAGE = Stage("infer", consumes=DECODED.produces, produces=COLUMNS, may_consume=DECODED.may_produce)
# calls running at once per lane of an actor (`Actors.lanes`): while one runs the model, the next is
# batched and its pixels gathered (Ray Data's batching alone took 40 ms per 1024 images on this project's
# CPUs, a sixth of the model's time for them on an H200)
CALLS_PER_LANE = 2
# of the memory Ray declares on a CPU actor's node (what was free at its start less the object store's), the
# share its lanes' activations may take: the rest is for the read and decode tasks beside it and Ray's workers
LANE_MEMORY_SHARE = 0.5
# inference actors in a row whose constructor may raise before the run fails with the last one's error:
# Ray Data's default fails a run at the first (max_consecutive_actor_init_deaths 0), so one start's
# transient failure (the model's store, a device's first use) ended a long run. Ray puts the replacement
# where there is room, which may be the same node: a node that fails every start still fails the run. A
# start that succeeds resets the count, so a model that loads nowhere fails the run after FAILED_STARTS + 1
# loads. An actor whose process or node dies while it starts is restarted by Ray, outside this count.
FAILED_STARTS = 3
INIT_DEATHS_ENV = "RAY_DATA_MAX_CONSECUTIVE_ACTOR_INIT_DEATHS"  # Ray Data's setting of it
logger = logging.getLogger(__name__)


class ActorSettings(BaseModel):
    """Everything an inference actor needs, sent to each actor as one object."""

    model_config = ConfigDict(frozen=True)

    model: str
    # the checkpoint the run was planned with (the driver's model check): an actor that finds another at
    # `model` (replaced during the run) refuses to start, so that one run's rows come from one model; None:
    # whatever `model` holds
    model_pin: ModelPin | None = None
    run_id: str
    top_k: int
    device: str  # cpu or cuda
    dtype: str = "float32"
    batch_size: int | None = None
    compile: CompileMode = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    lanes: int = 1  # model calls at once, each on a device thread of its own (`Actors`)
    threads: int | None = None  # torch threads per lane; None: as the process has them
    jpegs_to_device: bool = False  # the decode stage sends JPEGs on as bytes
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)  # may hold keys

    @classmethod
    def of(
        cls,
        config: RunConfig,
        run_id: str,
        actors: Actors,
        jpegs_to_device: bool,
        model_pin: ModelPin,
    ) -> ActorSettings:
        """The actor's share of a run's config, with what the plan settled (run id, the actors' device and
        lanes, routing, the model's identity)."""
        shared = (cls.model_fields.keys() & RunConfig.model_fields.keys()) - {"run_id", "device"}
        return cls(
            **config.model_dump(include=shared),
            run_id=run_id,
            device=actors.device,
            lanes=actors.lanes,
            threads=actors.threads,
            jpegs_to_device=jpegs_to_device,
            model_pin=model_pin,
        )


@dataclass(frozen=True)
class Actors:
    """The inference actor pool a plan settles: the device its model runs on, what each actor asks of Ray
    besides a CPU (`num_gpus`, the config's custom `resources`), the pool's bounds (`max_size` None: no
    bound), and how each actor runs its model: `lanes` calls at once, each on a device thread of its own
    with `threads` torch threads (None: as the process has them). A GPU actor has one lane: torch keeps
    CUDA graphs per thread, and one thread feeds the GPU. A CPU actor runs a one-thread lane per core it
    uses: one call on two threads ran 0.81-0.93x as fast as two calls on one thread each (dinat-mini, 2
    cores, benchmarks/RESULTS.md), as a many-thread model waits at each parallel region for its slowest
    thread; a compiled one has one lane of many threads, as Dynamo compiles and guards per thread."""

    device: str
    num_gpus: int
    min_size: int
    max_size: int | None
    resources: dict[str, float]
    lanes: int = 1
    threads: int | None = None

    def asks(self) -> dict[str, float]:
        """What one actor asks of its node besides a CPU: what a node must have for the pool to grow."""
        return ({"GPU": float(self.num_gpus)} if self.num_gpus else {}) | self.resources


class Predictor:
    """Callable for `Dataset.map_batches(..., compute=ActorPoolStrategy(...))`.

    Rows whose `error` is set skip the model and come out as error rows; the others get top-k labels and
    scores and the pooled embedding. The model runs only on the valid rows, so one bad image costs nothing.
    Rows that arrive with bytes in `data` (see `pipeline/stages/decode.py`) are decoded on the model's device
    first; an image that fails there becomes an error row like any other.
    """

    def __init__(self, settings: ActorSettings):
        actor_start()
        options = options_for(settings.model, settings.storage_options)
        loaded = load_model(settings.model, settings.device, storage_options=options, pin=settings.model_pin)
        self.provenance = Provenance(loaded.source, loaded.weights_sha256, settings.run_id)
        self.num_features = loaded.config.num_features
        self.labels = label_names(loaded.config)
        # the GPU decoder's chunks share the device with the model: the batch is sized without them
        reserved = DECODE_BUDGET if settings.jpegs_to_device and settings.device == "cuda" else 0
        self.runner = Runner(
            loaded, DTYPES[settings.dtype], settings.compile, settings.batch_size, settings.top_k, reserved
        )
        self.schema = output_schema(self.num_features)
        self.decoder = None
        if settings.jpegs_to_device:
            device = self.runner.device
            reason = unsupported(loaded.preprocessing, device.type) or probe(device)
            if reason is not None:
                logger.warning(
                    "JPEGs sent for GPU decoding are decoded on this actor's CPU instead: %s", reason
                )
            jpeg = nvjpeg if reason is None else None
            self.decoder = DeviceDecoder(loaded.preprocessing, device, settings.max_pixels, jpeg=jpeg)
        # a GPU actor runs its one lane as planned: its first call compiles on the thread that makes it
        self.lanes, threads = settings.lanes, settings.threads
        if settings.device == "cpu":
            node = node_resources()
            self.lanes, threads = on_this_node(self.lanes, threads, node)
            batch = call_batch(settings)
            if self.lanes > 1 and self.lanes * batch > CPU_BATCH:
                self.lanes = self._lanes_in_memory(threads, batch, node)
            hold_freed_memory()  # after the measure, which would count memory held as none taken
        # all device work on the actor's own threads, one per lane: Ray Data calls from several threads, and
        # torch keeps compiled CUDA graphs per thread. torch.set_num_threads sets the calling thread's count
        # (and the default of threads started after it): each lane's thread sets its own, as Ray sets the
        # process's to its num_cpus, 1, where a CPU actor's lanes use every core of its node
        self._device = ThreadPoolExecutor(
            self.lanes, thread_name_prefix="device", initializer=_set_threads, initargs=(threads,)
        )

    def _lanes_in_memory(self, threads: int | None, batch: int, node: dict[str, float]) -> int:
        """As many of its lanes as hold their calls' activations, beside what the actor holds already, in
        LANE_MEMORY_SHARE of the memory Ray declares on its `node`, times the share of the node's CPUs the
        actor uses (so that actors sharing a node share it): one call of `batch` images, on a thread like
        a lane's, measured at actor start (one call's time: 3 s for dinat-mini at 224, 10 s for
        dinat-base on one core of a slow 2-core machine; 0.23 and 0.57 GB), so that a many-core node at
        the defaults, or a larger model, does not run out of memory. Only where the lanes take more
        images at once than a one-lane actor's default call (CPU_BATCH), which came before lanes."""
        memory, cpus = node.get("memory", 0), node.get("CPU", 0)
        if not memory or not cpus:
            return self.lanes
        pixels = np.zeros((batch, *self.runner.size, 3), dtype=np.uint8)
        with ThreadPoolExecutor(1, initializer=_set_threads, initargs=(threads,)) as probe:
            per_lane = probe.submit(peak_growth, lambda: self.runner(pixels)).result()
        held = resident_bytes()
        if per_lane is None or held is None:
            logger.info(
                "this process's memory is not measurable here: the actor keeps its %d lanes", self.lanes
            )
            return self.lanes
        share = LANE_MEMORY_SHARE * min(1.0, self.lanes * (threads or 1) / cpus)
        fit = lanes_in_memory(self.lanes, per_lane, memory * share - held)
        if fit < self.lanes:
            logger.warning(
                "a call of %d images took %.2f GiB here: %d of this actor's %d lanes fit in %.0f%% of the "
                "node's %.1f GiB of Ray memory beside the %.1f GiB it holds (set batch_size lower for more)",
                batch,
                per_lane / 2**30,
                fit,
                self.lanes,
                share * 100,
                memory / 2**30,
                held / 2**30,
            )
        return fit

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Called by Ray Data from a pool of threads, CALLS_PER_LANE calls per lane at a time: what this call
        does on the host, its pixels' upload to the device included, overlaps the device work of the calls
        before it, which run on the actor's device threads, one call per lane at a time."""
        slow_call()
        errors = error_column(batch["error"])
        n = len(errors)
        # Ray turns an all-null column into NaNs: bytes are what counts
        passed = [
            i for i, data in enumerate(batch.get("data", ())) if isinstance(data, bytes) and not errors[i]
        ]
        if passed and self.decoder is None:
            raise RuntimeError(
                "JPEG bytes reached an actor built without jpegs_to_device: the plan's decode stage and its "
                "actors disagree on where JPEGs are decoded"
            )
        from_host = np.array([e is None for e in errors], dtype=bool)
        from_host[passed] = False
        jpegs = None
        if passed:
            areas = batch["width"][passed].astype(np.int64) * batch["height"][passed]
            jpegs = [batch["data"][i] for i in passed], batch["orientation"][passed], areas
        on_host = None
        any_host = from_host.any()
        if any_host:
            on_host = self.runner.upload(host_pixels(batch["pixels"], from_host, self.runner.size))
        ok, late, outputs = from_host, [], None
        if any_host or passed:  # else nothing runs: no wait behind the other call's device work
            ok, late, outputs = self._device.submit(self._infer, from_host, on_host, passed, jpegs).result()
        for i, error in zip(passed, late, strict=True):
            errors[i] = error
        embeddings = np.zeros((n, self.num_features), dtype=np.float32)
        top = None
        if outputs is not None:
            embeddings[ok], ok_scores, ok_ids = outputs
            if ok_ids is not None:
                scores = np.zeros((n, ok_ids.shape[1]), dtype=np.float32)
                ids = np.zeros((n, ok_ids.shape[1]), dtype=np.int32)
                scores[ok], ids[ok] = ok_scores, ok_ids
                top = scores, ids, self.labels[ids]
        sizes = batch["width"], batch["height"]
        return output_rows(batch["key"], errors, sizes, embeddings, top, self.provenance, self.schema)

    @torch.inference_mode()  # tensors made here are what the compiled step was warmed up with
    def _infer(
        self,
        from_host: np.ndarray,
        on_host: torch.Tensor | np.ndarray | None,
        passed: list[int],
        jpegs: tuple[list[bytes], np.ndarray, np.ndarray] | None,
    ) -> tuple[np.ndarray, list[str | None], Outputs | None]:
        """On the device thread: decode the JPEGs passed on (`jpegs` for rows `passed`), run the model on
        every valid row, the `from_host` rows' pixels being `on_host` (uploaded to the device by the calling
        thread). Returns which rows ran, the decode errors of the passed rows, and the outputs of the rows
        that ran (None if none did)."""
        if isinstance(on_host, torch.Tensor) and on_host.is_cuda:
            # uploaded on the calling thread's stream: its memory is not reused while this one reads it
            on_host.record_stream(torch.cuda.current_stream(on_host.device))
        on_device, late = self.decoder(*jpegs) if jpegs else (None, [])
        ok = from_host.copy()
        ok[passed] = [error is None for error in late]
        if not ok.any():
            return ok, late, None
        if on_device is None:
            return ok, late, self.runner(on_host)
        gathered = torch.zeros(len(ok), *self.runner.size, 3, dtype=torch.uint8, device=self.runner.device)
        if on_host is not None:
            gathered[torch.from_numpy(from_host)] = torch.as_tensor(on_host, device=self.runner.device)
        gathered[passed] = on_device
        return ok, late, self.runner(gathered[torch.from_numpy(ok)])


def on_this_node(lanes: int, threads: int | None, node: dict[str, float]) -> tuple[int, int | None]:
    """`lanes` with `threads` torch threads each as planned (`Actors`), but on no more cores than Ray
    declares CPUs on the node this process runs on (`node`: its resources, none outside Ray), nor than the
    process may use (a container's CPU limit): the plan sizes them (`cpu_threads`, by default the largest
    node the actors may use) and the pool may start an actor on a smaller node, where lanes beyond its
    cores would take turns on them, each holding its call's activations, and threads beyond them wait for
    one another; and a local Ray declares at least two CPUs (`run.local_cpus`). The pool's calls beyond
    the lanes wait for one."""
    cores = lanes * (threads or 1)
    if cores == 1 or not node:
        return lanes, threads
    declared = node.get("CPU", 0)
    limit = process_cpus()
    usable = min(declared, limit) if declared else limit
    if usable >= cores:
        return lanes, threads
    fit = max(int(usable), 1)
    logger.warning(
        "this actor's node declares %g CPUs and its process may use %g, fewer than the %d cores its model was "
        "to use (cpu_threads, by default the CPUs of the largest node it may run on): it uses %d",
        declared,
        limit,
        cores,
        fit,
    )
    return (fit, threads) if lanes > 1 else (1, fit)


def process_cpus() -> int:
    """The cores this process may use: its CPU quota (a container's limit) and its affinity."""
    return min(
        ray._private.utils.get_num_cpus(override_docker_cpu_warning=True), len(os.sched_getaffinity(0))
    )


def node_resources() -> dict[str, float]:
    """What Ray declares on the node this process runs on; nothing outside Ray."""
    if not ray.is_initialized():
        return {}
    here = ray.get_runtime_context().get_node_id()
    return next((node["Resources"] for node in ray.nodes() if node["NodeID"] == here), {})


def lanes_in_memory(lanes: int, per_lane: int, budget: float) -> int:
    """As many of `lanes` as hold `per_lane` bytes each within `budget` bytes; at least one."""
    return max(1, min(lanes, int(budget // max(per_lane, 1))))


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def pool(min_size: int, max_size: int | None, lanes: int) -> ray.data.ActorPoolStrategy:
    """The actor pool, CALLS_PER_LANE calls per lane running at once in each actor (see
    `Predictor.__call__`)."""
    return ray.data.ActorPoolStrategy(
        min_size=min_size,
        max_size=max_size,
        max_concurrent_calls_per_actor=CALLS_PER_LANE * lanes,
        enable_true_multi_threading=True,  # the actor serialises its device work itself
    )


def autoscaling(config: AutoscalingConfig) -> AutoscalingConfig:
    """`config` shedding actors where Ray Data's default does with one call per lane: at half a call in
    flight per lane. Ray Data measures a pool's use as calls in flight per actor over the calls it may
    take (CALLS_PER_LANE per lane), so its default would count a lane running one of its two calls as half
    idle, and a pool starved by decoding would shed actors, to start them again (model load, compile) when
    the input catches up. The pool still grows at Ray Data's default use: once its actors' queues are
    nearly full."""
    default = AutoscalingConfig().actor_pool_util_downscaling_threshold
    return dataclasses.replace(config, actor_pool_util_downscaling_threshold=default / CALLS_PER_LANE)


def call_batch(settings: ActorSettings) -> int:
    """Images per actor call. On a GPU the actor sizes its model's slices itself (from free memory); a
    call brings it up to the most. A CPU actor of many lanes takes fewer per call: it holds a call's
    activations per lane."""
    if settings.batch_size:
        return settings.batch_size
    if settings.device == "cuda":
        return MAX_AUTO_BATCH
    return CPU_BATCH if settings.lanes == 1 else LANE_BATCH


def apply(dataset: ray.data.Dataset, settings: ActorSettings, actors: Actors) -> ray.data.Dataset:
    inferred = dataset.map_batches(
        Predictor,
        fn_constructor_kwargs={"settings": settings},
        compute=pool(actors.min_size, actors.max_size, actors.lanes),
        batch_size=call_batch(settings),
        batch_format="numpy",
        num_gpus=actors.num_gpus,
        resources=actors.resources,
        **STAGE.resources,
    )
    inferred.context.autoscaling_config = autoscaling(inferred.context.autoscaling_config)
    if INIT_DEATHS_ENV not in os.environ:  # a user's setting stands
        inferred.context.max_consecutive_actor_init_deaths = FAILED_STARTS
    return inferred
