"""Named points in the commit where a test can make the driver die, to prove that a run cut short at any
of them loses nothing and duplicates nothing once it is run again. Inert unless the environment names
the point."""

from __future__ import annotations

import os

ENV = "DINAT_BATCH_CRASH_AT"


class SimulatedCrash(BaseException):
    """The driver 'dies' here: a BaseException, so no handler of the pipeline's catches it."""


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        raise SimulatedCrash(name)
