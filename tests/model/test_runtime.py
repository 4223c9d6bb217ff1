"""The model runner on a CPU: slicing and padding never change an output, compiling neither, a compile that
fails falls back to eager, and batch sizing from free memory. The CUDA-only parts (autocast, CUDA graphs,
pinned copies on a side stream) are measured by benchmarks/gpu.py."""

import logging
import mmap
import os
import platform
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from dinat_batch.pipeline.model import load_model
from dinat_batch.pipeline.model.export import random_model, save_checkpoint
from dinat_batch.pipeline.model.runtime import (
    CPU_BATCH,
    Runner,
    batch_for_memory,
    peak_growth,
    resident_bytes,
    resolve_compile,
)
from tests.data import TINY, TINY_INPUT

pytestmark = pytest.mark.standalone

PIXELS = np.random.default_rng(3).integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)


def reference(model, pixels: np.ndarray, top_k: int = 3):
    runner = Runner(model, compile="off", batch_size=len(pixels), top_k=top_k)
    return runner(pixels)


def assert_same(got, expected):
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5)
    if expected[1] is None:
        assert got[1] is None and got[2] is None
        return
    np.testing.assert_allclose(got[1], expected[1], atol=1e-5)
    np.testing.assert_array_equal(got[2], expected[2])


@pytest.fixture
def model(tiny_model):
    return load_model(str(tiny_model), device="cpu")


def test_slices_of_any_size_give_the_outputs_of_one_call(model):
    expected = reference(model, PIXELS)
    assert expected[0].shape == (7, TINY.num_features) and expected[2].shape == (7, 3)
    assert expected[2].dtype == np.int32
    for batch in (1, 3, 7, 64):
        assert_same(Runner(model, compile="off", batch_size=batch, top_k=3)(PIXELS), expected)
    assert_same(Runner(model, compile="off", batch_size=3, top_k=3)(torch.from_numpy(PIXELS)), expected)


def test_compiled_with_a_padded_last_slice_gives_the_same_outputs(model):
    expected = reference(model, PIXELS)
    runner = Runner(model, compile="on", batch_size=4, top_k=3)
    assert runner.mode == "on"
    assert_same(runner(PIXELS), expected)  # 4 + 3 padded to 4


def test_a_compile_that_fails_runs_eager_and_says_so(model, monkeypatch, caplog):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("inductor could not lower an op (simulated)")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    runner = Runner(model, compile="on", batch_size=4, top_k=3)
    with caplog.at_level(logging.WARNING):
        outputs = runner(PIXELS)
    assert runner.mode == "off" and "running it eager" in caplog.text
    assert_same(outputs, reference(model, PIXELS))


def test_backbone_only_models_give_embeddings_only(tmp_path):
    folder = save_checkpoint(random_model(TINY), tmp_path / "b", backbone_only=True, preprocessing=TINY_INPUT)
    embeddings, scores, ids = Runner(load_model(str(folder), device="cpu"), compile="off")(PIXELS)
    assert embeddings.shape == (7, TINY.num_features) and scores is None and ids is None


def test_on_a_cpu_the_dtype_is_the_weights_dtype(model):
    runner = Runner(model, dtype=torch.bfloat16, compile="auto")
    assert runner.mode == "off" and runner.batch == CPU_BATCH and runner.autocast is None
    assert next(runner.model.parameters()).dtype == torch.bfloat16
    embeddings, _, _ = runner(PIXELS)
    assert embeddings.dtype == np.float32


@pytest.mark.parametrize(
    ("version", "on_a_gpu"),
    [
        ("2.13.0+cpu", "graphs"),
        ("2.13.0a0+git1234", "graphs"),
        ("2.14.0.dev20261101", "graphs"),
        ("2.12.1", "off"),
        ("2.11.0+cu130", "off"),  # its Inductor fails on the model
        ("2.9.0", "off"),
    ],
)
def test_compile_auto_means_cuda_graphs_on_a_gpu_with_torch_2_13_or_later(monkeypatch, version, on_a_gpu):
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion(version))
    assert resolve_compile("auto", torch.device("cuda")) == on_a_gpu
    assert resolve_compile("auto", torch.device("cpu")) == "off"
    assert resolve_compile("graphs", torch.device("cuda")) == "graphs"  # asked for by name: tried
    assert resolve_compile("on", torch.device("cpu")) == "on"


