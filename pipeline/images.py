"""Encoded image bytes -> pixels at the model's input size, exactly as the checkpoint's
`preprocessor_config.json` says (the decoding library; the Ray stage that runs it is `pipeline/stages/decode.py`).

ViTImageProcessor semantics: EXIF orientation, first frame, RGB conversion, resize straight to
height x width with the configured PIL filter (aspect ratio not kept, no crop), rescale, normalize.
Decoding and resizing run on CPU workers and give uint8 pixels; `normalize` runs where the model runs.
Also the header check that routes a JPEG to a GPU decoder (`device_decodable`). No torch at import: the
CPU workers that run the decode stage never load it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dinat_batch.pipeline.config import DEFAULT_MAX_PIXELS
from dinat_batch.pipeline.errors import error_text
from dinat_batch.pipeline.model.preprocessing import PreprocessConfig

# greyscale modes PIL cannot bring to RGB sensibly, and the divisor that brings them to 0..255
_WIDE_GREY_DIVISOR = {"I;16": 257.0, "I;16B": 257.0, "I;16L": 257.0, "I;16N": 257.0, "I": 257.0, "F": 1.0}


class ImageDecodeError(ValueError):
    """Bytes that do not decode to an image. `kind` names the failure for error counts."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def text(self) -> str:
        """The `error` column's text for the file."""
        return error_text(f"ImageDecodeError({self.kind})", str(self))


@dataclass(frozen=True)
class PreprocessedImage:
    pixel_values: np.ndarray  # float32 [3, height, width]
    width: int  # of the source image, after EXIF orientation
    height: int


_CORRUPT = (OSError, SyntaxError, ValueError, EOFError)
_EXIF_ORIENTATION = 0x0112


def _corrupt(err: Exception, fmt: str) -> ImageDecodeError:
    message = str(err)
    kind = "truncated" if "truncated" in message.lower() or isinstance(err, EOFError) else "undecodable"
    return ImageDecodeError(kind, f"{fmt} data is corrupt: {message}")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header, checked against `max_pixels`; its pixels are not decoded yet."""
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
    image = open_image(data, max_pixels)
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


def pixel_values(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An RGB image -> float32 [3, height, width] as ViTImageProcessor computes it."""
    # torch only here: the CPU decode workers import this module and, without it, never load torch
    import torch

    from dinat_batch.pipeline.model.runtime import normalize

    return normalize(torch.from_numpy(resized(image, config))[None], config)[0].numpy()


def preprocess(
    data: bytes, config: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS
) -> PreprocessedImage:
    """Encoded bytes -> model input and source size; raises ImageDecodeError with a readable message."""
    image = decode(data, max_pixels)
    return PreprocessedImage(pixel_values(image, config), image.width, image.height)


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


class JpegHeader(NamedTuple):
    width: int  # after EXIF orientation, as the CPU path reports it
    height: int
    orientation: int  # EXIF orientation, 1 (as stored) to 8


def device_decodable(data: bytes, max_pixels: int) -> JpegHeader | None:
    """The header of a JPEG that a GPU decoder takes (baseline or extended sequential, 8-bit, greyscale or
    YCbCr/RGB, one frame), else None: progressive and CMYK JPEGs, other formats and anything that does not
    open go the CPU path, which also gives broken files their error text. Reads the header only."""
    if data[-64:].rstrip(b"\x00")[-2:] != b"\xff\xd9":
        # no end-of-image marker: cut short (nvJPEG may decode a damaged scan without complaint), or data
        # after the image; the CPU path tells which and gives a cut-short file its error row
        return None
    try:
        image = open_image(data, max_pixels)
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
