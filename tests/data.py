"""Test inputs made on the fly: a tiny DiNAT checkpoint, small photos, broken files, tar shards, tables."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from dinat_batch.pipeline.images import preprocess
from dinat_batch.pipeline.model import load_model
from dinat_batch.pipeline.model.dinat import DinatConfig
from dinat_batch.pipeline.model.export import random_model, save_checkpoint
from dinat_batch.pipeline.model.preprocessing import PreprocessConfig

# four stages of one layer each at 64 x 64 input: a full DiNAT forward in milliseconds
TINY = DinatConfig(
    embed_dim=16,
    depths=[1, 1, 1, 1],
    num_heads=[1, 2, 4, 8],
    dilations=[[1], [2], [1], [1]],
    id2label={i: f"class-{i}" for i in range(12)},
)
TINY_INPUT = PreprocessConfig(size=64)
MAX_PIXELS = 1_000_000  # the runs' pixel limit, so that `huge.png` is a decompression bomb cheaply


def tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    return save_checkpoint(random_model(TINY, seed=seed), folder, preprocessing=TINY_INPUT)


def photo(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (72, 56)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def photos(count: int, start: int = 0) -> dict[str, bytes]:
    return {
        f"photo-{i:03d}.{'jpg' if i % 2 == 0 else 'png'}": photo(i, "JPEG" if i % 2 == 0 else "PNG")
        for i in range(start, start + count)
    }


def image_folder(folder: Path, count: int, extra: dict[str, bytes] | None = None) -> Path:
    """A local folder of `count` photos plus `extra` files; returns it."""
    folder.mkdir()
    for name, data in {**photos(count), **(extra or {})}.items():
        (folder / name).write_bytes(data)
    return folder


def broken_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the error kind the row must carry)."""
    bomb = io.BytesIO()
    Image.new("L", (2000, 2000)).save(bomb, format="PNG")  # 4 megapixels in a few kB
    return {
        "empty.jpg": (b"", "ImageDecodeError(empty)"),
        "truncated.jpg": (photo(99)[:400], "ImageDecodeError(truncated)"),
        "text.jpg": (b"this is not an image at all", "ImageDecodeError(undecodable)"),
        "huge.png": (bomb.getvalue(), "ImageDecodeError(too_large)"),
    }


def tar_shard(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parquet_file(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def direct_predictions(
    model_folder: Path, images: dict[str, bytes], top_k: int = 5, max_pixels: int = MAX_PIXELS
) -> dict[str, tuple]:
    """key -> (label ids, scores, embedding) from the eager model on ViTImageProcessor's float pixels, one
    image at a time: the plain reference the pipeline's batched, compiled and padded paths must match."""
    model = load_model(str(model_folder), device="cpu")
    results = {}
    for key, data in images.items():
        pixels = torch.from_numpy(preprocess(data, model.preprocessing, max_pixels).pixel_values)[None]
        with torch.inference_mode():
            out = model(pixels)
        scores, ids = out.logits.softmax(-1)[0].topk(top_k)
        results[key] = (ids.tolist(), scores.numpy(), out.embeddings[0].numpy())
    return results
