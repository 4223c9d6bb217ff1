"""Decoding next to the model: JPEGs decoded by nvJPEG on the GPU, oriented and resized there, so that their
pixels never cross to the host and the CPU workers only read their headers.

The CPU stage (`pipeline/stages/decode.py`) reads the headers of the share of JPEGs the plan sends to the
GPU (`run._device_share`; by default `default_share`: where the cluster has few CPUs per GPU) and sends
on the bytes of those a GPU decoder takes (`images.device_decodable`); everything else arrives decoded.
Whatever nvJPEG still rejects is decoded here by the CPU path, one image at a time, so one bad image never
fails a batch. The pixels differ from the CPU path's by ~2 levels of 255 on average and by up to ~60 at
sharp colour edges (measured on an H200: nvJPEG decodes differently from libjpeg-turbo; the resize adds
~0.2), and go through the same `normalize`.
"""

from __future__ import annotations

import importlib.util
import io
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from dinat_batch.pipeline.images import ImageDecodeError, cpu_pixels, open_image
from dinat_batch.pipeline.model.preprocessing import PreprocessConfig

# PIL filters that torch's antialiased interpolation reproduces (within rounding); the others stay on the CPU
RESAMPLE_MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}
# Encoded bytes (1-D uint8 CPU tensors) -> per image a uint8 [3, height, width] tensor on the device as
# stored in the file (no EXIF orientation), or the exception that rejected it
JpegDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor | Exception]]
logger = logging.getLogger(__name__)
# device memory one GPU decoding chunk may take at its peak: a full 1024-image batch of 12 MP photos would
# otherwise need ~37 GB of decoded pixels at once, and six times that while resizing
DECODE_BUDGET = 2**30
# per source pixel at that peak: RGB as decoded (3 bytes), stacked by size (3) and as float to resize (12)
PEAK_BYTES_PER_PIXEL = 18
# CPUs per GPU from which the CPUs alone keep an H200 running dinat-mini, the fastest DiNAT, busier than
# any share of nvJPEG (whose time on the GPU the model loses): a threshold between the 8 and 12 measured,
# fitted to the third lease's runs (benchmarks/RESULTS.md), 500 x 375 JPEGs: the CPUs alone gave 0.98 of
# the bare rate at 16 CPUs and 0.95 at 12, more than the shares tried (0.83 at 12 with 10%); at 8, a
# quarter on the GPU gave 0.88, the CPUs alone 0.51. Larger photos cost the CPUs more per image.
CPUS_PER_GPU = 11


def unsupported(config: PreprocessConfig, device: str) -> str | None:
    """None when JPEGs of this preprocessing can be decoded by actors on `device`, else why not. Whether
    the actors' environment has nvJPEG is for them to find out (`probe`)."""
    if device != "cuda":
        return f"decoding on the GPU needs GPU inference actors (the actors run on {device})"
    if not config.do_resize or config.resample not in RESAMPLE_MODES:
        return (
            f"the checkpoint's resample filter {Image.Resampling(config.resample).name} has no GPU "
            "equivalent (bilinear and bicubic have)"
        )
    return None


def default_share(cpus: float, gpus: float) -> float:
    """The share of JPEGs sent to the GPUs by default (`decode: auto`), an empirical fit: none from
    `CPUS_PER_GPU` CPUs per GPU up, growing as the CPUs get fewer. nvJPEG's decoding takes the GPU's time
    from the model, so a cluster with enough CPUs decodes everything on them; one that has no GPU yet (an
    autoscaler's) too."""
    return max(0.0, 1 - cpus / (gpus * CPUS_PER_GPU)) if gpus else 0.0


def bisected(decode_many: Callable[[list], list], items: list) -> list:
    """`decode_many(items)`, splitting a batch it refuses (a bad image, or out of memory) in halves down to
    the images it refuses, which come back as their exceptions: one bad image among n costs about
    2 log2(n) calls, not n."""
    try:
        return list(decode_many(items))
    except RuntimeError as err:  # torch.OutOfMemoryError is one too
        if len(items) == 1:
            return [err]
        half = len(items) // 2
        return bisected(decode_many, items[:half]) + bisected(decode_many, items[half:])


