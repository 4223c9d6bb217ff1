"""The `dinat-batch` command line."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Batch inference for DiNAT image models.")

DEFAULT_MODEL = "shi-labs/dinat-mini-in1k-224"


def _storage_options(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"not valid JSON: {err}", param_hint="--storage-options") from err
    if not isinstance(options, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--storage-options")
    return options


def top_k(model, images: list[str], k: int, storage_options: dict[str, Any]) -> list[tuple[str, list | str]]:
    """(image, [(score, label id, label), ...]) per image, or (image, error message)."""
    import fsspec
    import torch

    from pipeline.preprocess import ImageDecodeError, preprocess

    device = next(model.parameters()).device
    results: list[tuple[str, list | str]] = []
    for uri in images:
        try:
            with fsspec.open(uri, "rb", **storage_options) as f:
                prepared = preprocess(f.read(), model.preprocessing)
        except (ImageDecodeError, OSError) as err:
            results.append((uri, f"{type(err).__name__}: {err}"))
            continue
        with torch.inference_mode():
            out = model(torch.from_numpy(prepared.pixel_values)[None].to(device))
        if out.logits is None:
            results.append(
                (uri, "the model is backbone-only (no classifier): it gives embeddings, not labels")
            )
            continue
        scores, ids = out.logits.float().softmax(-1)[0].topk(min(k, out.logits.shape[-1]))
        labels = model.config.id2label
        results.append(
            (uri, [(s, i, labels.get(i, str(i))) for s, i in zip(scores.tolist(), ids.tolist(), strict=True)])
        )
    return results


def _print_top_k(results: list[tuple[str, list | str]]) -> int:
    failures = 0
    for uri, result in results:
        typer.echo(uri)
        if isinstance(result, str):
            failures += 1
            typer.echo(f"  error: {result}")
            continue
        for score, label_id, label in result:
            typer.echo(f"  {score:7.4f}  {label} ({label_id})")
    return failures


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="image files or fsspec URIs (s3://bucket/key.jpg)")],
    model: Annotated[
        str, typer.Option(help="hub id, local folder or fsspec URI of an HF checkpoint")
    ] = DEFAULT_MODEL,
    top: Annotated[int, typer.Option("--top-k", min=1, help="labels to print per image")] = 5,
    storage_options: Annotated[
        str | None, typer.Option(help="JSON fsspec options for the images and the model, e.g. an endpoint")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda; default: cuda when available")] = None,
) -> None:
    """Print the top-k labels and scores of each image: the model card's snippet, working."""
    from pipeline.model import ModelLoadError, load_model

    options = _storage_options(storage_options)
    try:
        loaded = load_model(model, device=device, storage_options=options)
    except ModelLoadError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    failures = _print_top_k(top_k(loaded, images, top, options))
    if failures:
        raise typer.Exit(1)


def _demo_model(workdir: Path):
    """The real dinat-mini when the hub (or its cache) has it; otherwise random weights, said plainly."""
    from pipeline.model import ModelLoadError, load_model
    from pipeline.model.export import random_model, save_checkpoint

    try:
        return load_model(DEFAULT_MODEL), DEFAULT_MODEL
    except ModelLoadError as err:
        typer.secho(
            f"note: {DEFAULT_MODEL} is not reachable ({str(err).split('. Pass')[0]}).\n"
            "      Continuing with a RANDOMLY INITIALISED dinat-mini: its labels below are meaningless.",
            fg=typer.colors.YELLOW,
        )
        folder = save_checkpoint(random_model("dinat-mini-in1k-224"), workdir / "dinat-mini-random")
        model = load_model(str(folder))
        return model, "dinat-mini (random weights)"


def demo_images() -> dict[str, bytes]:
    """A small generated image set plus broken files; nothing is downloaded."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    images: dict[str, bytes] = {}
    for n in range(4):
        image = Image.new("RGB", (320 + 40 * n, 240), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = (int(v) for v in rng.integers(0, 300, 2))
            draw.ellipse((x, y, x + 60, y + 40), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        image.save(buf, format="JPEG" if n % 2 == 0 else "PNG")
        images[f"photo-{n}.{'jpg' if n % 2 == 0 else 'png'}"] = buf.getvalue()
    images["empty.jpg"] = b""
    images["text-pretending.jpg"] = b"this is not an image"
    images["truncated.jpg"] = images["photo-0.jpg"][:700]
    return images


@app.command()
def demo() -> None:
    """Start a local S3 server, upload sample images, and classify them from s3:// with dinat-mini."""
    from infra.object_store import LocalObjectStore

    with tempfile.TemporaryDirectory(prefix="dinat-demo-") as tmp, LocalObjectStore() as store:
        typer.echo(f"local S3 (SeaweedFS) on {store.endpoint}")
        store.make_bucket("demo")
        fs = store.filesystem()
        uris = []
        for name, data in demo_images().items():
            fs.pipe(f"demo/images/{name}", data)
            uris.append(f"s3://demo/images/{name}")
        typer.echo(f"uploaded {len(uris)} images (3 of them broken on purpose) to s3://demo/images/")
        model, label = _demo_model(Path(tmp))
        typer.echo(f"model: {label}, weights sha256 {model.weights_sha256[:16]}...\n")
        failures = _print_top_k(top_k(model, uris, 5, store.storage_options))
        typer.echo(f"\n{len(uris) - failures} images classified, {failures} readable errors, nothing lost")
