"""The flex backend: torch's `flex_attention`, compiled, with an NA block mask and an RPB `score_mod`.

Tokens are flattened row-major; the block mask skips key blocks outside every window of a query block,
and the score_mod adds the RPB. Compiled by Inductor (Triton on CUDA, C++ on CPU) once per shape: the first
call of a shape compiles for seconds (dynamic-shape compilation of flex fails in Inductor's CPU template
on torch 2.13), so this backend pays off on long runs of few shapes. Block masks are cached per
(shape, kernel, dilation, device).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from dinat_batch.kernels.neighborhood import window_start
from dinat_batch.kernels.problem import NAProblem

from .base import FAST_DTYPES, dtype_unsupported

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

# One graph per (shape, kernel, dilation, with or without RPB): a model at a few resolutions exceeds
# dynamo's default of 8 recompiles per function, after which it would silently run flex uncompiled.
_RECOMPILE_LIMIT = 256


@lru_cache(maxsize=1)
def _compiled_flex():
    """flex_attention, compiled. Imported on first use: importing it loads Dynamo (~2 s), which every
    process that imports the model (each inference actor, each decode worker) would pay otherwise."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@lru_cache(maxsize=64)
def _axis_tables(length: int, kernel: int, dilation: int, device: torch.device) -> torch.Tensor:
    """Window start of every query along one axis, in group coordinates."""
    return window_start(length, kernel, dilation).to(device)


def _in_window(q: torch.Tensor, k: torch.Tensor, start: torch.Tensor, kernel: int, dilation: int):
    rel = k // dilation - start[q]
    return (k % dilation == q % dilation) & (rel >= 0) & (rel < kernel)


@lru_cache(maxsize=64)
def _block_mask(
    height: int, width: int, kernel: tuple[int, int], dilation: tuple[int, int], device: torch.device
) -> BlockMask:
    start_h = _axis_tables(height, kernel[0], dilation[0], device)
    start_w = _axis_tables(width, kernel[1], dilation[1], device)

    def mask_mod(b, h, q_idx, kv_idx):
        rows = _in_window(q_idx // width, kv_idx // width, start_h, kernel[0], dilation[0])
        cols = _in_window(q_idx % width, kv_idx % width, start_w, kernel[1], dilation[1])
        return rows & cols

    from torch.nn.attention.flex_attention import create_block_mask

    tokens = height * width
    return create_block_mask(mask_mod, None, None, tokens, tokens, device=device)


class FlexBackend:
    name = "flex"

    def unsupported(self, problem: NAProblem) -> str | None:
        return dtype_unsupported(problem, FAST_DTYPES)

    def forward(self, problem: NAProblem) -> torch.Tensor:
        b, h, w, n, c = problem.query.shape
        block_mask = _block_mask(h, w, problem.kernel_size, problem.dilation, problem.device)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, h * w, n, c).transpose(1, 2)

        (kh, kw), (dh, dw) = problem.kernel_size, problem.dilation

        score_mod = None
        if problem.rpb is not None:
            rpb = problem.rpb.to(torch.float32)

            def score_mod(score, batch, head, q_idx, kv_idx):
                # evaluated on masked pairs too, so the indices are clamped into the table
                rel_h = (kh - 1 + kv_idx // w // dh - q_idx // w // dh).clamp(0, 2 * kh - 2)
                rel_w = (kw - 1 + kv_idx % w // dw - q_idx % w // dw).clamp(0, 2 * kw - 2)
                return score + rpb[head, rel_h, rel_w]

        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            out = _compiled_flex()(
                tokens(problem.query),
                tokens(problem.key),
                tokens(problem.value),
                score_mod=score_mod,
                block_mask=block_mask,
                scale=problem.scale,
            )
        return out.transpose(1, 2).reshape(b, h, w, n, c)
