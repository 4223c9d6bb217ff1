"""The checkpoint's input spec: the fields of its `preprocessor_config.json` (ViTImageProcessor's).
Decoding and resizing bytes to this spec is `pipeline/images.py`, on CPU workers that load no torch (hence
none here); the normalisation runs where the model runs (`runtime.normalize`).
"""

from __future__ import annotations

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
