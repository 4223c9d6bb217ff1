"""Index arithmetic of neighborhood attention along one axis, as NATTEN defines it.

For an axis of length L, odd kernel K and dilation d, query i belongs to dilation group g = i mod d, where it
sits at position i' = i div d of a group of length L_g. Its window starts at
s' = min(max(i' - K // 2, 0), L_g - K) (shifted inward at the borders, never padded) and holds the keys
(s' + t) * d + g for t = 0..K-1. The relative-position-bias index of such a key is (K - 1) + (s' + t - i').

Everything here depends only on (L, K, d) and is cached, so the backends pay for it once per shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


def group_length(length: int, dilation: int, group: int) -> int:
    return length // dilation + (1 if group < length % dilation else 0)


@lru_cache(maxsize=256)
def window_start(length: int, kernel: int, dilation: int) -> torch.Tensor:
    """The first key (in group coordinates) of every query's window: a LongTensor [L]."""
    i = torch.arange(length)
    group = i % dilation
    pos = i // dilation
    glen = length // dilation + (group < length % dilation).long()
    return torch.minimum((pos - kernel // 2).clamp(min=0), glen - kernel)


@lru_cache(maxsize=256)
def neighbors(length: int, kernel: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key indices [L, K] of every query's window and their RPB indices [L, K] (in 0..2K-2)."""
    i = torch.arange(length)
    start = window_start(length, kernel, dilation)
    t = torch.arange(kernel)
    keys = (start[:, None] + t) * dilation + (i % dilation)[:, None]
    bias_index = (kernel - 1) + start[:, None] + t - (i // dilation)[:, None]
    return keys, bias_index


@dataclass(frozen=True)
class AxisTiles:
    """Queries of one axis cut into tiles, each with the contiguous halo of keys its windows need.

    queries [n, T]: original indices of the tile's queries (all of one dilation group).
    keys [n, KH]: original indices of the halo's keys (clamped inside the group; `valid` masks the clamps).
    valid [n, T, KH]: whether halo key j lies in query t's window.
    bias_index [n, T, KH]: RPB index of (query, key); 0 where not valid, so it is always safe to gather.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    valid: torch.Tensor
    bias_index: torch.Tensor


@lru_cache(maxsize=256)
def axis_tiles(length: int, kernel: int, dilation: int, tile: int) -> AxisTiles:
    """Cut an axis into query tiles of at most `tile` positions per dilation group.

    The tile size is evened out over the shortest group (28 with tile 8 gives four tiles of 7). A group
    whose length is still not a multiple of it gets a last tile shifted back to overlap its neighbour, so
    all tiles have one size; overlapping queries are computed twice, to the same result.
    """
    min_group = length // dilation
    tq = -(-min_group // -(-min_group // tile))
    halo = min(tq + kernel - 1, min_group + (1 if length % dilation else 0))
    start = window_start(length, kernel, dilation)
    queries, keys, valid, bias_index = [], [], [], []
    for group in range(dilation):
        glen = group_length(length, dilation, group)
        for first in sorted({min(a, glen - tq) for a in range(0, glen, tq)}):
            pos = torch.arange(first, first + tq)
            q_orig = pos * dilation + group
            q_start = start[q_orig]
            # the first query's window start, in plain ints: reading it off `q_start` would be a tensor-to-int
            # conversion, which breaks torch.compile's graph at every layer that plans tiles
            first_start = min(max(first - kernel // 2, 0), glen - kernel)
            halo_first = max(0, min(first_start, glen - halo))
            halo_pos = torch.arange(halo_first, halo_first + halo)
            inside = (halo_pos[None, :] >= q_start[:, None]) & (halo_pos[None, :] < q_start[:, None] + kernel)
            inside &= halo_pos[None, :] < glen
            queries.append(q_orig)
            keys.append(halo_pos.clamp(max=glen - 1) * dilation + group)
            valid.append(inside)
            rel = (kernel - 1) + halo_pos[None, :] - pos[:, None]
            bias_index.append(torch.where(inside, rel, 0))
    return AxisTiles(torch.stack(queries), torch.stack(keys), torch.stack(valid), torch.stack(bias_index))
