"""Where a checkpoint's files come from: a local folder, an fsspec URI (cached locally), or the HF hub.

A checkpoint is a folder in Hugging Face layout: `config.json`, optional `preprocessor_config.json`, and
weights as `model.safetensors` (preferred) or `pytorch_model.bin`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

CONFIG = "config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class ModelLoadError(RuntimeError):
    """The model could not be found, fetched or loaded; the message says what to do next."""


@dataclass(frozen=True)
class CheckpointFiles:
    """`revision`: the hub commit the files are from (None for other sources)."""

    source: str
    config: Path
    weights: Path
    preprocessor_config: Path | None
    revision: str | None = None


def cache_root() -> Path:
    return Path(os.environ.get("DINAT_BATCH_CACHE", Path.home() / ".cache" / "dinat-batch")) / "models"


def _from_folder(source: str, folder: Path, names: tuple[str, ...]) -> CheckpointFiles:
    if not (folder / CONFIG).is_file():
        raise ModelLoadError(
            f"{source}: no {CONFIG} in {folder}; a checkpoint folder needs {CONFIG} and weights"
        )
    weights = next((folder / name for name in names if (folder / name).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"{source}: no weights in {folder}; expected one of {', '.join(names)}")
    pre = folder / PREPROCESSOR_CONFIG
    return CheckpointFiles(source, folder / CONFIG, weights, pre if pre.is_file() else None)


def _from_fsspec(uri: str, storage_options: dict[str, Any], names: tuple[str, ...]) -> CheckpointFiles:
    """Download once into a cache folder keyed by the remote objects' identity (ETag or checksum)."""
    fs, root = fsspec.core.url_to_fs(uri.rstrip("/"), **storage_options)
    fs.invalidate_cache()  # fsspec reuses filesystem instances with their listings: always ask afresh
    try:
        present = {Path(p).name for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        present = set()
    weights = next((name for name in names if name in present), None)
    if CONFIG not in present or weights is None:
        raise ModelLoadError(
            f"{uri}: expected {CONFIG} and one of {', '.join(names)} under this prefix, found "
            f"{sorted(present) or 'nothing'}; check the URI and the storage credentials"
        )
    fetched = [CONFIG, weights] + ([PREPROCESSOR_CONFIG] if PREPROCESSOR_CONFIG in present else [])
    identity = json.dumps([uri] + [(n, fs.ukey(f"{root}/{n}")) for n in fetched])
    folder = cache_root() / hashlib.sha256(identity.encode()).hexdigest()[:24]
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".partial-"))
        try:
            for name in fetched:
                fs.get_file(f"{root}/{name}", str(staging / name))
            staging.rename(folder)  # atomic: a crashed download never looks complete
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not folder.is_dir():  # another process may have won the race
                raise
    return _from_folder(uri, folder, (weights,))


def _from_hub(repo_id: str, revision: str | None, names: tuple[str, ...]) -> CheckpointFiles:
    """Through huggingface_hub, which honours HF_HOME, HF_HUB_OFFLINE and HF_TOKEN. `revision`: a branch,
    tag or commit (None: the default branch); all files come from the commit the config file resolved to,
    so that a push between two downloads cannot pair one commit's config with another's weights."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    offline = constants.HF_HUB_OFFLINE

    def fetch_first(names: tuple[str, ...]) -> Path | None:
        """The first of `names` the repository (offline: the cache) has at `revision`. A hub that could not
        be asked is an error, not a file it lacks: another weight file, or no preprocessor config, would be
        another checkpoint than the one the driver pinned."""
        for name in names:
            try:
                return Path(huggingface_hub.hf_hub_download(repo_id, name, revision=revision))
            except EntryNotFoundError as err:
                if isinstance(err, LocalEntryNotFoundError) and not offline:
                    raise
        return None

    try:
        config = Path(huggingface_hub.hf_hub_download(repo_id, CONFIG, revision=revision))
        # the hub's cache keeps each commit's files in snapshots/<commit>/
        if _COMMIT.match(config.parent.name):
            revision = config.parent.name
        weights = fetch_first(names)
        preprocessor_config = fetch_first((PREPROCESSOR_CONFIG,))
    except (EntryNotFoundError, OSError, ValueError) as err:
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else f"{type(err).__name__}: {err}"
        )
        raise ModelLoadError(
            f"could not get {repo_id!r} from the Hugging Face hub ({why}). Pass a local copy instead: "
            "a folder or an fsspec URI (s3://bucket/models/...) holding config.json and model.safetensors "
            f"or pytorch_model.bin, e.g. made with `hf download {repo_id} --local-dir DIR`"
        ) from err
    if weights is None:
        raise ModelLoadError(f"hub repository {repo_id!r} has none of the weight files {', '.join(names)}")
    return CheckpointFiles(repo_id, config, weights, preprocessor_config, revision)


def resolve(
    source: str,
    storage_options: dict[str, Any] | None = None,
    revision: str | None = None,
    weights: str | None = None,
) -> CheckpointFiles:
    """Find a checkpoint's files locally, downloading them first when they live elsewhere. `revision`: for
    a hub id, the branch, tag or commit to take (None: the default branch); other sources have none.
    `weights`: the weight file to take (None: the first of WEIGHT_FILES there is)."""
    names = (weights,) if weights else WEIGHT_FILES
    if "://" in source:
        if source.startswith("file://"):
            return _from_folder(source, Path(source[len("file://") :]), names)
        return _from_fsspec(source, storage_options or {}, names)
    path = Path(source).expanduser()
    if path.exists():
        return _from_folder(source, path, names)
    if _HUB_ID.match(source):
        return _from_hub(source, revision, names)
    raise ModelLoadError(
        f"model source {source!r} is neither an existing folder, an fsspec URI (s3://...) nor a hub id (org/name)"
    )
