"""The GPU benchmark in one command (inside 10 minutes on one GPU): NA kernels per backend, model images/s
per variant, dtype and execution mode, bf16-vs-fp32 agreement, JPEG decode rates on CPU workers and on the
GPU, and the pipeline end to end with the GPU's utilisation sampled during the run. Prints one report;
`--record` adds it to its section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/gpu.py [--record]          # on a machine with a GPU
    .venv/bin/python benchmarks/gpu.py --device cpu --quick  # the same code paths, small, on a CPU

Random weights (speed does not depend on them) and generated photos; `--only` runs some sections.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from unittest import mock

if not __package__:
    # as a script, make the repository root importable (and keep benchmarks/kernels.py from shadowing
    # the `kernels` package)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from benchmarks import kernels as kernel_bench
from benchmarks.common import machine, record
from benchmarks.pipeline import bare_loop, photos, pipeline_runs
from dinat_batch.pipeline.config import DEFAULT_MAX_PIXELS
from dinat_batch.pipeline.gpu_decoding import DeviceDecoder, probe, unsupported
from dinat_batch.pipeline.images import decode, device_decodable, resized
from dinat_batch.pipeline.model import runtime
from dinat_batch.pipeline.model.export import random_model, save_checkpoint
from dinat_batch.pipeline.model.preprocessing import PreprocessConfig
from dinat_batch.pipeline.model.runtime import Runner, resolve_compile
from dinat_batch.pipeline.stages import infer

SECTIONS = ("kernels", "models", "accuracy", "decode", "pipeline")
# (variant, input size, dtype, mode); modes as the `compile` config field: off (eager), on (torch.compile),
# graphs (compiled and replayed as CUDA graphs). On a GPU, bf16 is autocast over float32 weights.
MODEL_ROWS = [  # eager rows first: a time limit that cuts the table keeps them
    ("dinat-mini-in1k-224", 224, torch.float32, "off"),
    ("dinat-mini-in1k-224", 224, torch.bfloat16, "off"),
    ("dinat-tiny-in1k-224", 224, torch.bfloat16, "off"),
    ("dinat-base-in1k-224", 224, torch.float32, "off"),
    ("dinat-base-in1k-224", 224, torch.bfloat16, "off"),
    ("dinat-large-in22k-in1k-384", 384, torch.bfloat16, "off"),
    ("dinat-mini-in1k-224", 224, torch.bfloat16, "graphs"),
    ("dinat-mini-in1k-224", 224, torch.bfloat16, "on"),
    ("dinat-base-in1k-224", 224, torch.bfloat16, "graphs"),
    ("dinat-tiny-in1k-224", 224, torch.bfloat16, "graphs"),
    ("dinat-large-in22k-in1k-384", 384, torch.bfloat16, "graphs"),
]
QUICK_ROWS = [("dinat-mini-in1k-224", 224, torch.float32, "off")]


def _model(variant: str, size: int, device: torch.device):
    model = random_model(variant).to(device)
    model.preprocessing = PreprocessConfig(size=size)
    return model


def model_table(device: torch.device, rows, batch: int, repeat: int) -> list[str]:
    """Images/s of the runtime on uint8 pixels already on the device (normalisation included)."""
    lines = [
        f"#### models, batch {batch}, uint8 pixels on the device",
        "",
        "| variant | size | dtype | mode | images/s | setup s (load, compile, warm-up) |",
        "|---|---|---|---|---|---|",
    ]
    for variant, size, dtype, mode in rows:
        start = time.perf_counter()
        runner = Runner(_model(variant, size, device), dtype, compile=mode, batch_size=batch)
        pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
        runner(pixels)
        setup = time.perf_counter() - start
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            runner(pixels)
            samples.append(time.perf_counter() - start)
        rate = batch / statistics.median(samples)
        name = str(dtype).removeprefix("torch.")
        fell_back = " (fell back to eager)" if runner.mode != mode else ""
        lines.append(f"| {variant} | {size} | {name} | {mode}{fell_back} | {rate:.0f} | {setup:.1f} |")
        print(lines[-1], flush=True)
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def accuracy_table(device: torch.device, images: int, compiling: bool) -> list[str]:
    """bf16 runtimes against float32 eager on the same pixels: top-1 agreement and embedding cosine."""
    model = _model("dinat-mini-in1k-224", 224, device)
    config = model.preprocessing
    pixels = np.stack([resized(decode(d), config) for d in photos(images)])
    reference = Runner(model, torch.float32, compile="off", batch_size=64)(pixels)
    lines = [
        f"#### bf16 against float32 eager, dinat-mini, {images} generated photos, random weights",
        "",
        "| runtime | top-1 identical | embedding cosine: min | mean |",
        "|---|---|---|---|",
    ]
    compiled = ("graphs" if device.type == "cuda" else "on",) if compiling else ()
    for mode in ("off", *compiled):
        # a fresh copy of the same weights (random_model is seeded): a Runner casts its model in place
        model = _model("dinat-mini-in1k-224", 224, device)
        embeddings, _, ids = Runner(model, torch.bfloat16, mode, 64)(pixels)
        same = float(np.mean(ids[:, 0] == reference[2][:, 0]))
        a, b = embeddings, reference[0]
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        lines.append(f"| bfloat16 {mode} | {same:.1%} | {cosine.min():.5f} | {cosine.mean():.5f} |")
        print(lines[-1], flush=True)
    lines += [
        "",
        "Random weights give near-uniform logits, so top-1 flips here more easily than with trained ones.",
    ]
    return lines


def _decode_one(data: bytes) -> int:
    return resized(decode(data), PreprocessConfig()).shape[0]


def _header_one(data: bytes) -> int:
    return device_decodable(data, DEFAULT_MAX_PIXELS).width


def _processes(fn, data: list[bytes], workers: int) -> float:
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(fn, data[:workers]))  # start the workers
        start = time.perf_counter()
        list(pool.map(fn, data, chunksize=16))
        return len(data) / (time.perf_counter() - start)


def decode_table(device: torch.device, data: list[bytes], workers: int) -> list[str]:
    lines = [
        "#### decode and resize to 224 (500 x 375 JPEGs)",
        "",
        "| where | images/s | max difference from the CPU path (of 255) |",
        "|---|---|---|",
        f"| CPU, {workers} processes (PIL) | {_processes(_decode_one, data, workers):.0f} | 0 |",
        f"| CPU, {workers} processes, header only (what the GPU route costs there) | "
        f"{_processes(_header_one, data, workers):.0f} | - |",
    ]
    reason = unsupported(PreprocessConfig(), device.type) or probe(device)
    if reason is not None:
        return [*lines, f"| GPU (nvJPEG) | not run: {reason} | - |"]
    decoder = DeviceDecoder(PreprocessConfig(), device, DEFAULT_MAX_PIXELS)
    batch = 256
    decoder(data[:batch], [1] * batch)  # warm-up: nvJPEG's handles and buffers
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(data), batch):
        pixels, errors = decoder(data[i : i + batch], [1] * len(data[i : i + batch]))
    torch.cuda.synchronize()
    rate = len(data) / (time.perf_counter() - start)
    cpu = np.stack([resized(decode(d), PreprocessConfig()) for d in data[-len(pixels) :]])
    worst = int(np.abs(pixels.cpu().numpy().astype(int) - cpu.astype(int)).max())
    refused = f", {decoder.fallbacks} refused (CPU fallback)" if decoder.fallbacks else ""
    lines.append(f"| GPU (nvJPEG + torch resize), batches of {batch}{refused} | {rate:.0f} | {worst} |")
    assert errors == [None] * len(errors), errors
    return lines


class GpuSampler:
    """nvidia-smi's utilisation every 200 ms while the block runs; mean and the share of busy samples."""

    def __init__(self):
        self.samples: list[float] = []
        self._process = None
        self._reader = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE,
                text=True,
            )
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line.strip().split()[0]))

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()

    def summary(self) -> str:
        if not self.samples:
            return "not sampled (no nvidia-smi)"
        busy = sum(s >= 50 for s in self.samples) / len(self.samples)
        return (
            f"mean {statistics.mean(self.samples):.0f}%, >= 50% in {busy:.0%} of {len(self.samples)} samples"
        )


