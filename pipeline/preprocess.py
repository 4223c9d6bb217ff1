"""Encoded image bytes -> the model's input, exactly as the checkpoint's `preprocessor_config.json` says.

ViTImageProcessor semantics: EXIF orientation, first frame, RGB conversion, resize straight to
height x width with the configured PIL filter (aspect ratio not kept, no crop), rescale, normalize.
Decoding and resizing run on CPU workers and give uint8 pixels; `normalize` runs where the model runs.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 100_000_000  # ~10k x 10k; bigger declared sizes are treated as decompression bombs
# greyscale modes PIL cannot bring to RGB sensibly, and the divisor that brings them to 0..255
_EXIF_ORIENTATION = 0x0112
_WIDE_GREY_DIVISOR = {"I;16": 257.0, "I;16B": 257.0, "I;16L": 257.0, "I;16N": 257.0, "I": 257.0, "F": 1.0}


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


class ImageDecodeError(ValueError):
    """Bytes that do not decode to an image. `kind` names the failure for error counts."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PreprocessedImage:
    pixel_values: np.ndarray  # float32 [3, height, width]
    width: int  # of the source image, after EXIF orientation
    height: int


_CORRUPT = (OSError, SyntaxError, ValueError, EOFError)


def _corrupt(err: Exception, fmt: str) -> ImageDecodeError:
    message = str(err)
    kind = "truncated" if "truncated" in message.lower() or isinstance(err, EOFError) else "undecodable"
    return ImageDecodeError(kind, f"{fmt} data is corrupt: {message}")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty", "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns, then refuses, above its own global limit; ours is the configured one below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(
            "too_large", f"image declares a size over the limit that decodes safely: {err}"
        ) from err
    except UnidentifiedImageError as err:
        head = data[:8].hex(" ")
        raise ImageDecodeError(
            "undecodable", f"not a recognised image format ({len(data)} bytes starting with {head})"
        ) from err
    except _CORRUPT as err:  # a header that breaks off or lies fails already while opening
        raise _corrupt(err, "image") from err
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_large",
            f"image declares {width} x {height} = {width * height} pixels, over the limit of {max_pixels} "
            "(raise max_pixels if such images are expected)",
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16-bit and 32-bit integer greyscale is scaled to 8 bits (PIL alone would clip
    it to white); float greyscale is clipped to 0..255; everything else is PIL's own conversion, as
    upstream's processor does (alpha is dropped, not composited)."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY_DIVISOR:
        values = np.asarray(image, dtype=np.float64) / _WIDE_GREY_DIVISOR[image.mode]
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        # PIL wants palette transparency resolved through RGBA before dropping alpha
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> an oriented RGB image (first frame of animations and multi-page files)."""
    image = _open(data, max_pixels)
    fmt = image.format or "image"  # exif_transpose returns a new image without a format
    try:
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        image.load()
        return to_rgb(image)
    except _CORRUPT as err:
        raise _corrupt(err, fmt) from err


def resized(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An RGB image -> uint8 [height, width, 3] at the model's input size (PIL's filter, as upstream).

    What travels from CPU workers to the model: a quarter of the float pixels' bytes, and exact, since
    upstream also resizes the 8-bit image before rescaling."""
    if config.do_resize:
        image = image.resize((config.width, config.height), resample=Image.Resampling(config.resample))
    return np.array(image, dtype=np.uint8)  # writable: torch.from_numpy warns on read-only arrays


