"""The dense backend: when kernel * dilation == map size, NA is dense attention inside each dilation group.

Then every group holds exactly K x K tokens and every query's window is its whole group, so the groups are
a reshape away (no gather) and one fused `scaled_dot_product_attention` call with the RPB as an additive
mask computes them all. DiNAT at its native resolution hits this in every dilated layer and in its last
stage.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from dinat_batch.kernels.problem import NAProblem

from .base import FAST_DTYPES, dtype_unsupported


@lru_cache(maxsize=64)
def _relative_index(kernel: int, device: torch.device) -> torch.Tensor:
    """[K, K] RPB index of (query, key) inside one group along one axis: (K - 1) + key - query."""
    pos = torch.arange(kernel, device=device)
    return (kernel - 1) + pos[None, :] - pos[:, None]


def dense_bias(rpb: torch.Tensor, kernel_size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The RPB of one group as an additive mask [heads, K*K, K*K] (query-major, row-major tokens)."""
    kh, kw = kernel_size
    rel_h = _relative_index(kh, rpb.device)
    rel_w = _relative_index(kw, rpb.device)
    bias = rpb[:, rel_h[:, None, :, None], rel_w[None, :, None, :]]  # [heads, qh, qw, kh, kw]
    return bias.reshape(rpb.shape[0], kh * kw, kh * kw).to(dtype)


class DenseBackend:
    name = "dense"

    def unsupported(self, problem: NAProblem) -> str | None:
        if not problem.is_dense:
            (kh, kw), (dh, dw) = problem.kernel_size, problem.dilation
            return (
                f"needs kernel * dilation == map size on both axes, got {kh}*{dh} x {kw}*{dw} "
                f"for a {problem.height} x {problem.width} map"
            )
        return dtype_unsupported(problem, FAST_DTYPES)

    def forward(self, problem: NAProblem) -> torch.Tensor:
        (kh, kw), (dh, dw) = problem.kernel_size, problem.dilation
        b, n, c = problem.batch, problem.heads, problem.head_dim

        def groups(t: torch.Tensor) -> torch.Tensor:
            # token (i' * dh + g_h, j' * dw + g_w) -> group (g_h, g_w), position (i', j')
            t = t.view(b, kh, dh, kw, dw, n, c).permute(0, 5, 2, 4, 1, 3, 6)
            return t.reshape(b, n * dh * dw, kh * kw, c)

        mask = None
        if problem.rpb is not None:
            bias = dense_bias(problem.rpb, problem.kernel_size, problem.dtype)
            mask = (
                bias[:, None].expand(n, dh * dw, kh * kw, kh * kw).reshape(1, n * dh * dw, kh * kw, kh * kw)
            )
        out = F.scaled_dot_product_attention(
            groups(problem.query),
            groups(problem.key),
            groups(problem.value),
            attn_mask=mask,
            scale=problem.scale,
        )
        out = out.view(b, n, dh, dw, kh, kw, c).permute(0, 4, 2, 5, 3, 1, 6)
        return out.reshape(b, kh * dh, kw * dw, n, c)
