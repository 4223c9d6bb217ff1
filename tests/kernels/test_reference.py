"""The reference backend against a literal per-query loop written from NATTEN's definition, in float64."""

import pytest
import torch

from dinat_batch.kernels import na2d
from dinat_batch.kernels.neighborhood import axis_tiles, neighbors

pytestmark = pytest.mark.standalone


def literal_window(i: int, length: int, kernel: int, dilation: int) -> tuple[list[int], list[int]]:
    """Keys of query i along one axis and their RPB indices, straight from the definition."""
    group = i % dilation
    pos = i // dilation
    group_len = len(range(group, length, dilation))
    start = min(max(pos - kernel // 2, 0), group_len - kernel)
    keys = [(start + t) * dilation + group for t in range(kernel)]
    bias = [(kernel - 1) + (key - i) // dilation for key in keys]
    return keys, bias


def literal_na2d(q, k, v, kernel, dilation, rpb):
    batch, height, width, heads, head_dim = q.shape
    out = torch.empty_like(q)
    for b in range(batch):
        for i in range(height):
            rows, bias_rows = literal_window(i, height, kernel[0], dilation[0])
            for j in range(width):
                cols, bias_cols = literal_window(j, width, kernel[1], dilation[1])
                for h in range(heads):
                    scores, values = [], []
                    for r, br in zip(rows, bias_rows, strict=True):
                        for c, bc in zip(cols, bias_cols, strict=True):
                            s = (q[b, i, j, h] * head_dim**-0.5) @ k[b, r, c, h]
                            if rpb is not None:
                                s = s + rpb[h, br, bc]
                            scores.append(s)
                            values.append(v[b, r, c, h])
                    weights = torch.stack(scores).softmax(0)
                    out[b, i, j, h] = (weights[:, None] * torch.stack(values)).sum(0)
    return out


@pytest.mark.parametrize(
    ("height", "width", "kernel", "dilation", "heads"),
    [
        (7, 7, (7, 7), (1, 1), 1),
        (9, 11, (3, 3), (2, 2), 2),
        (12, 10, (5, 3), (2, 3), 2),
        (13, 9, (3, 5), (3, 1), 1),
        (10, 10, (3, 3), (1, 1), 3),
    ],
)
@pytest.mark.parametrize("with_rpb", [True, False])
def test_reference_matches_literal_loop(height, width, kernel, dilation, heads, with_rpb):
    gen = torch.Generator().manual_seed(height * 100 + width)
    q, k, v = (torch.randn(2, height, width, heads, 4, dtype=torch.float64, generator=gen) for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1, dtype=torch.float64, generator=gen)
    rpb = rpb if with_rpb else None
    expected = literal_na2d(q, k, v, kernel, dilation, rpb)
    got = na2d(q, k, v, kernel, dilation, rpb=rpb, backend="reference")
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    ("length", "kernel", "dilation"), [(7, 7, 1), (10, 3, 3), (23, 5, 4), (56, 7, 8), (13, 3, 4)]
)
def test_neighbors_match_definition(length, kernel, dilation):
    keys, bias = neighbors(length, kernel, dilation)
    for i in range(length):
        expected_keys, expected_bias = literal_window(i, length, kernel, dilation)
        assert keys[i].tolist() == expected_keys
        assert bias[i].tolist() == expected_bias


@pytest.mark.parametrize(
    ("length", "kernel", "dilation", "tile"), [(56, 7, 1, 8), (23, 5, 4, 8), (30, 3, 3, 4), (13, 13, 1, 8)]
)
def test_axis_tiles_cover_every_window_exactly(length, kernel, dilation, tile):
    tiles = axis_tiles(length, kernel, dilation, tile)
    seen = set()
    for n in range(tiles.queries.shape[0]):
        for t, query in enumerate(tiles.queries[n].tolist()):
            seen.add(query)
            keys = tiles.keys[n][tiles.valid[n, t]].tolist()
            expected_keys, expected_bias = literal_window(query, length, kernel, dilation)
            assert keys == expected_keys
            assert tiles.bias_index[n, t][tiles.valid[n, t]].tolist() == expected_bias
    assert seen == set(range(length))