def nvjpeg(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """torchvision's batched nvJPEG decode, bisecting batches it refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return bisected(lambda part: decode_jpeg(part, mode=ImageReadMode.RGB, device=device), datas)


def probe(device: torch.device) -> str | None:
    """None when nvJPEG decodes on `device` in this process (the actor's, where it will run), else why
    not: the driver's environment says nothing about the workers'."""
    if importlib.util.find_spec("torchvision") is None:
        return (
            "torchvision (nvJPEG) is not installed on the inference workers: pip install 'dinat-batch[gpu]'"
        )
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buffer, "JPEG")
    try:
        result = nvjpeg([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)], device)[0]
    except Exception as err:  # a torchvision built for another torch, its extension missing, ...
        result = err
    if not isinstance(result, torch.Tensor):
        return f"nvJPEG does not decode on {device}: {result!r}"
    return None


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """[C, H, W] as stored -> as PIL's `exif_transpose` turns it for EXIF orientation 1-8."""
    if orientation in (5, 6, 7, 8):  # the transposing ones: transpose, then flip as 2, 3 and 4 do
        image = image.transpose(1, 2)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    flips = {1: (), 2: (2,), 3: (1, 2), 4: (1,)}[orientation]
    return image.flip(flips) if flips else image


class DeviceDecoder:
    """Encoded JPEGs -> uint8 [n, height, width, 3] on `device` at the model's input size, plus an error
    text (or None) per image. With `jpeg=None` (no GPU decoder in this process) every image takes the
    CPU fallback: slower, never wrong.

    Images are decoded in chunks of at most `budget` bytes of device memory at their peak
    (PEAK_BYTES_PER_PIXEL x width x height each, sizes known from the headers the CPU stage read), so that a batch of large photos never needs its full-resolution
    pixels on the device at once; a chunk that runs out of memory is split."""

    def __init__(
        self,
        config: PreprocessConfig,
        device: torch.device,
        max_pixels: int,
        jpeg: JpegDecoder | None = nvjpeg,
        budget: int = DECODE_BUDGET,
    ):
        if jpeg is not None and config.resample not in RESAMPLE_MODES:
            raise ValueError(unsupported(config, "cuda"))
        self.config = config
        self.device = device
        self.max_pixels = max_pixels
        # None for filters torch has no match for: then no image reaches `_resize`, all take the CPU path
        self.mode = RESAMPLE_MODES.get(config.resample)
        self.jpeg = jpeg
        self.budget = budget
        self.fallbacks = 0  # images the GPU decoder refused, decoded (or failed) on the CPU instead
        self._warned = False

    def __call__(
        self, datas: Sequence[bytes], orientations: Sequence[int], areas: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, list[str | None]]:
        """`areas`: width x height of each image (default: read from the headers here)."""
        n, config = len(datas), self.config
        out = torch.zeros(n, config.height, config.width, 3, dtype=torch.uint8, device=self.device)
        errors: list[str | None] = [None] * n
        if areas is None:
            areas = [_area(data, self.max_pixels) for data in datas]
        refused = 0
        for chunk in _chunks([PEAK_BYTES_PER_PIXEL * int(area) for area in areas], self.budget):
            refused += self._decode(chunk, datas, orientations, out, errors)
        if self.jpeg is not None and n > 1 and refused == n and not self._warned:
            # nvJPEG missing from this torchvision build, or the GPU out of decoder memory: slow, not wrong
            logger.warning("the GPU decoder refused a whole batch of %d JPEGs; the CPU decodes them", n)
            self._warned = True
        return out, errors

    def _decode(self, chunk, datas, orientations, out: torch.Tensor, errors: list[str | None]) -> int:
        """Decode the images `chunk` indexes into `out` (errors into `errors`); returns how many the GPU
        decoder refused."""
        if self.jpeg is None:
            images = [None] * len(chunk)
        else:
            encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in chunk]
            images = self.jpeg(encoded, self.device)
        by_size: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        fallback = []
        for i, image in zip(chunk, images, strict=True):
            if isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3:
                image = orient(image, orientations[i])
                by_size.setdefault(tuple(image.shape[1:]), []).append((i, image))
            else:
                fallback.append(i)
        del images
        for group in by_size.values():
            # photos from one camera share a size: one interpolation call per size, not per image
            fallback += self._resize_into(out, group)
        for i in fallback:
            self.fallbacks += 1
            try:
                pixels, _, _ = cpu_pixels(datas[i], self.config, self.max_pixels)
                out[i] = torch.from_numpy(pixels).to(self.device)
            except ImageDecodeError as err:
                errors[i] = err.text()
        return len(fallback)

    def _resize_into(self, out: torch.Tensor, group: list[tuple[int, torch.Tensor]]) -> list[int]:
        """Resize a group of same-size images into their rows of `out`, halving the group when that runs
        out of memory; returns the images that did not fit even alone (for the CPU)."""
        try:
            index = torch.tensor([i for i, _ in group], device=self.device)
            out[index] = self._resize(torch.stack([image for _, image in group]))
            return []
        except torch.OutOfMemoryError:
            pass  # split below, once the failed attempt's buffers have gone with its frame
        if len(group) == 1:
            return [group[0][0]]
        half = len(group) // 2
        return self._resize_into(out, group[:half]) + self._resize_into(out, group[half:])

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, h, w] -> uint8 [n, height, width, 3], rounded to 8 bits as PIL's resize is."""
        size = (self.config.height, self.config.width)
        if tuple(images.shape[2:]) != size:
            values = F.interpolate(images.float(), size=size, mode=self.mode, antialias=True)
            images = values.round_().clamp_(0, 255).to(torch.uint8)
        return images.permute(0, 2, 3, 1)


def _area(data: bytes, max_pixels: int) -> int:
    try:
        width, height = open_image(data, max_pixels).size
    except Exception:  # the decoder will refuse it, and the CPU path says why
        return 0
    return width * height


def _chunks(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive index runs whose sizes add up to at most `budget` (a larger one alone)."""
    chunks: list[list[int]] = []
    total = budget + 1
    for i, size in enumerate(sizes):
        if total + size > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += size
    return chunks
