"""The stages of the Ray Data plan, in the order an image meets them:

    read.py    (CPU tasks)   listing rows -> (key, data, error)
    decode.py  (CPU tasks)   (key, data, error) -> (key, pixels, width, height, error)
    infer.py   (actor pool)  decoded rows -> output rows
    write.py   (I/O tasks)   output rows -> chunk files in the output's staging folder

Each module declares its `STAGE` (what it reads, what it gives, what it asks Ray for) and a function
that adds it to the plan: `read.dataset` starts a dataset from a listing, the others `apply` to one;
`pipeline/run.py` only wires them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Read and decode tasks fuse into one; half a CPU each lets two overlap per core while one waits on storage.
# The difference from the inference actor's resources also keeps Ray from fusing decoding into the actor,
# where it would run serially with the model instead of beside it.
CPU_TASK = {"num_cpus": 0.5}


@dataclass(frozen=True)
class Stage:
    """A stage's contract: the columns it reads from each row (`may_consume`: read when present), the
    columns every row has after it (`may_produce`: added by some settings only), and the Ray resources
    of each of its tasks or actors (beyond what the plan decides, such as GPUs)."""

    name: str
    consumes: tuple[str, ...]
    produces: tuple[str, ...]
    resources: dict[str, float] = field(default_factory=dict)
    may_consume: tuple[str, ...] = ()
    may_produce: tuple[str, ...] = ()

    def feeds(self, after: Stage) -> bool:
        """Whether `after` finds every column it reads in this stage's rows."""
        given = set(self.produces) | set(self.may_produce)
        return set(after.consumes) <= set(self.produces) and set(after.may_consume) <= given
