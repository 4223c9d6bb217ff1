"""dinat-mini images per second at 224, side by side: kernel backends, eager and compiled, fp32 and bf16.

    .venv/bin/python benchmarks/model.py [--device cpu|cuda] [--batch 8] [--repeat 3] [--record]

Random weights (speed does not depend on them). Each row: one forward of a batch, median of --repeat
after a warm-up call (which compiles where compiling is asked for; compile time is printed separately).
`--record` adds the table to its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

if not __package__:
    # as a script, make the repository root importable for `benchmarks.common`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from benchmarks.common import machine, record
from dinat_batch.pipeline.model.export import random_model


def measure(model, pixels: torch.Tensor, repeat: int) -> tuple[float, float]:
    """(seconds of the first call, images per second afterwards)."""

    def call():
        with torch.inference_mode():
            model(pixels)
        if pixels.device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return first, pixels.shape[0] / statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    # (label, backend, dtype, compiled)
    rows = [
        ("auto", "auto", torch.float32, False),
        ("tiled everywhere", "tiled", torch.float32, False),
        ("reference everywhere", "reference", torch.float32, False),
        ("flex everywhere", "flex", torch.float32, False),
        ("auto, bf16", "auto", torch.bfloat16, False),
        ("auto, torch.compile", "auto", torch.float32, True),
    ]
    if device.type == "cuda":
        rows += [
            ("auto, bf16, torch.compile", "auto", torch.bfloat16, True),
            ("auto, fp16", "auto", torch.float16, False),
        ]
    lines = [
        f"### dinat-mini at 224, batch {args.batch}, {machine(device)}",
        "",
        "| configuration | images/s | x auto fp32 eager | first call s |",
        "|---|---|---|---|",
    ]
    base = None
    for label, backend, dtype, compiled in rows:
        model = random_model("dinat-mini-in1k-224").to(device=device, dtype=dtype)
        model.set_na_backend(backend)
        if compiled:
            model.compile()
        pixels = torch.randn(args.batch, 3, 224, 224, device=device, dtype=dtype)
        repeat = 1 if backend == "reference" else args.repeat
        first, rate = measure(model, pixels, repeat)
        base = base or rate
        lines.append(f"| {label} | {rate:.1f} | {rate / base:.2f} | {first:.1f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.record:
        record(lines, "Model")


if __name__ == "__main__":
    main()
