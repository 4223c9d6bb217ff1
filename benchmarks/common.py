"""What every benchmark shares: a description of the machine and appending a table to RESULTS.md."""

from __future__ import annotations

import datetime as dt
import platform
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
