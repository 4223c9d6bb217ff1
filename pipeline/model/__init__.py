"""The DiNAT model runtime: architecture, checkpoint files and loading."""

from dinat_batch.pipeline.model.dinat import VARIANTS, Dinat, DinatConfig, DinatOutput
from dinat_batch.pipeline.model.files import ModelLoadError
from dinat_batch.pipeline.model.loading import load_model

__all__ = ["VARIANTS", "Dinat", "DinatConfig", "DinatOutput", "ModelLoadError", "load_model"]