@contextlib.contextmanager
def both(sampler: GpuSampler, setting: Callable):
    with sampler, setting():
        yield


MINI, BASE = "dinat-mini-in1k-224", "dinat-base-in1k-224"


# each pipeline run a name: (what, model variant, config, setting); as shipped, and what each change was
# measured against
PIPELINE_RUNS = {
    "cpu": ("decode on CPU", MINI, {"decode": "cpu"}, contextlib.nullcontext),
    "cpu-one-call": (
        "decode on CPU, one actor call at a time",
        MINI,
        {"decode": "cpu"},
        lambda: mock.patch.object(infer, "CALLS_PER_LANE", 1),
    ),
    "gpu": ("decode on the GPU", MINI, {"decode": "gpu"}, contextlib.nullcontext),
    "share": ("as shipped (decode: auto)", MINI, {"decode": "auto"}, contextlib.nullcontext),
    "base": ("decode on CPU", BASE, {"decode": "cpu"}, contextlib.nullcontext),
    "base-share": ("as shipped (decode: auto)", BASE, {"decode": "auto"}, contextlib.nullcontext),
} | {
    f"share-{share}": (
        f"{share:.0%} decoded on the GPU",
        MINI,
        {"device_decode_share": share},
        contextlib.nullcontext,
    )
    for share in (0.1, 0.15, 0.25, 0.4, 0.5)
}
# the first run of a Ray also starts its workers (0.36-0.66 of the bare rate in the third lease): the
# first run warms it up and is not compared
DEFAULT_RUNS = {"cuda": "cpu,cpu,share,gpu,base,base-share", "cpu": "cpu"}


