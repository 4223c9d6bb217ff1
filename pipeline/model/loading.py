"""`load_model`: checkpoint files -> a ready DiNAT module, with provenance attached."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from dinat_batch.pipeline.model.dinat import Dinat, DinatConfig
from dinat_batch.pipeline.model.files import ModelLoadError, resolve
from dinat_batch.pipeline.model.preprocessing import PreprocessConfig

_BACKBONE_PREFIX = "dinat."
_CLASSIFIER_PREFIX = "classifier."


class ModelPin(BaseModel):
    """The checkpoint a run's model check loaded, which each of its actors loads in turn: the hub commit
    (None for other sources), the weight file's name and a digest of what was read (`checkpoint_sha256`)."""

    model_config = ConfigDict(frozen=True)

    revision: str | None
    weights: str
    sha256: str


class ModelChanged(RuntimeError):
    """The checkpoint at a model's source is not the one a run pinned (`ModelPin`): replaced since."""


def checkpoint_sha256(config: bytes, preprocessor_config: bytes | None, weights_sha256: str) -> str:
    """One digest of the files that make a model's output: the architecture and label names, the
    preprocessing and the weights."""
    parts = [
        hashlib.sha256(config).hexdigest(),
        None if preprocessor_config is None else hashlib.sha256(preprocessor_config).hexdigest(),
    ]
    return hashlib.sha256(json.dumps([*parts, weights_sha256]).encode()).hexdigest()


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors only, never code: safetensors, or torch.load with weights_only=True; and the sha256 of the
    file they were read from. The file is hashed, then loaded into the process's own memory (safetensors'
    default maps the file, and its tensors then change with a file written over in place: a running
    actor's weights), and refused if it was replaced or written meanwhile, so that the digest is the
    tensors'. Reading it once for both would double a load's peak (1.5 GB against 0.77 GB for
    dinat-large)."""
    before = _identity(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), backend="pread")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(
            f"could not read weights {path.name}: {type(err).__name__}: {err}. The file is corrupt or not a "
            "checkpoint; re-download it (pickled checkpoints with code in them are refused on purpose)"
        ) from err
    if _identity(path) != before:
        raise ModelLoadError(f"{path}: the weights were replaced while they were read; load them again")
    return state, digest.hexdigest()


def _identity(path: Path) -> tuple[int, ...]:
    """What changes when a file is replaced (a new inode) or written (its size, its times: the change
    time even where the modification time is set back, as `cp -p` does)."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


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
    pin: ModelPin | None = None,
) -> Dinat:
    """Load a DiNAT checkpoint in Hugging Face format from a hub id, a local folder or an fsspec URI.

    The returned module is in eval mode on `device` (default: CUDA when available) in `dtype` (default
    float32), with `.config`, `.source`, `.pin`, `.weights_sha256` and `.preprocessing` set. Its forward
    gives `.logits` (None for a backbone-only checkpoint) and `.embeddings`. `pin`: the checkpoint to load,
    as an earlier load's `.pin` says (its hub commit and weight file); ModelChanged if the source holds
    another now.
    """
    files = resolve(source, storage_options, pin and pin.revision, pin and pin.weights)
    config_bytes = files.config.read_bytes()
    preprocessor_bytes = files.preprocessor_config.read_bytes() if files.preprocessor_config else None
    try:
        config = DinatConfig.model_validate(json.loads(config_bytes))
        preprocessing = (
            PreprocessConfig.model_validate(json.loads(preprocessor_bytes))
            if preprocessor_bytes is not None
            else PreprocessConfig()
        )
    except (ValidationError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{source}: invalid checkpoint configuration: {err}") from err
    state_dict, weights_sha256 = read_state_dict(files.weights)
    found = ModelPin(
        revision=files.revision,
        weights=files.weights.name,
        sha256=checkpoint_sha256(config_bytes, preprocessor_bytes, weights_sha256),
    )
    if pin is not None and found != pin:
        raise ModelChanged(
            f"{source}: its checkpoint is not the one the run started with (checkpoint_sha256 "
            f"{found.sha256[:12]} here, {pin.sha256[:12]} then): it was replaced at its source during the "
            "run, or this node has another copy. The actor refuses it, so that the run's rows come from one "
            "model. Replace a checkpoint only between runs, and run the same command again to use the new "
            "one (it asks for --overwrite where rows of the old one were written)"
        )
    state_dict = checkpoint_filter(state_dict)
    with_classifier = any(k.startswith(_CLASSIFIER_PREFIX) for k in state_dict)
    with torch.device("meta"):
        model = Dinat(config, with_classifier=with_classifier)
    _check_keys(model, state_dict, source)
    model.load_state_dict(state_dict, assign=True)
    model.source = source
    model.pin = found
    model.weights_sha256 = weights_sha256
    model.preprocessing = preprocessing
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device=device, dtype=dtype or torch.float32).eval().requires_grad_(False)
    if compile:
        model.compile()
    return model
