"""Faults a test switches on through the environment; inert otherwise. Named points where the driver
dies, to prove that a run cut short at any of them loses nothing and duplicates nothing once it is run
again; and a wait before each model call of the inference actors, to hold a run open while nodes come and
go; and inference actor starts that fail, as on a node whose GPU or memory is bad, or wait, as a big
model's load on a node that may be lost meanwhile."""

from __future__ import annotations

import os
import time

ENV = "DINAT_BATCH_CRASH_AT"
# read in the actors' processes, so set in the environment of the nodes they run on: seconds each model
# call waits first (a slow accelerator that costs no CPU), and a file while which the calls wait (a run
# held open until a test has seen what it waits for)
SLOW_ENV = "DINAT_BATCH_SLOW_CALLS"
HOLD_ENV = "DINAT_BATCH_HOLD_CALLS"
# read in the actors' processes too: a folder of files, each the failure of one inference actor's start
# (the start that takes it: removing a file is atomic, so no two starts take one)
FAILED_STARTS_ENV = "DINAT_BATCH_FAILED_STARTS"
# a file while which the starts wait, each saying so by a file of that name and `.waiting` beside it
HOLD_STARTS_ENV = "DINAT_BATCH_HOLD_STARTS"


class SimulatedCrash(BaseException):
    """The driver 'dies' here: a BaseException, so no handler of the pipeline's catches it."""


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        raise SimulatedCrash(name)


def slow_call() -> None:
    seconds = os.environ.get(SLOW_ENV)
    if seconds:
        time.sleep(float(seconds))
    hold = os.environ.get(HOLD_ENV)
    while hold and os.path.exists(hold):
        time.sleep(0.2)


class SimulatedStartFailure(RuntimeError):
    """An inference actor's start failing (FAILED_STARTS_ENV)."""


def actor_start() -> None:
    folder = os.environ.get(FAILED_STARTS_ENV)
    for name in sorted(os.listdir(folder)) if folder else ():
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:
            continue  # another actor's start took it
        raise SimulatedStartFailure(f"this actor's start failed ({name})")
    hold = os.environ.get(HOLD_STARTS_ENV)
    if hold and os.path.exists(hold):
        open(f"{hold}.waiting", "a").close()
    while hold and os.path.exists(hold):
        time.sleep(0.2)
