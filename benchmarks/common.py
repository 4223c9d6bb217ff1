"""What every benchmark shares: a description of the machine and adding a table to its section of RESULTS.md."""

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


def record(lines: list[str], section: str) -> None:
    """Add `lines` to RESULTS.md at the end of the section whose `## ` heading starts with `section`: each
    benchmark has its section, and at the file's end a table would land in the last one's."""
    text = RESULTS.read_text().splitlines()
    start = next((i for i, line in enumerate(text) if line.startswith(f"## {section}")), None)
    if start is None:
        raise ValueError(f"{RESULTS} has no section headed '## {section}': add it, or name another")
    end = next((i for i in range(start + 1, len(text)) if text[i].startswith("## ")), len(text))
    while not text[end - 1].strip():
        end -= 1
    text[end:end] = ["", *lines]
    RESULTS.write_text("\n".join(text) + "\n")


def count_and_print(doc: str, script: str, option: str, default: int, measure: Callable[[int], dict]) -> None:
    """The command line of a benchmark of one size (`--images N`, `--files N`) of the driver's work at
    scale: `measure` of it, printed as one JSON line, and with `--record` added to RESULTS.md's section
    on it."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(f"--{option}", type=int, default=default)
    parser.add_argument(
        "--record", action="store_true", help="add the result to its section of benchmarks/RESULTS.md"
    )
    args = parser.parse_args()
    size = getattr(args, option)
    result = measure(size)
    print(json.dumps(result))
    if args.record:
        record([f"`{script} --{option} {size}`: `{json.dumps(result)}`"], "A driver that does not grow")
