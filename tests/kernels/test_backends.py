"""Every backend against `reference` on a grid of kernels, dilations, map shapes, heads, RPB and dtypes.

`flex` compiles for seconds per new shape on a CPU, so it runs on a slice of the grid (FLEX_CASES: DiNAT-mini's
shapes from 28x28 down, the odd ones, and one grid case per kernel size); every other backend runs on all of it.
flex's two 56x56 cases took 43-196 s each on a 2-core CPU, a third of the suite's flex time, for a mask and
score_mod that the 28x28 case already spans over several key blocks, the last one partial; tests/test_gpu.py
runs all of DiNAT-mini's shapes through flex on CUDA, the device it is meant for (on a CPU it runs only when
asked by name).
"""

import pytest
import torch

from dinat_batch.kernels import available_backends, na2d

pytestmark = pytest.mark.standalone


def _case(height, width, kernel, dilation, heads, head_dim=16):
    return pytest.param(
        height,
        width,
        kernel,
        dilation,
        heads,
        head_dim,
        id=f"{height}x{width}-k{kernel}-d{dilation}-h{heads}",
    )


# kernels 3..13 x dilations 1..4 on non-square maps whose sides are not multiples of the dilation
GRID = [
    _case(k * d + d + 1, k * d + 3, k, d, 1 + (k + d) % 4) for k in (3, 5, 7, 11, 13) for d in (1, 2, 3, 4)
]
# DiNAT's own attention shapes: dinat-mini/tiny/small/base at 224, large at 384, large-11x11 at 384
DINAT = [
    _case(size, size, k, d, heads, 32)
    for size, k, d, heads in (
        (56, 7, 8, 2),
        (56, 7, 1, 2),
        (28, 7, 4, 4),
        (14, 7, 2, 4),
        (7, 7, 1, 4),
        (96, 7, 13, 1),
        (48, 7, 6, 2),
        (24, 7, 3, 3),
        (12, 7, 1, 4),
        (96, 11, 8, 1),
        (48, 11, 4, 2),
        (24, 11, 2, 3),
        (12, 11, 1, 4),
    )
]
OTHER = [
    _case(9, 21, (3, 7), (3, 2), 2),
    _case(20, 8, (5, 7), (4, 1), 3),
]
FLEX_CASES = DINAT[2:5] + OTHER + GRID[3::4]


def _inputs(height, width, kernel, heads, head_dim, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    batch = 2 if height * width < 2500 else 1  # batch > 1 on the small maps; the big ones cost time
    q, k, v = (torch.randn(batch, height, width, heads, head_dim, generator=gen) for _ in range(3))
    rpb = torch.randn(heads, 2 * kh - 1, 2 * kw - 1, generator=gen)
    return tuple(t.to(device, dtype) for t in (q, k, v, rpb))


def _check_backends(
    height, width, kernel, dilation, heads, head_dim, dtype, with_rpb, atol, skip=(), device="cpu"
):
    """Every available backend but `skip` on `device` against the float64 reference on the CPU."""
    q, k, v, rpb = _inputs(height, width, kernel, heads, head_dim, dtype, height * 1000 + width, device)
    rpb = rpb if with_rpb else None
    *exact, exact_rpb = (None if t is None else t.cpu().double() for t in (q, k, v, rpb))
    expected = na2d(*exact, kernel, dilation, rpb=exact_rpb, backend="reference")
    checked = []
    for status in available_backends(q, k, v, kernel, dilation, rpb):
        if status.name == "reference" or status.name in skip or not status.available:
            continue
        got = na2d(q, k, v, kernel, dilation, rpb=rpb, backend=status.name)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.cpu().double(), expected, atol=atol, rtol=0, msg=status.name)
        checked.append(status.name)
    # every backend that can run this case did run; the always-applicable ones must be among them
    assert "tiled" in checked
    assert ("natten" in checked) == (not with_rpb and "natten" not in skip)
    return checked


@pytest.mark.parametrize("with_rpb", [True, False], ids=["rpb", "no-rpb"])
@pytest.mark.parametrize(("height", "width", "kernel", "dilation", "heads", "head_dim"), GRID + DINAT + OTHER)
def test_fp32_matches_reference(height, width, kernel, dilation, heads, head_dim, with_rpb):
    checked = _check_backends(
        height, width, kernel, dilation, heads, head_dim, torch.float32, with_rpb, 1e-5, skip=("flex",)
    )
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    assert ("dense" in checked) == (kh * dh == height and kw * dw == width)


@pytest.mark.parametrize("with_rpb", [True, False], ids=["rpb", "no-rpb"])
@pytest.mark.parametrize(("height", "width", "kernel", "dilation", "heads", "head_dim"), FLEX_CASES)
def test_flex_matches_reference(height, width, kernel, dilation, heads, head_dim, with_rpb):
    q, k, v, rpb = _inputs(height, width, kernel, heads, head_dim, torch.float32, seed=height * 1000 + width)
    rpb = rpb if with_rpb else None
    expected = na2d(q, k, v, kernel, dilation, rpb=rpb, backend="reference")
    got = na2d(q, k, v, kernel, dilation, rpb=rpb, backend="flex")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("height", "width", "kernel", "dilation", "heads", "head_dim"), DINAT[:5] + OTHER)
def test_half_precision_matches_reference(height, width, kernel, dilation, heads, head_dim, dtype):
    _check_backends(height, width, kernel, dilation, heads, head_dim, dtype, True, 2e-2, skip=("flex",))
