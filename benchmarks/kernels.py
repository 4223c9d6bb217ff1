"""NA kernels on DiNAT-mini's attention shapes at 224 (batch 8): every backend, side by side, in one run.

    .venv/bin/python benchmarks/kernels.py [--device cpu|cuda] [--batch 8] [--repeat 5] [--record]

Prints one table: milliseconds per call (median), the ratio to natten's own path on the same device
without RPB (natten >= 0.20 has no RPB; on CPU that is its uncompiled flex-fna), and the fraction of the
arithmetic floor reached. The floor is the minimal NA arithmetic, 4 * B * H * W * heads * K^2 * head_dim
FLOPs (QK^T and AV, a multiply and an add each), at the matmul rate measured in the same run.
`--record` adds the table to its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings
from pathlib import Path

if not __package__:
    # Run as a script, this file's folder comes first on sys.path and its name shadows the `kernels`
    # package; the repository root goes there instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from benchmarks.common import machine, record
from dinat_batch.kernels import available_backends, na2d

# (map size, kernel, dilation, heads) of every attention layer kind in dinat-mini at 224
DINAT_MINI_224 = [
    (56, 7, 1, 2),
    (56, 7, 8, 2),
    (28, 7, 1, 4),
    (28, 7, 4, 4),
    (14, 7, 1, 8),
    (14, 7, 2, 8),
    (7, 7, 1, 16),
]
HEAD_DIM = 32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up: compiles flex, fills the plan caches
    _sync(device)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def matmul_gflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = time_ms(lambda: a @ b, device, 5)
    return 2 * n**3 / ms / 1e6


def run(device: torch.device, dtype: torch.dtype, batch: int, repeat: int) -> list[str]:
    peak = matmul_gflops(device, dtype)
    lines = [
        f"### NA kernels, dinat-mini shapes at 224, batch {batch}, {dtype}, {machine(device)}",
        "",
        f"Measured matmul rate: {peak:.0f} GFLOP/s. ms per call (median of {repeat}); x = speed-up over natten"
        " without RPB; floor = share of the arithmetic floor reached.",
        "",
        "| map | k | d | heads | backend | rpb | ms | x natten | floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def row(text: str) -> None:
        lines.append(text)
        print(text, flush=True)  # as measured: a run cut short by a time limit keeps its rows

    gen = torch.Generator(device=device).manual_seed(0)
    for size, kernel, dilation, heads in DINAT_MINI_224:
        q, k, v = (
            torch.randn(batch, size, size, heads, HEAD_DIM, device=device, generator=gen).to(dtype)
            for _ in range(3)
        )
        rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, device=device, generator=gen).to(dtype)
        floor_ms = 4 * batch * size * size * heads * kernel**2 * HEAD_DIM / peak / 1e6
        call = functools.partial(na2d, q, k, v, kernel, dilation)
        baseline = time_ms(functools.partial(call, backend="natten"), device, max(2, repeat // 2))
        row(
            f"| {size} | {kernel} | {dilation} | {heads} | natten | no | {baseline:.2f} | 1.0 | {floor_ms / baseline:.1%} |"
        )
        for with_rpb in (False, True):
            bias = rpb if with_rpb else None
            for status in available_backends(q, k, v, kernel, dilation, bias):
                if not status.available or status.name == "natten":
                    continue
                reps = 2 if status.name == "reference" else repeat
                ms = time_ms(functools.partial(call, rpb=bias, backend=status.name), device, reps)
                row(
                    f"| {size} | {kernel} | {dilation} | {heads} | {status.name} | {'yes' if with_rpb else 'no'} "
                    f"| {ms:.2f} | {baseline / ms:.1f} | {floor_ms / ms:.1%} |"
                )
            auto_ms = time_ms(functools.partial(call, rpb=bias), device, repeat)
            row(
                f"| {size} | {kernel} | {dilation} | {heads} | **auto** | {'yes' if with_rpb else 'no'} "
                f"| {auto_ms:.2f} | {baseline / auto_ms:.1f} | {floor_ms / auto_ms:.1%} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--record", action="store_true", help="add the table to its section of benchmarks/RESULTS.md"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with torch.inference_mode():
        lines = run(torch.device(args.device), getattr(torch, args.dtype), args.batch, args.repeat)
    print("\n".join(lines))
    if args.record:
        record(lines, "NA kernels")


if __name__ == "__main__":
    main()
