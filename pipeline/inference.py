"""The inference actor: the model loaded once per actor, batches of uint8 pixels (or JPEG bytes to decode on
the GPU) in, output rows out."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.model import load_model
from pipeline.model.runtime import CompileMode, Runner
from pipeline.preprocess import DEFAULT_MAX_PIXELS, error_texts
from pipeline.preprocess_gpu import DeviceDecoder, nvjpeg, unsupported
from pipeline.sink import output_schema

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
logger = logging.getLogger(__name__)


class Predictor:
    """Callable for `Dataset.map_batches(..., compute=ActorPoolStrategy(...))`.

    Rows whose `error` is set skip the model and come out as error rows; the others get top-k labels and
    scores and the pooled embedding. The model runs only on the valid rows, so one bad image costs nothing.
    Rows that arrive with bytes in `data` (see `preprocess.decode_batch`) are decoded on the model's device
    first; an image that fails there becomes an error row like any other.
    """

    def __init__(
        self,
        model: str,
        run_id: str,
        top_k: int,
        device: str,
        dtype: str = "float32",
        batch_size: int | None = None,
        compile: CompileMode = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cpu_threads: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ):
        if device == "cpu":
            # Ray pins OMP threads to the actor's num_cpus (1); inference should use the cores it was given
            torch.set_num_threads(cpu_threads or os.cpu_count() or 1)
        loaded = load_model(model, device=device, storage_options=storage_options)
        self.source, self.weights_sha256 = loaded.source, loaded.weights_sha256
        self.num_features = loaded.config.num_features
        labels = loaded.config.id2label
        self.labels = [labels.get(i, str(i)) for i in range(max(labels, default=-1) + 1)]
        self.runner = Runner(loaded, DTYPES[dtype], compile, batch_size, top_k)
        self.run_id = run_id
        self.schema = output_schema(self.num_features)
        reason = unsupported(loaded.preprocessing, device)
        if reason is not None and device == "cuda":
            logger.warning("JPEGs sent for GPU decoding are decoded on this actor's CPU instead: %s", reason)
        self.decoder = DeviceDecoder(
            loaded.preprocessing, self.runner.device, max_pixels, jpeg=nvjpeg if reason is None else None
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = error_texts(batch["error"])
        n = len(errors)
        # Ray turns an all-null column into NaNs: bytes are what counts
        passed = [
            i for i, data in enumerate(batch.get("data", ())) if isinstance(data, bytes) and not errors[i]
        ]
        on_device = None
        if passed:
            on_device, late = self.decoder([batch["data"][i] for i in passed], batch["orientation"][passed])
            for i, error in zip(passed, late, strict=True):
                errors[i] = error
        ok = np.array([e is None for e in errors], dtype=bool)
        embeddings = np.zeros((n, self.num_features), dtype=np.float32)
        scores = ids = None
        if ok.any():
            embeddings[ok], ok_scores, ok_ids = self.runner(
                self._inputs(batch["pixels"], ok, passed, on_device)
            )
            if ok_ids is not None:
                scores = np.zeros((n, ok_ids.shape[1]), dtype=np.float32)
                ids = np.zeros((n, ok_ids.shape[1]), dtype=np.int32)
                scores[ok], ids[ok] = ok_scores, ok_ids
        return self._rows(batch, ok, errors, embeddings, scores, ids)

    def _inputs(
        self, pixels: np.ndarray, ok: np.ndarray, passed: list[int], on_device: torch.Tensor | None
    ) -> np.ndarray | torch.Tensor:
        """The valid rows' pixels: on the host when the CPU stage decoded them all, else gathered on the
        device, where the GPU-decoded ones already are."""
        if on_device is None:
            return pixels[ok]
        gathered = torch.zeros(pixels.shape, dtype=torch.uint8, device=self.runner.device)
        from_host = ok.copy()
        from_host[passed] = False
        if from_host.any():
            gathered[torch.from_numpy(from_host)] = torch.from_numpy(pixels[from_host]).to(self.runner.device)
        gathered[passed] = on_device
        return gathered[torch.from_numpy(ok)]

    def _rows(self, batch, ok, errors, embeddings, scores, ids) -> pa.Table:
        n = len(errors)
        mask = pa.array(~ok)

        def lists(values: np.ndarray | None, type_: pa.DataType) -> pa.Array:
            if values is None:
                return pa.nulls(n, pa.list_(type_))
            offsets = pa.array(np.arange(0, values.size + 1, values.shape[1], dtype=np.int32))
            return pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), type_), mask=mask)

        label_names = None if ids is None else np.asarray(self.labels, dtype=object)[ids]
        embedding = pa.FixedSizeListArray.from_arrays(
            pa.array(embeddings.ravel(), pa.float32()), embeddings.shape[1], mask=mask
        )
        sizes = {name: pa.array(batch[name].astype(np.int32), mask=~ok) for name in ("width", "height")}
        columns = {
            "key": pa.array(list(batch["key"]), pa.string()),
            "status": pa.array(np.where(ok, "ok", "error"), pa.string()),
            "error": pa.array(errors, pa.string()),
            "label_ids": lists(ids, pa.int32()),
            "labels": lists(label_names, pa.string()),
            "scores": lists(scores, pa.float32()),
            "embedding": embedding,
            "width": sizes["width"],
            "height": sizes["height"],
            "model": pa.array([self.source] * n, pa.string()),
            "model_sha256": pa.array([self.weights_sha256] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "processed_at": pa.array([datetime.now(UTC)] * n, pa.timestamp("us", tz="UTC")),
        }
        return pa.table(columns, schema=self.schema)
