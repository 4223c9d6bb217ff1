"""The inference actor: the model loaded once per actor, batches of uint8 pixels in, output rows out."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.model import load_model
from pipeline.preprocess import error_texts, normalize
from pipeline.sink import output_schema

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# embeddings [n, D]; top-k scores and label ids [n, k], or None for a backbone-only model
Outputs = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]
logger = logging.getLogger(__name__)


def _concat(parts: list[Outputs]) -> Outputs:
    return tuple(None if part[0] is None else np.concatenate(part) for part in zip(*parts, strict=True))


class Predictor:
    """Callable for `Dataset.map_batches(..., compute=ActorPoolStrategy(...))`.

    Rows whose `error` is set skip the model and come out as error rows; the others get top-k labels and
    scores and the pooled embedding. The model runs only on the valid rows, so one bad image costs nothing.
    """

    def __init__(
        self,
        model: str,
        run_id: str,
        top_k: int,
        device: str,
        dtype: str = "float32",
        cpu_threads: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ):
        if device == "cpu":
            # Ray pins OMP threads to the actor's num_cpus (1); inference should use the cores it was given
            torch.set_num_threads(cpu_threads or os.cpu_count() or 1)
        self.model = load_model(model, device=device, dtype=DTYPES[dtype], storage_options=storage_options)
        self.device = next(self.model.parameters()).device
        self.dtype = DTYPES[dtype]
        self.run_id = run_id
        self.top_k = top_k
        self.max_batch = 1 << 30  # lowered on out-of-memory
        self.schema = output_schema(self.model.config.num_features)
        labels = self.model.config.id2label
        self.labels = [labels.get(i, str(i)) for i in range(max(labels, default=-1) + 1)]

    def _infer(self, pixels: np.ndarray) -> Outputs:
        """The model on a batch, in slices of at most `max_batch` images. On out-of-memory the slice is
        halved and retried, and the smaller size kept for later batches: a batch size too large for the
        accelerator slows the run down instead of failing it."""
        if len(pixels) > self.max_batch:
            parts = [
                self._infer(pixels[i : i + self.max_batch]) for i in range(0, len(pixels), self.max_batch)
            ]
            return _concat(parts)
        try:
            return self._forward(pixels)
        except torch.OutOfMemoryError:
            if len(pixels) == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.max_batch = len(pixels) // 2
            logger.warning(
                "out of memory at %d images per call; continuing with %d", len(pixels), self.max_batch
            )
            return self._infer(pixels)

    @torch.inference_mode()
    def _forward(self, pixels: np.ndarray) -> Outputs:
        inputs = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        out = self.model(normalize(inputs, self.model.preprocessing, self.dtype))
        embeddings = out.embeddings.float().cpu().numpy()
        if out.logits is None:
            return embeddings, None, None
        scores, ids = out.logits.float().softmax(-1).topk(min(self.top_k, out.logits.shape[-1]), dim=-1)
        return embeddings, scores.cpu().numpy(), ids.cpu().numpy().astype(np.int32)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = error_texts(batch["error"])
        ok = np.array([e is None for e in errors], dtype=bool)
        n, dim = len(errors), self.model.config.num_features
        embeddings = np.zeros((n, dim), dtype=np.float32)
        scores = ids = None
        if ok.any():
            embeddings[ok], ok_scores, ok_ids = self._infer(batch["pixels"][ok])
            if ok_ids is not None:
                scores = np.zeros((n, ok_ids.shape[1]), dtype=np.float32)
                ids = np.zeros((n, ok_ids.shape[1]), dtype=np.int32)
                scores[ok], ids[ok] = ok_scores, ok_ids
        return self._rows(batch, ok, errors, embeddings, scores, ids)

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
            "model": pa.array([self.model.source] * n, pa.string()),
            "model_sha256": pa.array([self.model.weights_sha256] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "processed_at": pa.array([datetime.now(UTC)] * n, pa.timestamp("us", tz="UTC")),
        }
        return pa.table(columns, schema=self.schema)
