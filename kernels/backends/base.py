"""What every NA backend provides: a name, a statement of what it supports, and a forward."""

from __future__ import annotations

from typing import Protocol

import torch

from dinat_batch.kernels.problem import NAProblem

HALF_DTYPES = (torch.float16, torch.bfloat16)
FAST_DTYPES = (torch.float32, *HALF_DTYPES)


class Backend(Protocol):
    name: str

    def unsupported(self, problem: NAProblem) -> str | None:
        """None when this backend can run `problem` on this machine, else the reason it cannot."""
        ...

    def forward(self, problem: NAProblem) -> torch.Tensor:
        """The attention output [batch, height, width, heads, head_dim] in the input dtype."""
        ...


def dtype_unsupported(problem: NAProblem, allowed: tuple[torch.dtype, ...]) -> str | None:
    if problem.dtype in allowed:
        return None
    return f"dtype {problem.dtype} not supported (supports {', '.join(str(d) for d in allowed)})"
