"""The reference backend: NA written to be read, exact on any device; the ground truth of the tests.

It gathers every query's K x K neighborhood explicitly, so it costs K*K copies of the keys and values:
fine for tests and small maps, slow for anything else. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import torch

from dinat_batch.kernels.neighborhood import neighbors
from dinat_batch.kernels.problem import NAProblem

from .base import HALF_DTYPES


class ReferenceBackend:
    name = "reference"

    def unsupported(self, problem: NAProblem) -> str | None:
        return None

    def forward(self, problem: NAProblem) -> torch.Tensor:
        compute = torch.float32 if problem.dtype in HALF_DTYPES else problem.dtype
        device = problem.device
        (kh, kw), (dh, dw) = problem.kernel_size, problem.dilation
        keys_h, bias_h = (t.to(device) for t in neighbors(problem.height, kh, dh))
        keys_w, bias_w = (t.to(device) for t in neighbors(problem.width, kw, dw))
        rows = keys_h[:, None, :, None]  # [H, 1, kh, 1]
        cols = keys_w[None, :, None, :]  # [1, W, 1, kw]

        q = problem.query.to(compute) * problem.scale
        k = problem.key.to(compute)[:, rows, cols]  # [B, H, W, kh, kw, heads, head_dim]
        v = problem.value.to(compute)[:, rows, cols]
        scores = torch.einsum("bijnc,bijxync->bijnxy", q, k)
        if problem.rpb is not None:
            bias = problem.rpb.to(compute)[:, bias_h[:, None, :, None], bias_w[None, :, None, :]]
            scores = scores + bias.permute(1, 2, 0, 3, 4)  # [H, W, heads, kh, kw]
        weights = scores.flatten(-2).softmax(dim=-1).view_as(scores)
        out = torch.einsum("bijnxy,bijxync->bijnc", weights, v)
        return out.to(problem.dtype)
