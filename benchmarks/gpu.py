"""The GPU benchmark in one command (inside 10 minutes on one GPU): NA kernels per backend, model images/s
per variant, dtype and execution mode, JPEG decode rates, and the pipeline end to end with the GPU's
utilisation sampled during the run. Prints one report; `--record` appends it to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/gpu.py [--record]          # on a machine with a GPU
    .venv/bin/python benchmarks/gpu.py --device cpu --quick  # the same code paths, small, on a CPU

Random weights (speed does not depend on them). GPU decode is not built yet: its row says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if not __package__:
    # as a script, make the repository root importable (and keep benchmarks/kernels.py from shadowing
    # the `kernels` package)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from benchmarks import kernels as kernel_bench
from benchmarks.common import machine, record
from benchmarks.model import measure
from benchmarks.pipeline import bare_loop, photos, pipeline_run
from pipeline.model.export import random_model, save_checkpoint
from pipeline.preprocess import PreprocessConfig, decode, resized

# (variant, input size, dtype, mode); mode: eager, compiled (torch.compile), graphs (compiled with CUDA
# graphs: mode="reduce-overhead")
MODEL_ROWS = [
    ("dinat-mini-in1k-224", 224, torch.float32, "eager"),
    ("dinat-mini-in1k-224", 224, torch.bfloat16, "eager"),
    ("dinat-mini-in1k-224", 224, torch.bfloat16, "compiled"),
    ("dinat-mini-in1k-224", 224, torch.bfloat16, "graphs"),
    ("dinat-tiny-in1k-224", 224, torch.bfloat16, "eager"),
    ("dinat-tiny-in1k-224", 224, torch.bfloat16, "compiled"),
    ("dinat-base-in1k-224", 224, torch.float32, "eager"),
    ("dinat-base-in1k-224", 224, torch.bfloat16, "eager"),
    ("dinat-base-in1k-224", 224, torch.bfloat16, "compiled"),
    ("dinat-large-in22k-in1k-384", 384, torch.bfloat16, "eager"),
]
QUICK_ROWS = [("dinat-mini-in1k-224", 224, torch.float32, "eager")]


def model_table(device: torch.device, rows, batch: int, repeat: int) -> list[str]:
    lines = [
        f"#### models, batch {batch}",
        "",
        "| variant | size | dtype | mode | images/s | first call s |",
        "|---|---|---|---|---|---|",
    ]
    for variant, size, dtype, mode in rows:
        model = random_model(variant).to(device=device, dtype=dtype)
        if mode != "eager":
            model = torch.compile(model, mode="reduce-overhead" if mode == "graphs" else None)
        pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        first, rate = measure(model, pixels, repeat)
        lines.append(
            f"| {variant} | {size} | {str(dtype).removeprefix('torch.')} | {mode} | {rate:.0f} | {first:.1f} |"
        )
        print(lines[-1], flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines


def _decode_one(data: bytes) -> int:
    return resized(decode(data), PreprocessConfig()).shape[0]


def decode_table(data: list[bytes], workers: int) -> list[str]:
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode_one, data[:workers]))  # start the workers
        start = time.perf_counter()
        list(pool.map(_decode_one, data, chunksize=16))
        rate = len(data) / (time.perf_counter() - start)
    return [
        "#### decode and resize to 224 (500 x 375 JPEGs)",
        "",
        "| where | images/s |",
        "|---|---|",
        f"| CPU, {workers} processes (PIL) | {rate:.0f} |",
        "| GPU (nvJPEG) | not built yet |",
    ]


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


def pipeline_table(images: int, batch: int, dtype: str) -> list[str]:
    data = photos(images)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(random_model("dinat-mini-in1k-224"), Path(tmp) / "dinat-mini")
        bare = bare_loop(folder, data, batch, dtype)
        with GpuSampler() as sampler:
            whole, steady = pipeline_run(folder, data, batch, dtype)
    return [
        f"#### pipeline end to end, dinat-mini, {images} JPEGs 500x375, batch {batch}, {dtype}",
        "",
        "| measured | images/s | x bare model loop |",
        "|---|---|---|",
        f"| bare model loop on decoded tensors | {bare:.0f} | 1.00 |",
        f"| pipeline after listing | {steady:.0f} | {steady / bare:.2f} |",
        f"| pipeline, whole run() call | {whole:.0f} | {whole / bare:.2f} |",
        "",
        f"GPU utilisation during the pipeline run: {sampler.summary()}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one model row, small batches and image counts")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    quick = args.quick
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    lines = [f"### GPU benchmark, {machine(device)}", ""]
    lines += kernel_bench.run(
        device, getattr(torch, dtype), batch=2 if quick else 8, repeat=2 if quick else 5
    )
    lines.append("")
    lines += model_table(
        device, QUICK_ROWS if quick else MODEL_ROWS, batch=4 if quick else 256, repeat=2 if quick else 5
    )
    lines.append("")
    lines += decode_table(photos(64 if quick else 4096), workers=min(16, os.cpu_count() or 1))
    lines.append("")
    lines += pipeline_table(images=32 if quick else 10000, batch=4 if quick else 256, dtype=dtype)
    print("\n".join(lines))
    if args.record:
        record(lines)


if __name__ == "__main__":
    main()