def pipeline_table(
    device: torch.device, images: int, batch: int | None, dtype: str, store: str, compile: str, runs: str
) -> list[str]:
    data = photos(images)
    lines = [
        f"#### pipeline end to end, {images} JPEGs 500x375 from {store}, batch {batch or 'auto'}, {dtype}, "
        f"compile {compile}, {len(os.sched_getaffinity(0))} CPU cores",
        "",
        "| model | measured | images/s while the actors ran | x bare | after listing | whole call | GPU utilisation |",
        "|---|---|---|---|---|---|---|",
    ]
    variants = [PIPELINE_RUNS[name] for name in (runs or DEFAULT_RUNS[device.type]).split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folders, bare = {}, {}
        for variant in dict.fromkeys(v[1] for v in variants):
            folders[variant] = save_checkpoint(random_model(variant), Path(tmp) / variant)
            bare[variant] = bare_loop(
                folders[variant], data, batch or 256, dtype, device.type, compile=compile
            )
            lines.append(
                f"| {variant} | bare runtime on host pixels decoded beforehand | {bare[variant]:.0f} | 1.00 | - | - | - |"
            )
            print(lines[-1], flush=True)
        samplers = [GpuSampler() for _ in variants]
        runs = pipeline_runs(
            folders[variants[0][1]],
            data,
            [
                (
                    {"batch_size": batch, "dtype": dtype, "compile": compile, "model": str(folders[variant])}
                    | config,
                    partial(both, sampler, setting),
                )
                for (_, variant, config, setting), sampler in zip(variants, samplers, strict=True)
            ],
            store,
        )
        stages = []
        for (what, variant, _, _), sampler, run in zip(variants, samplers, runs, strict=True):
            ratio = run.actors / bare[variant]
            lines.append(
                f"| {variant} | {what} (decoded on {run.decode}) | {run.actors:.0f} | {ratio:.2f} | "
                f"{run.after_listing:.0f} | {run.whole:.0f} | {sampler.summary()} |"
            )
            stages.append(f"- {variant}, {what}: {run.stages or 'no executor log found'}")
            print(lines[-1], stages[-1], sep="\n", flush=True)
    return [*lines, "", "Ray Data's executor log during each run (samples every 0.5 s):", "", *stages]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one model row, small batches and image counts")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated of {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--store", default="s3" if shutil.which("weed") else "local", help="pipeline input: s3 or local"
    )
    parser.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "off", "on", "graphs"],
        help="the pipeline's compile mode",
    )
    parser.add_argument(
        "--try-compile",
        action="store_true",
        help="also the compiled model and accuracy rows where `compile: auto` stays eager (CPUs, torch < 2.13)",
    )
    parser.add_argument(
        "--pipeline-runs",
        help=f"comma-separated, in order, of {', '.join(PIPELINE_RUNS)} (default: {DEFAULT_RUNS['cuda']} on a "
        "GPU)",
    )
    parser.add_argument(
        "--cores",
        type=int,
        help="run on this many of the machine's cores (this process, Ray and its workers), as a node with "
        "fewer CPUs per GPU would",
    )
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if args.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])  # Ray's processes inherit it
    warnings.filterwarnings("ignore")
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger(runtime.__name__).setLevel(logging.DEBUG)  # a compile that fails shows where
    device = torch.device(args.device)
    quick, only = args.quick, set(args.only.split(","))
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    lines = [f"### GPU benchmark, {machine(device)}", ""]
    # a compile that fails takes ~50 s per row before the runtime goes eager (torch 2.11 on a GPU)
    compiling = args.try_compile or resolve_compile("auto", device) != "off"
    if not compiling:
        lines += ["Compiled rows left out: `compile: auto` stays eager here (`--try-compile` runs them).", ""]
    if "kernels" in only:
        batch, repeat = (2, 2) if quick else (8, 5)
        lines += [*kernel_bench.run(device, getattr(torch, dtype), batch=batch, repeat=repeat), ""]
    if "models" in only:
        rows, batch, repeat = (QUICK_ROWS, 4, 2) if quick else (MODEL_ROWS, 256, 5)
        rows = [row for row in rows if compiling or row[-1] == "off"]
        lines += [*model_table(device, rows, batch=batch, repeat=repeat), ""]
    if "accuracy" in only:
        lines += [*accuracy_table(device, images=16 if quick else 1024, compiling=compiling), ""]
    if "decode" in only:
        lines += [
            *decode_table(device, photos(64 if quick else 4096), workers=min(16, os.cpu_count() or 1)),
            "",
        ]
    if "pipeline" in only:
        images, batch = (32, 4) if quick else (20000, None)
        lines += pipeline_table(device, images, batch, dtype, args.store, args.compile, args.pipeline_runs)
    print("\n".join(lines))
    if args.record:
        record(lines, "GPU")


if __name__ == "__main__":
    main()
