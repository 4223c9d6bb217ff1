"""The one public NA entry point and the choice of backend.

`auto` picks, in order, the first backend that supports the call from the table for its device. The order
comes from benchmarks/kernels.py (numbers in benchmarks/RESULTS.md):

| device | order | why |
|---|---|---|
| cpu | dense, tiled | dense is a reshape plus one fused attention call; tiled is exact for every shape and ~4-30x faster than natten's CPU path |
| cuda | dense, tiled | predicted, not yet measured on a GPU: both are single fused SDPA calls over dense blocks |

`reference` serves float64 (and is the tests' ground truth); `flex` and `natten` run only when asked by
name until a measurement puts them in the table.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dinat_batch.kernels.backends.base import Backend
from dinat_batch.kernels.backends.dense import DenseBackend
from dinat_batch.kernels.backends.flex import FlexBackend
from dinat_batch.kernels.backends.natten_fused import NattenBackend
from dinat_batch.kernels.backends.reference import ReferenceBackend
from dinat_batch.kernels.backends.tiled import TiledBackend
from dinat_batch.kernels.problem import NAProblem, make_problem

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        ReferenceBackend(),
        DenseBackend(),
        TiledBackend(),
        FlexBackend(),
        NattenBackend(),
    )
}

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("dense", "tiled", "reference"),
    "cuda": ("dense", "tiled", "reference"),
}


class BackendStatus(NamedTuple):
    name: str
    available: bool
    reason: str  # why not, when not available


def _statuses(problem: NAProblem) -> list[BackendStatus]:
    out = []
    for name, backend in BACKENDS.items():
        reason = backend.unsupported(problem)
        out.append(BackendStatus(name, reason is None, reason or ""))
    return out


def available_backends(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    rpb: torch.Tensor | None = None,
) -> list[BackendStatus]:
    """Which backends can run this call on this machine, and why not for the others."""
    return _statuses(make_problem(query, key, value, kernel_size, dilation, rpb))


def choose_backend(problem: NAProblem, backend: str = "auto") -> Backend:
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown NA backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
        reason = BACKENDS[backend].unsupported(problem)
        if reason is not None:
            raise ValueError(f"NA backend {backend!r} cannot run this call: {reason}")
        return BACKENDS[backend]
    for name in AUTO_ORDER.get(problem.device.type, ("reference",)):
        if BACKENDS[name].unsupported(problem) is None:
            return BACKENDS[name]
    return BACKENDS["reference"]


def na2d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """2-D neighborhood attention with optional relative positional bias, in natten's layout.

    query, key, value: [batch, height, width, heads, head_dim]; kernel_size and dilation: int or (h, w),
    odd kernels with kernel * dilation <= map size; rpb: None or [heads, 2*kh-1, 2*kw-1], added to the
    scaled scores; scale defaults to head_dim ** -0.5. Returns [batch, height, width, heads, head_dim] in
    the input dtype. Inference only: no autograd.
    """
    problem = make_problem(query, key, value, kernel_size, dilation, rpb, scale)
    with torch.no_grad():
        return choose_backend(problem, backend).forward(problem)
