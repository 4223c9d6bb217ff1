"""The DiNAT model runtime: architecture, checkpoint files and loading.

The names below load on first use, so that importing the input spec (`model.preprocessing`) loads no
torch: the CPU decode workers need that spec and nothing else of the model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dinat_batch.pipeline.model.dinat import VARIANTS, Dinat, DinatConfig, DinatOutput
    from dinat_batch.pipeline.model.files import ModelLoadError
    from dinat_batch.pipeline.model.loading import ModelChanged, ModelPin, load_model

_MODULE_OF = {
    "VARIANTS": "dinat",
    "Dinat": "dinat",
    "DinatConfig": "dinat",
    "DinatOutput": "dinat",
    "ModelLoadError": "files",
    "ModelChanged": "loading",
    "ModelPin": "loading",
    "load_model": "loading",
}
__all__ = [
    "VARIANTS",
    "Dinat",
    "DinatConfig",
    "DinatOutput",
    "ModelChanged",
    "ModelLoadError",
    "ModelPin",
    "load_model",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
