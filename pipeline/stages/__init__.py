"""The stages of the Ray Data plan, in the order an image meets them:

    read    (CPU tasks)   listing rows -> (key, data, error)              pipeline.stages.read
    decode  (CPU tasks)   (key, data, error) -> (key, pixels, ..., error) pipeline.stages.decode
    infer   (actor pool)  decoded rows -> output rows                     pipeline.stages.infer
    write   (I/O tasks)   output rows -> chunk files in the staging folder pipeline.stages.write

Each module declares its `STAGE` (what it reads, what it gives, what it asks Ray for) and an `apply`
that adds it to a dataset; `pipeline.run` only wires them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    """A stage's contract: the columns it reads from each row, the columns every row has after it (plus
    `optional` ones that only some settings add), and the Ray resources of each of its tasks or actors."""

    name: str
    consumes: tuple[str, ...]
    produces: tuple[str, ...]
    resources: dict[str, float] = field(default_factory=dict)
    optional: tuple[str, ...] = ()

    def feeds(self, after: Stage) -> bool:
        """Whether `after` finds every column it reads in this stage's rows."""
        return set(after.consumes) <= set(self.produces) | set(self.optional)
