"""The DiNAT model runtime: architecture, checkpoint files and loading."""

from pipeline.model.dinat import VARIANTS, Dinat, DinatConfig, DinatOutput
from pipeline.model.files import ModelLoadError
from pipeline.model.loading import load_model

__all__ = ["VARIANTS", "Dinat", "DinatConfig", "DinatOutput", "ModelLoadError", "load_model"]
