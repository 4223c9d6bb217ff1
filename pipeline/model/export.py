"""Write a DiNAT checkpoint in Hugging Face layout; used for random-weight demos and by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dinat_batch.pipeline.model.dinat import VARIANTS, Dinat, DinatConfig
from dinat_batch.pipeline.model.preprocessing import PreprocessConfig


def save_checkpoint(
    model: Dinat,
    folder: str | Path,
    weights_format: str = "safetensors",
    backbone_only: bool = False,
    preprocessing: PreprocessConfig | None = None,
) -> Path:
    """config.json, weights (`model.safetensors` or `pytorch_model.bin`) and preprocessor_config.json.

    backbone_only writes `DinatModel` keys (no `dinat.` prefix, no classifier), as upstream saves backbones.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if backbone_only:
        state = {k.removeprefix("dinat."): v for k, v in state.items() if not k.startswith("classifier.")}
    config = model.config.model_dump(mode="json")
    config |= {
        "model_type": "dinat",
        "architectures": ["DinatModel" if backbone_only else "DinatForImageClassification"],
        "label2id": {name: i for i, name in model.config.id2label.items()},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"))
    elif weights_format == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}")
    pre = preprocessing or PreprocessConfig()
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "ViTImageProcessor", **pre.model_dump(mode="json")}, indent=2)
    )
    return folder


def random_model(config: DinatConfig | str, seed: int = 0) -> Dinat:
    """A DiNAT with random weights (a variant name from VARIANTS or a config); for demos and tests only."""
    if isinstance(config, str):
        if config not in VARIANTS:
            raise ValueError(f"unknown variant {config!r}; choose one of {', '.join(VARIANTS)}")
        config = DinatConfig.variant(config)
    generator = torch.Generator().manual_seed(seed)
    model = Dinat(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "layer_scale" in name:
                # scales near one, biases near zero: activations stay O(1) through every layer
                center = 0.0 if name.endswith("bias") else 1.0
                param.copy_(center + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()
