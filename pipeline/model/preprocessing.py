"""The checkpoint's input spec: the fields of its `preprocessor_config.json` (ViTImageProcessor's) and the
normalisation that runs where the model runs. Decoding and resizing bytes to this spec is
`pipeline/images.py`; this module is what the model itself needs to know.
"""

from __future__ import annotations

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PreprocessConfig(BaseModel):
    """The fields of a Hugging Face `preprocessor_config.json` that ViTImageProcessor uses.

    Defaults are those of the published DiNAT checkpoints (224 x 224, bicubic, ImageNet statistics).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    do_resize: bool = True
    size: dict[str, int] = Field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = Image.Resampling.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    @field_validator("size", mode="before")
    @classmethod
    def _square(cls, value):
        # older configs say `"size": 224`
        if isinstance(value, int):
            return {"height": value, "width": value}
        if isinstance(value, dict) and "shortest_edge" in value and "height" not in value:
            raise ValueError(
                "size with shortest_edge is not ViTImageProcessor's resize; give height and width"
            )
        return value

    @property
    def height(self) -> int:
        return self.size["height"]

    @property
    def width(self) -> int:
        return self.size["width"]


Stats = tuple[torch.Tensor, torch.Tensor]


def stats(config: PreprocessConfig, device: torch.device | str) -> Stats:
    """The mean and std as [1, 3, 1, 1] float32 tensors on `device`: made once by whoever normalises
    many batches, since on a GPU each is a blocking host-to-device copy."""
    return tuple(
        torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        for values in (config.image_mean, config.image_std)
    )


def normalize(
    pixels: torch.Tensor,
    config: PreprocessConfig,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
    mean_std: Stats | None = None,
) -> torch.Tensor:
    """uint8 [batch, height, width, 3] -> [batch, 3, height, width] rescaled and normalised in float32 (on
    whatever device `pixels` is on), then cast to `dtype` and laid out in `memory_format`. `mean_std`:
    `stats(config, pixels.device)`, made once (default: made here)."""
    values = pixels.permute(0, 3, 1, 2).to(torch.float32)
    if config.do_rescale:
        values = values * config.rescale_factor
    if config.do_normalize:
        mean, std = mean_std or stats(config, values.device)
        values = (values - mean) / std
    return values.to(dtype).contiguous(memory_format=memory_format)
