"""Every backend against `reference` on a grid of kernels, dilations, map shapes, heads, RPB and dtypes.

`flex` runs on a slice of the grid (FLEX_CASES: DiNAT-mini's shapes from 28x28 down, the odd ones, and one
grid case per kernel size) through torch's eager flex_attention, which applies the backend's mask_mod and
score_mod to every query-key pair (0.3-3 s a case on a 2-core CPU); the block sparsity that
create_block_mask derives from that mask_mod is used only compiled, as the backend runs, which the test
does on two cases (FLEX_COMPILED): each new shape compiles for 5-15 s on such a CPU and for 30-150 s beside
the rest of the suite (~700 s for the slice). tests/test_gpu.py compiles every DiNAT-mini shape on CUDA,
the device flex is meant for (on a CPU it runs only when asked by name). natten on a CPU runs its flex path
uncompiled (dense in the map's tokens): it is left out above NATTEN_TOKENS, where DiNAT-large's 96x96 maps
took 8-15 s each alone and 23-46 s in the suite; every other case checks it.
"""

import pytest
import torch

from dinat_batch.kernels import available_backends, na2d
from dinat_batch.kernels.backends import flex

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
# (height, width, with_rpb): several key blocks, the last partial, with RPB; tuple kernel and dilation without
FLEX_COMPILED = {(28, 28, True), (9, 21, False)}
NATTEN_TOKENS = 64 * 64


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
    skip = ("flex", "natten") if height * width > NATTEN_TOKENS else ("flex",)
    checked = _check_backends(
        height, width, kernel, dilation, heads, head_dim, torch.float32, with_rpb, 1e-5, skip=skip
    )
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    assert ("dense" in checked) == (kh * dh == height and kw * dw == width)


@pytest.mark.parametrize("with_rpb", [True, False], ids=["rpb", "no-rpb"])
@pytest.mark.parametrize(("height", "width", "kernel", "dilation", "heads", "head_dim"), FLEX_CASES)
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
def test_flex_matches_reference(height, width, kernel, dilation, heads, head_dim, with_rpb, monkeypatch):
    if (height, width, with_rpb) not in FLEX_COMPILED:
        from torch.nn.attention.flex_attention import flex_attention  # loads Dynamo: not in the other lanes

        monkeypatch.setattr(flex, "_compiled_flex", lambda: flex_attention)
    q, k, v, rpb = _inputs(height, width, kernel, heads, head_dim, torch.float32, seed=height * 1000 + width)
    rpb = rpb if with_rpb else None
    expected = na2d(q, k, v, kernel, dilation, rpb=rpb, backend="reference")
    got = na2d(q, k, v, kernel, dilation, rpb=rpb, backend="flex")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("height", "width", "kernel", "dilation", "heads", "head_dim"), DINAT[:5] + OTHER)
def test_half_precision_matches_reference(height, width, kernel, dilation, heads, head_dim, dtype):
    _check_backends(height, width, kernel, dilation, heads, head_dim, dtype, True, 2e-2, skip=("flex",))
