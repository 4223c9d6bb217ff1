"""A few images classified without Ray, through the pipeline's own decoding and model step: what
`dinat-batch predict` prints and what a notebook calls."""

from __future__ import annotations

from typing import Any

from dinat_batch.pipeline.config import DEFAULT_MAX_PIXELS
from dinat_batch.pipeline.errors import read_error
from dinat_batch.pipeline.images import ImageDecodeError, cpu_pixels
from dinat_batch.pipeline.locations import filesystem
from dinat_batch.pipeline.model import Dinat
from dinat_batch.pipeline.model.runtime import Runner, label_names
from dinat_batch.pipeline.objects import read_object


def top_k(
    model: Dinat, images: list[str], k: int = 5, storage_options: dict[str, Any] | None = None
) -> list[tuple[str, list | str]]:
    """(image, [(score, label id, label), ...]) per image, or (image, error text as the output's `error`
    column has it); the same decoding and model step as the pipeline's, one image at a time."""
    runner = Runner(model, compile="off", batch_size=1, top_k=k)
    names = label_names(model.config)
    results: list[tuple[str, list | str]] = []
    for uri in images:
        try:
            # images the user names on the command line: no list of allowed places to leave
            fs, path = filesystem(uri, storage_options or {}, redirects=True)
            data = read_object(fs, path)
        except OSError as err:
            results.append((uri, read_error(uri, err)))
            continue
        try:
            pixels, _, _ = cpu_pixels(data, model.preprocessing, DEFAULT_MAX_PIXELS)
        except ImageDecodeError as err:
            results.append((uri, err.text()))
            continue
        _, scores, ids = runner(pixels[None])
        if ids is None:
            results.append(
                (uri, "the model is backbone-only (no classifier): it gives embeddings, not labels")
            )
            continue
        results.append((uri, list(zip(scores[0].tolist(), ids[0].tolist(), names[ids[0]], strict=True))))
    return results