@pytest.mark.parametrize(
    ("free_gib", "per_image_mib", "expected"),
    [
        (80, 20, 1024),  # dinat-mini on an empty H100: capped
        (80, 300, 128),  # 60 GiB usable / 300 MiB = 204 -> 128
        (10, 300, 16),  # 7.5 GiB / 300 MiB = 25 -> 16
        (0.1, 300, 1),  # nothing fits: one image, out-of-memory backoff decides
    ],
)
def test_batch_from_free_memory_is_a_power_of_two_that_fits(free_gib, per_image_mib, expected):
    assert batch_for_memory(int(free_gib * 2**30), per_image_mib * 2**20) == expected


def test_batch_from_free_memory_respects_a_cap():
    assert batch_for_memory(80 * 2**30, 2**20, cap=100) == 64


# how a 24 MB block is served, by the main thread or by another (the lanes' kind, with a heap of its own),
# and what stays of it once freed
HELD = """
import ctypes, sys, threading
from dinat_batch.pipeline.model.runtime import hold_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "held":
    assert hold_freed_memory()

def served():
    before = libc.mallinfo2()
    block = libc.malloc(24 << 20)
    mapped = libc.mallinfo2().hblks - before.hblks
    libc.free(block)
    print(mapped, (libc.mallinfo2().arena - before.arena) >> 20)

if sys.argv[2] == "main":
    served()
else:
    thread = threading.Thread(target=served)
    thread.start()
    thread.join()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="hold_freed_memory sets glibc's malloc")
@pytest.mark.parametrize("held", [True, False])
@pytest.mark.parametrize("thread", ["main", "another"])
def test_held_memory_serves_big_blocks_from_the_heap_and_keeps_them_once_freed(held, thread):
    """By default glibc maps a block this large on its own and unmaps it when freed, so the next one is
    faulted in again page by page (in a process of its own: glibc raises its threshold to the size of a
    mapped block freed); held, the block comes from the heap and stays there for the next."""
    setting = "held" if held else "default"
    command = [sys.executable, "-c", HELD, setting, thread]
    mapped, kept_mb = (int(n) for n in subprocess.check_output(command, text=True).split())
    assert (mapped, kept_mb >= 23) == ((0, True) if held else (1, False))


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK),
    reason="Linux tells a process its peak memory, if allowed",
)
def test_a_call_s_peak_memory_is_measured_from_its_start():
    def touch(size: int) -> None:  # pages of its own, whatever the allocator holds already
        with mmap.mmap(-1, size) as block:
            np.frombuffer(block, dtype=np.uint8)[:] = 1

    touch(80 << 20)  # a peak before the call does not count
    grew = peak_growth(lambda: touch(40 << 20))
    assert 38 << 20 <= grew < 60 << 20
    assert resident_bytes() > 0


def test_the_model_traces_as_one_graph(model):
    """No graph breaks: CUDA graphs then cover the whole forward instead of the pieces between breaks."""
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


class Compiles:
    """Stands in for torch.compile: Dynamo with a counting backend (no Inductor, so fast), optionally out of
    memory when a step of more than `fits` images runs on real pixels (`on_zeros`: also on the warm-up's
    zero pixels, i.e. while compiling)."""

    def __init__(self, fits: int | None = None, on_zeros: bool = False):
        self.counter = CompileCounter()
        self.fits, self.on_zeros, self.threads, self.resets = fits, on_zeros, [], 0
        self.compile = torch.compile

    def __call__(self, fn, mode=None, dynamic=None):
        self.threads.append(threading.get_ident())
        compiled = self.compile(fn, backend=self.counter, dynamic=dynamic)

        def step(pixels):
            real = bool(pixels.any())
            if self.fits is not None and len(pixels) > self.fits and (real or self.on_zeros):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return compiled(pixels)

        return step

    def reset(self):
        self.resets += 1
        torch._dynamo.reset()


@pytest.fixture
def compiles(monkeypatch):
    def make(**kwargs) -> Compiles:
        stand_in = Compiles(**kwargs)
        monkeypatch.setattr(torch, "compile", stand_in)
        monkeypatch.setattr(torch.compiler, "reset", stand_in.reset)
        torch._dynamo.reset()
        return stand_in

    return make


def test_compiled_once_on_the_thread_that_calls(model, compiles):
    """Ray Data builds an actor on one thread and calls it on another: the step is compiled (and its CUDA
    graphs recorded) on the calling thread, once."""
    stand_in = compiles()
    runner = Runner(model, compile="on", batch_size=4, top_k=3)
    assert stand_in.threads == []  # nothing compiled while constructing
    with ThreadPoolExecutor(1) as pool:
        caller = pool.submit(threading.get_ident).result()
        first, second = pool.submit(runner, PIXELS).result(), pool.submit(runner, PIXELS).result()
    assert stand_in.threads == [caller] and runner.compiled_on == caller
    assert stand_in.counter.frame_count == 1
    with torch.inference_mode(False):  # a plain tensor, full slices: Dynamo guards on the tensor's kind
        runner(torch.from_numpy(PIXELS[:4].copy()))
    assert stand_in.counter.frame_count == 1
    assert_same(first, reference(model, PIXELS)) and assert_same(second, first)


def test_cuda_graphs_are_recorded_again_on_another_thread_only(model, compiles):
    stand_in = compiles()
    runner = Runner(model, compile="graphs", batch_size=4, top_k=3)
    runner(PIXELS)
    runner(PIXELS)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(runner, PIXELS).result()
    assert len(stand_in.threads) == 2 and stand_in.threads[0] != stand_in.threads[1]


def test_out_of_memory_while_recording_halves_and_tries_again(model, compiles):
    stand_in = compiles(fits=2, on_zeros=True)
    runner = Runner(model, compile="graphs", batch_size=8, top_k=3)
    assert_same(runner(PIXELS), reference(model, PIXELS))
    assert (runner.mode, runner.batch, runner.compile_failures) == ("graphs", 2, 2)
    assert len(stand_in.threads) == 3 and stand_in.resets >= 2  # 8 and 4 failed, each released


def test_out_of_memory_while_running_releases_the_graphs_and_records_smaller(model, compiles, caplog):
    stand_in = compiles(fits=2)
    runner = Runner(model, compile="graphs", batch_size=4, top_k=3)
    with caplog.at_level(logging.WARNING):
        outputs = runner(PIXELS)
    assert_same(outputs, reference(model, PIXELS))
    assert (runner.mode, runner.batch) == ("graphs", 2) and "continuing with 2" in caplog.text
    assert len(stand_in.threads) == 2 and stand_in.resets >= 1


def test_a_compile_that_keeps_running_out_of_memory_gives_way_to_eager(model, compiles, caplog):
    compiles(fits=0, on_zeros=True)
    runner = Runner(model, compile="graphs", batch_size=16, top_k=3)
    with caplog.at_level(logging.WARNING):
        outputs = runner(PIXELS)
    assert runner.mode == "off" and runner.compile_failures == 3 and "running it eager" in caplog.text
    assert runner.batch == 4
    assert_same(outputs, reference(model, PIXELS))


class CompilingActor:
    """A Ray Data actor holding a compiling Runner, reporting the threads it was built, called and compiled
    on, and how many compilations ran."""

    def __init__(self, folder: str):
        self.compiles = Compiles()
        torch.compile = self.compiles  # this actor's own process
        self.runner = Runner(load_model(folder, device="cpu"), compile="on", batch_size=4, top_k=3)
        self.built_on = threading.get_ident()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runner(batch["pixels"])
        n = len(batch["pixels"])
        facts = (
            self.built_on,
            threading.get_ident(),
            self.runner.compiled_on,
            self.compiles.counter.frame_count,
        )
        return {
            name: np.full(n, value)
            for name, value in zip(("built", "called", "compiled", "count"), facts, strict=True)
        }


def test_a_ray_data_actor_compiles_once_on_its_calling_thread(tiny_model, ray_session):
    import ray

    rows = (
        ray.data.from_items([{"pixels": p} for p in PIXELS])
        .map_batches(
            CompilingActor,
            fn_constructor_kwargs={"folder": str(tiny_model)},
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=4,
            batch_format="numpy",
        )
        .take_all()
    )
    assert len(rows) == len(PIXELS)
    assert all(row["compiled"] == row["called"] for row in rows)
    assert {row["count"] for row in rows} == {1}  # two batches, one compilation
