"""What every benchmark shares: a description of the machine and appending a table to RESULTS.md."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine(device: torch.device) -> str:
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else (platform.processor() or platform.machine())
    )
    return f"{device.type} ({where}, {torch.get_num_threads()} threads, torch {torch.__version__}, {dt.date.today()})"


def record(lines: list[str]) -> None:
    with RESULTS.open("a") as f:
        f.write("\n" + "\n".join(lines) + "\n")


def count_and_print(doc: str, script: str, option: str, default: int, measure: Callable[[int], dict]) -> None:
    """The command line of a benchmark of one size (`--images N`, `--files N`): `measure` of it, printed
    as one JSON line, and with `--record` appended to RESULTS.md."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(f"--{option}", type=int, default=default)
    parser.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = parser.parse_args()
    size = getattr(args, option)
    result = measure(size)
    print(json.dumps(result))
    if args.record:
        record([f"`{script} --{option} {size}`: `{json.dumps(result)}`"])
