"""`Runner`: a loaded DiNAT run on its device as fast as that device allows, uint8 pixels in, outputs out.

On a GPU the weights stay float32 and bf16/fp16 autocast runs the matrix products (norms, softmax, pooling
and accumulation stay float32); convolutions see channels-last tensors; the whole step (normalisation,
model, softmax, top-k) is compiled for one fixed batch size, replayed as a CUDA graph in `graphs` mode,
with a short last slice padded to that size; host pixels go through pinned buffers and are copied on a
side stream while the previous slice computes; the batch size comes from free memory. On a CPU the model
runs in the asked dtype, eager unless compiling is asked for.

Compiling and recording happen on the first call, on the thread that calls: torch keeps CUDA graphs per
thread, and the inference actor is built on one thread and runs its model on another, its device thread
(graphs recorded at construction would be recorded again on the first call, into a second memory pool).

Every speed-up degrades instead of failing: a compile that fails falls back to eager with a warning;
out-of-memory halves the batch and keeps the smaller size, releasing the graphs and memory pools recorded
for the old size and compiling for the new one; a compile that keeps running out of memory gives way to
eager with a warning.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dinat_batch.pipeline.model.dinat import Dinat, DinatConfig
from dinat_batch.pipeline.model.preprocessing import PreprocessConfig

CompileMode = Literal["auto", "off", "on", "graphs"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# embeddings [n, D]; top-k scores and label ids [n, k], or None for a backbone-only model
Outputs = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]
CPU_BATCH = 32  # images per call on a CPU when none is asked for: beyond it throughput stays flat
# images per call for a one-thread lane of a CPU actor: one thread's throughput is flat from 4 up, and an
# actor holds a call's activations per lane (~40 MB an image for dinat-mini at 224)
LANE_BATCH = 8
MAX_AUTO_BATCH = 1024  # the most a GPU batch is sized to: launch overhead is long amortised by then
MEMORY_SHARE = 0.75  # of the free GPU memory that activations may take; the rest covers what the probe misses
_PROBE_BATCH = 8
MAX_COMPILE_FAILURES = 3  # compiles (or CUDA graph recordings) that ran out of memory before going eager
# The first torch whose compile of the whole step `auto` tries on a GPU: 2.11's fails there (measured),
# 2.13's compiles it on a CPU (the tests); 2.12, and 2.13 on a GPU, are not measured yet.
COMPILES_SINCE = (2, 13)
# glibc's mallopt parameters (malloc.h), and what `hold_freed_memory` sets them to
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# blocks this large or larger get pages of their own, smaller ones come from a heap: the first that glibc
# takes (older releases refuse more than 32 MB, half the size of a thread's heap)
_MAPPED_FROM = (1 << 30, 32 << 20)
_NEVER_TRIM = -1  # glibc reads it as the largest size: the free memory at a heap's top stays there
logger = logging.getLogger(__name__)


def batch_for_memory(free_bytes: int, per_image_bytes: float, cap: int = MAX_AUTO_BATCH) -> int:
    """The largest power of two up to `cap` whose activations fit in MEMORY_SHARE of the free memory;
    at least 1 (out-of-memory backoff has the last word)."""
    fits = min(int(free_bytes * MEMORY_SHARE / max(per_image_bytes, 1.0)), cap)
    batch = 1
    while batch * 2 <= fits:
        batch *= 2
    return batch


def hold_freed_memory() -> bool:
    """Make this process's allocator keep the memory it frees for its next allocations rather than hand
    it back to the OS. A CPU model call's activations are blocks of megabytes, which glibc's malloc maps
    afresh (above its mmap threshold, at most 32 MB) or trims off its heap once freed, so each call faults
    them in again page by page: 9-13% of a lane's CPU time in the kernel (dinat-mini, benchmarks/RESULTS.md),
    and 1.09x the pipeline's images/s with it kept. The process stays at its peak: the activations of the
    calls it runs at once. A lane's thread allocates from a heap of its own, which glibc makes 64 MB at
    most: a larger block is still mapped afresh (dinat-mini at 224, 8 images a call: ~20 MB at most; a
    compiled actor's one call of 32 has blocks of ~80 MB). Process-wide and for good; False where the C
    library is not glibc (nothing changed)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mapped_from = any(mallopt(_M_MMAP_THRESHOLD, size) for size in _MAPPED_FROM)
    return bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)) and mapped_from


