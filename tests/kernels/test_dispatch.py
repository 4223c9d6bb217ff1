"""Argument checking, backend availability and the `auto` choice."""

import pytest
import torch

from dinat_batch.kernels import available_backends, na2d
from dinat_batch.kernels.dispatch import choose_backend
from dinat_batch.kernels.problem import make_problem

pytestmark = pytest.mark.standalone


def qkv(shape=(1, 14, 14, 2, 16), dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=gen).to(dtype) for _ in range(3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_size": 4}, "must be odd"),
        ({"kernel_size": 7, "dilation": 3}, "7 * 3 = 21, larger than the map's height 14"),
        ({"kernel_size": (3, 5), "dilation": (1, 4)}, "5 * 4 = 20, larger than the map's width 14"),
        ({"kernel_size": 3, "dilation": 0}, "dilation along height must be positive"),
        (
            {"kernel_size": 3, "rpb": torch.randn(2, 3, 3)},
            "rpb must have shape [heads, 2*kh-1, 2*kw-1] = [2, 5, 5], got (2, 3, 3)",
        ),
        ({"kernel_size": (3, 3, 3)}, "kernel_size must be an int or a (height, width) pair"),
        ({"kernel_size": 3, "backend": "magic"}, "unknown NA backend 'magic'"),
        ({"kernel_size": 3, "backend": "dense"}, "needs kernel * dilation == map size"),
        ({"kernel_size": 3, "rpb": torch.randn(2, 5, 5), "backend": "natten"}, "no relative positional bias"),
    ],
)
def test_invalid_arguments_name_the_sizes(kwargs, message):
    q, k, v = qkv()
    with pytest.raises(ValueError) as err:
        na2d(q, k, v, **kwargs)
    assert message in str(err.value)


def test_mismatched_tensors_are_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"same shape, got \(1, 14, 14, 2, 16\), \(1, 14, 13, 2, 16\)"):
        na2d(q, k[:, :, :13], v, 3)
    with pytest.raises(ValueError, match="5 dimensions"):
        na2d(q[0], k[0], v[0], 3)
    with pytest.raises(ValueError, match="one dtype"):
        na2d(q, k.half(), v, 3)
    with pytest.raises(ValueError, match="not supported"):
        na2d(q.int(), k.int(), v.int(), 3)


def test_output_keeps_dtype_and_scale_is_applied():
    q, k, v = qkv()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert na2d(q.to(dtype), k.to(dtype), v.to(dtype), 5).dtype == dtype
    # scale 0 makes the attention uniform over each window: a 13x13 window on a 13x13 map averages all
    q, k, v = qkv((1, 13, 13, 2, 16))
    out = na2d(q, k, v, 13, scale=0.0)
    torch.testing.assert_close(out, v.mean(dim=(1, 2), keepdim=True).expand_as(v), atol=1e-6, rtol=0)


def test_available_backends_say_why_not():
    q, k, v = qkv()
    statuses = {s.name: s for s in available_backends(q, k, v, 3, 1, torch.randn(2, 5, 5))}
    assert set(statuses) == {"reference", "dense", "tiled", "flex", "natten"}
    assert statuses["tiled"].available and statuses["reference"].available
    assert not statuses["dense"].available and "3*1 x 3*1 for a 14 x 14 map" in statuses["dense"].reason
    assert not statuses["natten"].available and "rpb" in statuses["natten"].reason
    assert all(s.reason == "" for s in statuses.values() if s.available)


@pytest.mark.parametrize(
    ("shape", "kernel", "dilation", "dtype", "expected"),
    [
        ((1, 14, 14, 2, 16), 7, 2, torch.float32, "dense"),
        ((1, 14, 14, 2, 16), 7, 1, torch.float32, "tiled"),
        ((1, 14, 14, 2, 16), 7, 1, torch.bfloat16, "tiled"),
        ((1, 14, 14, 2, 16), 7, 1, torch.float64, "reference"),
    ],
)
def test_auto_choice_on_cpu(shape, kernel, dilation, dtype, expected):
    q, k, v = qkv(shape, dtype)
    assert choose_backend(make_problem(q, k, v, kernel, dilation)).name == expected