def normalize(
    pixels: torch.Tensor,
    config: PreprocessConfig,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 [batch, height, width, 3] -> [batch, 3, height, width] rescaled and normalised in float32 (on
    whatever device `pixels` is on), then cast to `dtype` and laid out in `memory_format`."""
    values = pixels.permute(0, 3, 1, 2).to(torch.float32)
    if config.do_rescale:
        values = values * config.rescale_factor
    if config.do_normalize:
        mean = torch.tensor(config.image_mean, dtype=torch.float32, device=values.device).view(1, 3, 1, 1)
        std = torch.tensor(config.image_std, dtype=torch.float32, device=values.device).view(1, 3, 1, 1)
        values = (values - mean) / std
    return values.to(dtype).contiguous(memory_format=memory_format)


def pixel_values(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An RGB image -> float32 [3, height, width] as ViTImageProcessor computes it."""
    return normalize(torch.from_numpy(resized(image, config))[None], config)[0].numpy()


def preprocess(
    data: bytes, config: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS
) -> PreprocessedImage:
    """Encoded bytes -> model input and source size; raises ImageDecodeError with a readable message."""
    image = decode(data, max_pixels)
    return PreprocessedImage(pixel_values(image, config), image.width, image.height)


def error_texts(column: np.ndarray) -> list[str | None]:
    """A batch's `error` column as text or None: Ray hands an all-null column over as float NaNs."""
    return [value if isinstance(value, str) else None for value in column]


def cpu_pixels(data: bytes, config: PreprocessConfig, max_pixels: int) -> tuple[np.ndarray, int, int]:
    """Bytes -> (uint8 pixels at the model's size, source width, source height); every failure, a decoder
    bug included, is an ImageDecodeError, so that one file never ends a run."""
    try:
        image = decode(data, max_pixels)
        return resized(image, config), image.width, image.height
    except ImageDecodeError:
        raise
    except Exception as err:
        raise ImageDecodeError("undecodable", f"{type(err).__name__}: {err}") from err


def error_text(err: ImageDecodeError) -> str:
    """The `error` column's text for a file that did not decode; its kind is what error counts group by."""
    return f"ImageDecodeError({err.kind}): {err}"


class JpegHeader(NamedTuple):
    width: int  # after EXIF orientation, as the CPU path reports it
    height: int
    orientation: int  # EXIF orientation, 1 (as stored) to 8


def device_decodable(data: bytes, max_pixels: int) -> JpegHeader | None:
    """The header of a JPEG that a GPU decoder takes (baseline or extended sequential, 8-bit, greyscale or
    YCbCr/RGB, one frame), else None: progressive and CMYK JPEGs, other formats and anything that does not
    open go the CPU path, which also gives broken files their error text. Reads the header only."""
    try:
        image = _open(data, max_pixels)
        if image.format != "JPEG" or image.mode not in ("RGB", "L") or image.info.get("progressive"):
            return None
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a header PIL cannot read is for the CPU path to report
        return None
    if orientation not in range(1, 9):
        orientation = 1  # PIL's exif_transpose ignores values outside the standard's eight, as here
    width, height = image.size
    if orientation >= 5:  # the orientations that turn the image by 90 degrees
        width, height = height, width
    return JpegHeader(width, height, orientation)


def decode_batch(
    batch: dict[str, np.ndarray], config: PreprocessConfig, max_pixels: int, jpegs_to_device: bool = False
) -> dict[str, np.ndarray]:
    """The pipeline's CPU stage: `(key, data, error)` rows -> `(key, pixels, width, height, error)`.

    Rows that fail keep their place with zero pixels, size 0 and the error text, so every image reaches
    the output as exactly one row. With `jpegs_to_device`, JPEGs that a GPU decoder takes are only looked
    at: they keep their bytes in a `data` column (None for the others) and their EXIF orientation in an
    `orientation` column, and are decoded next to the model."""
    keys, datas, errors = batch["key"], batch["data"], error_texts(batch["error"])
    pixels = np.zeros((len(keys), config.height, config.width, 3), dtype=np.uint8)
    sizes = np.zeros((len(keys), 2), dtype=np.int32)
    passed = np.full(len(keys), None, dtype=object)
    orientations = np.ones(len(keys), dtype=np.int8)
    for i, data in enumerate(datas):
        if errors[i] is not None:
            continue
        data = bytes(data) if data is not None else b""
        header = device_decodable(data, max_pixels) if jpegs_to_device else None
        if header is not None:
            passed[i] = data
            sizes[i] = header.width, header.height
            orientations[i] = header.orientation
            continue
        try:
            pixels[i], width, height = cpu_pixels(data, config, max_pixels)
            sizes[i] = width, height
        except ImageDecodeError as err:
            errors[i] = error_text(err)
    decoded = {
        "key": keys,
        "pixels": pixels,
        "width": sizes[:, 0],
        "height": sizes[:, 1],
        "error": np.array(errors, dtype=object),
    }
    return decoded | {"data": passed, "orientation": orientations} if jpegs_to_device else decoded
