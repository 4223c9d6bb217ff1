"""Faults a test switches on through the environment; inert otherwise. Named points where the driver
dies, to prove that a run cut short at any of them loses nothing and duplicates nothing once it is run
again; and a wait before each model call of the inference actors, to hold a run open while nodes come and
go."""

from __future__ import annotations

import os
import time

ENV = "DINAT_BATCH_CRASH_AT"
# seconds each model call of an inference actor waits first: a slow accelerator that costs no CPU. Read
# in the actor's process, so it is set in the environment of the node the actor runs on.
SLOW_ENV = "DINAT_BATCH_SLOW_CALLS"


class SimulatedCrash(BaseException):
    """The driver 'dies' here: a BaseException, so no handler of the pipeline's catches it."""


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        raise SimulatedCrash(name)


def slow_call() -> None:
    seconds = os.environ.get(SLOW_ENV)
    if seconds:
        time.sleep(float(seconds))
