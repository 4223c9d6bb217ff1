"""`load_model`: checkpoint files -> a ready DiNAT module, with provenance attached."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from dinat_batch.pipeline.model.dinat import Dinat, DinatConfig
from dinat_batch.pipeline.model.files import ModelLoadError, resolve
from dinat_batch.pipeline.model.preprocessing import PreprocessConfig

_BACKBONE_PREFIX = "dinat."
_CLASSIFIER_PREFIX = "classifier."


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only, never code: safetensors, or torch.load with weights_only=True."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(
            f"could not read weights {path.name}: {type(err).__name__}: {err}. The file is corrupt or not a "
            "checkpoint; re-download it (pickled checkpoints with code in them are refused on purpose)"
        ) from err


def checkpoint_filter(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring `DinatModel` checkpoints (no `dinat.` prefix) to `DinatForImageClassification` names."""
    if any(k.startswith(_BACKBONE_PREFIX) for k in state_dict):
        return state_dict
    return {k if k.startswith(_CLASSIFIER_PREFIX) else _BACKBONE_PREFIX + k: v for k, v in state_dict.items()}


def _check_keys(model: Dinat, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    problems = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            shown = ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")
            problems.append(f"{len(items)} {title}: {shown}")
    if problems:
        raise ModelLoadError(
            f"{source}: the weights do not fit the architecture in its config.json ({'; '.join(problems)}). "
            "Check that config.json and the weights come from the same checkpoint"
        )


def load_model(
    source: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    compile: bool = False,
    storage_options: dict[str, Any] | None = None,
    revision: str | None = None,
) -> Dinat:
    """Load a DiNAT checkpoint in Hugging Face format from a hub id, a local folder or an fsspec URI.

    The returned module is in eval mode on `device` (default: CUDA when available) in `dtype` (default
    float32), with `.config`, `.source`, `.revision`, `.weights_sha256` and `.preprocessing` set. Its
    forward gives `.logits` (None for a backbone-only checkpoint) and `.embeddings`. `revision`: for a hub
    id, the branch, tag or commit to load (None: the default branch).
    """
    files = resolve(source, storage_options, revision)
    try:
        config = DinatConfig.model_validate(json.loads(files.config.read_text()))
        preprocessing = (
            PreprocessConfig.model_validate(json.loads(files.preprocessor_config.read_text()))
            if files.preprocessor_config
            else PreprocessConfig()
        )
    except (ValidationError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{source}: invalid checkpoint configuration: {err}") from err
    state_dict = checkpoint_filter(read_state_dict(files.weights))
    with_classifier = any(k.startswith(_CLASSIFIER_PREFIX) for k in state_dict)
    with torch.device("meta"):
        model = Dinat(config, with_classifier=with_classifier)
    _check_keys(model, state_dict, source)
    model.load_state_dict(state_dict, assign=True)
    model.source = source
    model.revision = files.revision
    model.weights_sha256 = sha256_file(files.weights)
    model.preprocessing = preprocessing
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False)
    if compile:
        model.compile()
    return model
