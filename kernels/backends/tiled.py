"""The tiled backend: halo-window attention, exact for every shape, dilation and device.

Queries are cut into tiles of up to TILE x TILE positions of one dilation group; each tile attends to
the contiguous halo of keys its windows cover ((TILE + K - 1)^2 at most), with an additive mask that is
the RPB inside each query's window and -inf outside it. That turns NA into one batched fused
`scaled_dot_product_attention` call over dense, cache-sized blocks: about (TILE + K - 1)^2 / K^2 times
the minimal arithmetic, but at matmul speed instead of gather speed, which is what wins on CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from dinat_batch.kernels.neighborhood import axis_tiles
from dinat_batch.kernels.problem import NAProblem

from .base import FAST_DTYPES, dtype_unsupported

# A sweep of 4/7/8/14/28 on a 2-core CPU (benchmarks/RESULTS.md): 8 balances halo waste
# against block size.
TILE = 8


@dataclass(frozen=True)
class _Plan:
    query_rows: torch.Tensor  # [nTh, 1, Tqh, 1]
    query_cols: torch.Tensor  # [1, nTw, 1, Tqw]
    key_rows: torch.Tensor  # [nTh, 1, KHh, 1]
    key_cols: torch.Tensor  # [1, nTw, 1, KHw]
    outside: torch.Tensor  # [1, nTh*nTw, Tqh*Tqw, KHh*KHw] bool: key not in the query's window
    bias_rows: torch.Tensor  # [nTh, 1, Tqh, 1, KHh, 1]
    bias_cols: torch.Tensor  # [1, nTw, 1, Tqw, 1, KHw]

    @property
    def tiles(self) -> int:
        return self.query_rows.shape[0] * self.query_cols.shape[1]

    @property
    def tile_queries(self) -> int:
        return self.query_rows.shape[2] * self.query_cols.shape[3]

    @property
    def tile_keys(self) -> int:
        return self.key_rows.shape[2] * self.key_cols.shape[3]


@lru_cache(maxsize=128)
def _plan(
    height: int, width: int, kernel: tuple[int, int], dilation: tuple[int, int], device: torch.device
) -> _Plan:
    rows = axis_tiles(height, kernel[0], dilation[0], TILE)
    cols = axis_tiles(width, kernel[1], dilation[1], TILE)
    valid = rows.valid[:, None, :, None, :, None] & cols.valid[None, :, None, :, None, :]
    n_th, n_tw = rows.queries.shape[0], cols.queries.shape[0]
    tq = rows.queries.shape[1] * cols.queries.shape[1]
    kh = rows.keys.shape[1] * cols.keys.shape[1]
    return _Plan(
        query_rows=rows.queries[:, None, :, None].to(device),
        query_cols=cols.queries[None, :, None, :].to(device),
        key_rows=rows.keys[:, None, :, None].to(device),
        key_cols=cols.keys[None, :, None, :].to(device),
        outside=~valid.reshape(1, n_th * n_tw, tq, kh).to(device),
        bias_rows=rows.bias_index[:, None, :, None, :, None].to(device),
        bias_cols=cols.bias_index[None, :, None, :, None, :].to(device),
    )


class TiledBackend:
    name = "tiled"

    def unsupported(self, problem: NAProblem) -> str | None:
        return dtype_unsupported(problem, FAST_DTYPES)

    def forward(self, problem: NAProblem) -> torch.Tensor:
        plan = _plan(problem.height, problem.width, problem.kernel_size, problem.dilation, problem.device)
        b, n, c = problem.batch, problem.heads, problem.head_dim

        def gather(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
            # [B, H, W, heads, c] -> [B, heads * tiles, size, c]
            return t.permute(0, 3, 1, 2, 4)[:, :, rows, cols].reshape(b, n * plan.tiles, size, c)

        q = gather(problem.query, plan.query_rows, plan.query_cols, plan.tile_queries)
        k = gather(problem.key, plan.key_rows, plan.key_cols, plan.tile_keys)
        v = gather(problem.value, plan.key_rows, plan.key_cols, plan.tile_keys)
        mask = torch.zeros((), dtype=problem.dtype, device=problem.device)
        if problem.rpb is not None:
            bias = problem.rpb[:, plan.bias_rows, plan.bias_cols]  # [heads, nTh, nTw, Tqh, Tqw, KHh, KHw]
            mask = bias.reshape(n, plan.tiles, plan.tile_queries, plan.tile_keys).to(problem.dtype)
        mask = mask.masked_fill(plan.outside, float("-inf"))
        mask = mask.expand(n, plan.tiles, plan.tile_queries, plan.tile_keys).reshape(
            1, n * plan.tiles, plan.tile_queries, plan.tile_keys
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=problem.scale)
        n_th, n_tw = plan.query_rows.shape[0], plan.query_cols.shape[1]
        tqh, tqw = plan.query_rows.shape[2], plan.query_cols.shape[3]
        out = out.view(b, n, n_th, n_tw, tqh, tqw, c)
        result = problem.query.new_empty(b, n, problem.height, problem.width, c)
        result[:, :, plan.query_rows, plan.query_cols] = out
        return result.permute(0, 2, 3, 1, 4)