def peak_growth(call: Callable[[], object]) -> int | None:
    """How far this process's resident memory rose above its size at the start while `call` ran, in
    bytes, read from Linux's high-water mark (reset first through /proc/self/clear_refs): what a call's
    activations take, blocks mapped on their own included. None where Linux does not tell (or ignored the
    reset, as some sandboxes do)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        start = _status_kb("VmRSS")
        # the reset sets the mark to the size now: a mark well above it is one the reset left standing
        if _status_kb("VmHWM") > start + 1024:
            return None
        call()
        return (_status_kb("VmHWM") - start) * 1024
    except OSError:
        return None


def resident_bytes() -> int | None:
    """This process's own resident memory (not the shared libraries' pages); None where Linux does not
    tell."""
    try:
        return _status_kb("RssAnon") * 1024
    except OSError:
        return None


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def resolve_compile(mode: CompileMode, device: torch.device) -> Literal["off", "on", "graphs"]:
    """`auto`: CUDA graphs on a GPU, where launch overhead dominates a small model; eager on a CPU, where
    compiling dinat-mini takes ~60 s and gains ~5%, and eager before torch 2.13, whose Inductor fails on
    this model after ~50 s of trying (torch 2.11 on an H200: benchmarks/RESULTS.md)."""
    if mode != "auto":
        return mode
    return "graphs" if device.type == "cuda" and _major_minor(torch.__version__) >= COMPILES_SINCE else "off"


def _major_minor(version: str) -> tuple[int, int]:
    """(2, 13) for 2.13.0, 2.13.0+cpu, 2.13.0a0+git1234 or 2.13.0rc1: pre-releases count as their release."""
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def label_names(config: DinatConfig) -> np.ndarray:
    """Label names indexed by label id (the id itself where the checkpoint names none)."""
    labels = config.id2label
    return np.asarray([labels.get(i, str(i)) for i in range(max(labels, default=-1) + 1)], dtype=object)


def _out_of_memory(err: BaseException | None) -> bool:
    while err is not None:
        if isinstance(err, torch.OutOfMemoryError):
            return True
        err = getattr(err, "inner_exception", None) or err.__cause__
    return False


def _concat(parts: list[Outputs]) -> Outputs:
    return tuple(None if part[0] is None else np.concatenate(part) for part in zip(*parts, strict=True))


Stats = tuple[torch.Tensor, torch.Tensor]


def stats(config: PreprocessConfig, device: torch.device | str) -> Stats:
    """The mean and std as [1, 3, 1, 1] float32 tensors on `device`: made once by whoever normalises
    many batches, since on a GPU each is a blocking host-to-device copy."""
    return tuple(
        torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        for values in (config.image_mean, config.image_std)
    )


def normalize(
    pixels: torch.Tensor,
    config: PreprocessConfig,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
    mean_std: Stats | None = None,
) -> torch.Tensor:
    """uint8 [batch, height, width, 3] -> [batch, 3, height, width] rescaled and normalised in float32 (on
    whatever device `pixels` is on), then cast to `dtype` and laid out in `memory_format`. `mean_std`:
    `stats(config, pixels.device)`, made once (default: made here)."""
    values = pixels.permute(0, 3, 1, 2).to(torch.float32)
    if config.do_rescale:
        values = values * config.rescale_factor
    if config.do_normalize:
        mean, std = mean_std or stats(config, values.device)
        values = (values - mean) / std
    return values.to(dtype).contiguous(memory_format=memory_format)


class Runner:
    """Callable: uint8 pixels [n, height, width, 3] (a numpy array on the host, or a tensor already on the
    model's device) -> Outputs as numpy arrays, in slices of `batch` images."""

    def __init__(
        self,
        model: Dinat,
        dtype: torch.dtype = torch.float32,
        compile: CompileMode = "auto",
        batch_size: int | None = None,
        top_k: int = 5,
        reserved_bytes: int = 0,
    ):
        """`reserved_bytes`: GPU memory that something else on the device will take (a decoder), left out
        of what the batch is sized to."""
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            model = model.float().to(memory_format=torch.channels_last)
            self.autocast = dtype if dtype != torch.float32 else None
            self.input_dtype = torch.float32  # autocast casts at each matrix product
        else:
            model = model.to(dtype)
            self.autocast = None
            self.input_dtype = dtype
        self.model = model
        self.top_k = top_k
        self.size = (model.preprocessing.height, model.preprocessing.width)
        self.mean_std = stats(model.preprocessing, self.device)
        self.reserved_bytes = reserved_bytes
        self.batch = batch_size or (self._batch_from_memory() if self.cuda else CPU_BATCH)
        self.mode = resolve_compile(compile, self.device)
        self._pinned: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event] = []
        self._turn = 0
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._upload_streams = threading.local()  # `upload`'s, one per calling thread
        self.step = self._step
        self.compiled_on: int | None = None  # the thread the step was compiled (and recorded) on
        self.compile_failures = 0
        self._traced = False

    def _step(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What runs (compiled or not) per slice: uint8 pixels on the device -> embeddings[, scores, ids]."""
        memory_format = torch.channels_last if self.cuda else torch.contiguous_format
        values = normalize(pixels, self.model.preprocessing, self.input_dtype, memory_format, self.mean_std)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.model(values)
        embeddings = out.embeddings.float()
        if out.logits is None:
            return (embeddings,)
        scores, ids = out.logits.float().softmax(-1).topk(min(self.top_k, out.logits.shape[-1]), dim=-1)
        return embeddings, scores, ids

    def _zeros(self, n: int) -> torch.Tensor:
        return torch.zeros(n, *self.size, 3, dtype=torch.uint8, device=self.device)

    @torch.inference_mode()
    def _batch_from_memory(self) -> int:
        """Measure one small eager batch's peak activation memory and size the batch to the free memory."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._step(self._zeros(_PROBE_BATCH))
        per_image = (torch.cuda.max_memory_allocated(self.device) - before) / _PROBE_BATCH
        free, _ = torch.cuda.mem_get_info(self.device)
        batch = batch_for_memory(max(free - self.reserved_bytes, 0), per_image)
        logger.info("batch %d: %.1f MiB per image, %.1f GiB free", batch, per_image / 2**20, free / 2**30)
        return batch

    def _compiled(self) -> bool:
        """Whether the step is compiled for this thread: once for `on`; per thread for `graphs`, whose CUDA
        graphs torch keeps per thread (a release then frees only the calling thread's: the inference actor
        calls its runner from its one device thread, so there is one)."""
        if self.compiled_on is None:
            return False
        return self.mode != "graphs" or self.compiled_on == threading.get_ident()

    def _ensure_compiled(self) -> None:
        """Compile (and record) for `batch` images on this thread; out of memory halves the batch and tries
        again, up to MAX_COMPILE_FAILURES times, then runs eager."""
        while self.mode != "off" and not self._compiled():
            self._release()
            try:
                self._compile()
                continue
            except torch.OutOfMemoryError:
                pass  # handled below, once the failed attempt's buffers have gone with its frame
            self.compile_failures += 1
            self._release()
            if self.compile_failures >= MAX_COMPILE_FAILURES or self.batch == 1:
                logger.warning(
                    "out of memory compiling the model (%s) %d times; running it eager at %d images per call",
                    self.mode,
                    self.compile_failures,
                    self.batch,
                )
                self.mode = "off"
                return
            self.batch //= 2
            logger.warning("out of memory compiling the model; trying %d images per call", self.batch)

    def _compile(self) -> None:
        """Compile the step for `batch` images and run it once; eager with a warning when that fails for any
        reason but memory."""
        step = torch.compile(
            self._step, mode="reduce-overhead" if self.mode == "graphs" else None, dynamic=False
        )
        self._traced = True  # from here on, also when it fails, there may be graphs and pools to release
        try:
            with torch.inference_mode():
                for _ in range(3 if self.mode == "graphs" else 1):  # CUDA graphs record on the third call
                    self._call(step, self._zeros(self.batch))
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            if _out_of_memory(err):  # the backend compiler wraps what ran out of memory in its own error
                raise torch.OutOfMemoryError(f"out of memory compiling the model: {err}") from None
            logger.warning("compiling the model (%s) failed; running it eager: %s", self.mode, err)
            logger.debug("the failed compile", exc_info=True)
            self._release()
            self.mode = "off"
            return
        self.step = step
        self.compiled_on = threading.get_ident()

    def _release(self) -> None:
        """Forget the compiled step, its CUDA graphs and their memory pools (torch's compile caches are
        per process: an actor holds one model)."""
        self.step = self._step
        self.compiled_on = None
        if not self._traced:
            return
        self._traced = False
        torch.compiler.reset()
        if self.cuda:
            torch.cuda.empty_cache()

    def _call(self, step, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.mode == "graphs":
            torch.compiler.cudagraph_mark_step_begin()  # the last call's outputs have been copied out
        return step(pixels)

    def __call__(self, pixels: np.ndarray | torch.Tensor) -> Outputs:
        if len(pixels) == 0:
            raise ValueError("no images to run: call the runner with at least one")
        while True:
            self._ensure_compiled()
            try:
                return self._run(pixels)
            except torch.OutOfMemoryError:
                pass  # handled below, once the failed slice's buffers have gone with its frame
            # a compiled step always runs `batch` images (the last slice padded), an eager one at most that
            size = self.batch if self.mode != "off" else min(self.batch, len(pixels))
            if size == 1:
                raise torch.OutOfMemoryError(f"out of memory running one image on {self.device}")
            self._release()  # graphs recorded for the old size would hold their pools
            if self.cuda:
                torch.cuda.empty_cache()
            self.batch = size // 2
            logger.warning("out of memory at %d images per call; continuing with %d", size, self.batch)

    @torch.inference_mode()
    def _run(self, pixels: np.ndarray | torch.Tensor) -> Outputs:
        """Slice by slice: launch slice i, then stage slice i+1 while the device computes; outputs are
        copied out before the next slice can overwrite a CUDA graph's output buffers."""
        n = len(pixels)
        parts = []
        staged = self._stage(pixels, 0)
        for start in range(0, n, self.batch):
            rows = min(self.batch, n - start)
            out = self._call(self.step, staged)
            if start + self.batch < n:
                staged = self._stage(pixels, start + self.batch)
            parts.append([t[:rows].to("cpu", non_blocking=True) for t in out])
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return _concat([self._numpy(out) for out in parts])

    @torch.inference_mode()
    def upload(self, pixels: np.ndarray) -> torch.Tensor | np.ndarray:
        """Host pixels as a tensor on the model's device, for a later call: on a GPU copied on a stream of
        the calling thread's own, which waits for the copy, so that a thread can upload the next batch while
        another runs the model on the last. The pixels stay as they are when the device has no room for
        them now: a call on them alone then copies them slice by slice, within the batch's out-of-memory
        backoff (one beside JPEGs decoded on the device copies them whole)."""
        if not self.cuda:
            return torch.from_numpy(pixels)
        stream = getattr(self._upload_streams, "stream", None)
        if stream is None:
            # kept for the thread: the caching allocator reuses a freed block only on its own stream
            stream = self._upload_streams.stream = torch.cuda.Stream(self.device)
        try:
            with torch.cuda.stream(stream):
                on_device = torch.from_numpy(pixels).to(self.device, non_blocking=True)
            stream.synchronize()
        except torch.OutOfMemoryError:
            return pixels
        return on_device

    @staticmethod
    def _numpy(out: list[torch.Tensor]) -> Outputs:
        if len(out) == 1:
            return out[0].numpy(), None, None
        embeddings, scores, ids = out
        return embeddings.numpy(), scores.numpy(), ids.numpy().astype(np.int32)

    def _stage(self, pixels: np.ndarray | torch.Tensor, start: int) -> torch.Tensor:
        """Slice `start` on the device, padded to `batch` images when compiled (one static shape)."""
        rows = min(self.batch, len(pixels) - start)
        size = self.batch if self.mode != "off" else rows
        if isinstance(pixels, torch.Tensor):
            part = pixels[start : start + rows]
            if self.mode != "off" and not part.is_inference():
                # an inference tensor, as the warm-up's: Dynamo guards on the kind and would compile again
                part = part.clone()
        elif not self.cuda:
            part = torch.from_numpy(pixels[start : start + rows])
        else:
            return self._copy_in(pixels[start : start + rows], size)
        if rows < size:
            part = torch.cat([part, self._zeros(size - rows)])
        return part

    def _copy_in(self, part: np.ndarray, size: int) -> torch.Tensor:
        """Host rows -> the device through one of two pinned buffers, copied on the side stream. Rows past
        `part` in the buffer are stale padding; their outputs are dropped."""
        if not self._pinned or len(self._pinned[0]) < size:
            self._pinned = [
                torch.empty(size, *self.size, 3, dtype=torch.uint8).pin_memory() for _ in range(2)
            ]
            self._copied = [torch.cuda.Event() for _ in range(2)]
        buffer, copied = self._pinned[self._turn], self._copied[self._turn]
        self._turn ^= 1
        copied.synchronize()  # the copy that last read this buffer has finished
        buffer[: len(part)].copy_(torch.from_numpy(part))
        with torch.cuda.stream(self.copy_stream):
            staged = buffer[:size].to(self.device, non_blocking=True)
            copied.record()
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.copy_stream)
        staged.record_stream(compute)
        return staged
