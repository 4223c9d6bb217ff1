"""One neighborhood-attention call, validated once and described for the backends.

Every backend receives an `NAProblem`, so the checks (and their error messages) live in one place and
a backend only has to say which problems it supports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# float64 is served by the reference backend only, for checking the others.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}")


@dataclass(frozen=True)
class NAProblem:
    """Validated arguments of `kernels.na2d`; tensors keep the layout [batch, height, width, heads, head_dim]."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    kernel_size: tuple[int, int]
    dilation: tuple[int, int]
    rpb: torch.Tensor | None
    scale: float

    @property
    def batch(self) -> int:
        return self.query.shape[0]

    @property
    def height(self) -> int:
        return self.query.shape[1]

    @property
    def width(self) -> int:
        return self.query.shape[2]

    @property
    def heads(self) -> int:
        return self.query.shape[3]

    @property
    def head_dim(self) -> int:
        return self.query.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def is_dense(self) -> bool:
        """True when every dilation group is exactly one kernel window (kernel * dilation == map size)."""
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        return kh * dh == self.height and kw * dw == self.width


def make_problem(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
) -> NAProblem:
    """Check the arguments of one NA call; raise ValueError naming the offending sizes."""
    kernel = _pair(kernel_size, "kernel_size")
    dil = _pair(dilation, "dilation")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(
                f"{name} must have 5 dimensions [batch, height, width, heads, head_dim], got shape {tuple(t.shape)}"
            )
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            "query, key and value must have the same shape, got "
            f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if key.device != query.device or value.device != query.device:
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device} and {value.device}"
        )
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"query, key and value must have one dtype, got {query.dtype}, {key.dtype} and {value.dtype}"
        )
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"dtype {query.dtype} is not supported; use float32, float16 or bfloat16 (float64 with backend='reference')"
        )
    if min(query.shape) == 0:
        raise ValueError(f"query has an empty dimension: shape {tuple(query.shape)}")
    height, width, heads = query.shape[1], query.shape[2], query.shape[3]
    for axis, size, k, d in (("height", height, kernel[0], dil[0]), ("width", width, kernel[1], dil[1])):
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size along {axis} must be odd and positive, got {k}")
        if d < 1:
            raise ValueError(f"dilation along {axis} must be positive, got {d}")
        if k * d > size:
            raise ValueError(
                f"kernel_size * dilation along {axis} is {k} * {d} = {k * d}, larger than the map's {axis} {size}; "
                "pad the map (DiNAT pads with zeros after the layer norm) or use a smaller kernel or dilation"
            )
    if rpb is not None:
        expected = (heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1)
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != expected:
            got = tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__
            raise ValueError(f"rpb must have shape [heads, 2*kh-1, 2*kw-1] = {list(expected)}, got {got}")
        if rpb.device != query.device:
            raise ValueError(f"rpb is on {rpb.device} but query is on {query.device}")
    if scale is None:
        scale = query.shape[4] ** -0.5
    return NAProblem(query, key, value, kernel, dil, rpb, float(scale))
