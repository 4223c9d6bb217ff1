"""The natten backend: natten's own `na2d` (fused FNA kernels on CUDA, flex-fna on CPU), without RPB.

natten >= 0.20 has no relative positional bias, so this backend serves only calls with `rpb=None`
(backbones trained without RPB, and the benchmark's baseline). natten chooses its kernel itself.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from dinat_batch.kernels.problem import NAProblem

from .base import FAST_DTYPES, dtype_unsupported


class NattenBackend:
    name = "natten"

    def unsupported(self, problem: NAProblem) -> str | None:
        if importlib.util.find_spec("natten") is None:
            return "natten is not installed"
        if problem.rpb is not None:
            return "natten >= 0.20 has no relative positional bias; pass rpb=None or use another backend"
        return dtype_unsupported(problem, FAST_DTYPES)

    def forward(self, problem: NAProblem) -> torch.Tensor:
        import natten

        with warnings.catch_warnings():
            # natten warns on every CPU call that its flex path runs uncompiled; that is the point here
            warnings.simplefilter("ignore")
            return natten.na2d(
                problem.query.contiguous(),
                problem.key.contiguous(),
                problem.value.contiguous(),
                kernel_size=problem.kernel_size,
                dilation=problem.dilation,
                scale=problem.scale,
            )
