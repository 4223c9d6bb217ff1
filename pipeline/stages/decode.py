"""The CPU decoding stage: encoded bytes -> uint8 pixels at the model's size, in Ray tasks beside the
inference actors. Every row comes out, failed ones as error rows; with a `device_share` a share of the
JPEGs a GPU decoder takes are passed on as bytes for the actor to decode (`pipeline/gpu_decoding.py`).
"""

from __future__ import annotations

import zlib

import numpy as np
import ray

from dinat_batch.pipeline.errors import error_column
from dinat_batch.pipeline.images import ImageDecodeError, cpu_pixels, device_decodable
from dinat_batch.pipeline.model.preprocessing import PreprocessConfig
from dinat_batch.pipeline.stages import CPU_TASK, Stage

STAGE = Stage(
    "decode",
    consumes=("key", "data", "error"),
    produces=("key", "pixels", "width", "height", "error"),
    resources=CPU_TASK,
    may_produce=("data", "orientation"),  # with a device share
)
BATCH = 16  # images per decode task call: small enough to spread over cores, big enough to amortise


def to_device(key: str, share: float) -> bool:
    """Whether the image `key` is among the `share` of JPEGs decoded on the GPU. Chosen by a hash of the
    key, not at random, so that a rerun decodes each image where it did before (the two decoders' pixels
    differ by a few levels), and a larger share takes the keys of a smaller one."""
    return zlib.crc32(key.encode()) < share * 2**32


def decode_batch(
    batch: dict[str, np.ndarray], config: PreprocessConfig, max_pixels: int, device_share: float = 0.0
) -> dict[str, np.ndarray]:
    """`(key, data, error)` rows -> `(key, pixels, width, height, error)`: `pixels` uint8 [n, height, width,
    3] at the model's size.

    Rows that fail keep their place with zero pixels, size 0 and the error text, so every image reaches
    the output as exactly one row. With a `device_share`, that share of the JPEGs a GPU decoder takes
    (`to_device`) are only looked at: they keep their bytes in a `data` column (None for the others) and
    their EXIF orientation in an `orientation` column, and are decoded next to the model. Each row then
    carries either its JPEG or its pixels, not both: `pixels` holds each row's pixel bytes (see
    `host_pixels`), empty for rows sent on as JPEG and for errors, so that ~150 KB of zeros per JPEG do not
    travel through the object store."""
    keys, datas, errors = batch["key"], batch["data"], error_column(batch["error"])
    pixels = np.zeros((len(keys), config.height, config.width, 3), dtype=np.uint8)
    sizes = np.zeros((len(keys), 2), dtype=np.int32)
    passed = np.full(len(keys), None, dtype=object)
    orientations = np.ones(len(keys), dtype=np.int8)
    for i, data in enumerate(datas):
        if errors[i] is not None:
            continue
        data = bytes(data) if data is not None else b""
        header = (
            device_decodable(data, max_pixels) if device_share and to_device(keys[i], device_share) else None
        )
        if header is not None:
            passed[i] = data
            sizes[i] = header.width, header.height
            orientations[i] = header.orientation
            continue
        try:
            pixels[i], width, height = cpu_pixels(data, config, max_pixels)
            sizes[i] = width, height
        except ImageDecodeError as err:
            errors[i] = err.text()
    if device_share:
        # an object array: numpy's fixed-width bytes would drop each row's trailing zero bytes
        decoded = [e is None and p is None for e, p in zip(errors, passed, strict=True)]
        as_bytes = [p.tobytes() if row else b"" for p, row in zip(pixels, decoded, strict=True)]
        pixels = np.empty(len(keys), dtype=object)
        pixels[:] = as_bytes
    decoded = {
        "key": keys,
        "pixels": pixels,
        "width": sizes[:, 0],
        "height": sizes[:, 1],
        "error": np.array(errors, dtype=object),
    }
    return decoded | {"data": passed, "orientation": orientations} if device_share else decoded


def host_pixels(column: np.ndarray, rows: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The pixels of `rows` (a boolean mask) as uint8 [n, height, width, 3], from either form of the
    `pixels` column: an array of pixels, or per row the bytes of one (with a device share)."""
    if column.dtype != object:
        # all rows valid is the common case: no copy of ~150 KB per image then (torch.from_numpy wants a
        # writable array)
        return column if rows.all() and column.flags.writeable else column[rows]
    chosen = column[rows]
    out = np.empty((len(chosen), *size, 3), dtype=np.uint8)  # writable, as torch.from_numpy wants
    for i, data in enumerate(chosen):
        out[i] = np.frombuffer(data, dtype=np.uint8).reshape(*size, 3)
    return out


def apply(
    dataset: ray.data.Dataset, config: PreprocessConfig, max_pixels: int, device_share: float
) -> ray.data.Dataset:
    return dataset.map_batches(
        decode_batch,
        batch_size=BATCH,
        batch_format="numpy",
        **STAGE.resources,
        fn_kwargs={"config": config, "max_pixels": max_pixels, "device_share": device_share},
    )
