"""The text of the output's `error` column, `Kind: message`: the kind is what error counts group by and
what tells a failed read (the store's fault, retried by the next run) from a bad image (final)."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

# kinds that say the store failed, not the image: retried by the next resume or rerun
RETRYABLE = frozenset({"ReadError", "ShardError", "TableError"})


def error_text(kind: str, message: str) -> str:
    return f"{kind}: {message}"


def read_error(uri: str, err: Exception) -> str:
    """The text for an image the store would not give."""
    return error_text("ReadError", f"could not read {uri}: {type(err).__name__}: {err}")


def error_kind(text: str) -> str:
    return text.split(": ", 1)[0]


def is_retryable(text: str | None) -> bool:
    return text is not None and error_kind(text) in RETRYABLE


def retryable_mask(errors: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Which rows of an `error` column are failed reads (`is_retryable`), as a boolean mask."""
    kinds = pc.split_pattern(errors.cast(pa.string()), ": ", max_splits=1)
    return pc.fill_null(pc.is_in(pc.list_element(kinds, 0), pa.array(sorted(RETRYABLE))), False)


def error_column(column: Iterable) -> list[str | None]:
    """A batch's `error` column as text or None: Ray hands an all-null column over as float NaNs."""
    return [value if isinstance(value, str) else None for value in column]
