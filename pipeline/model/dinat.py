"""DiNAT (Dilated Neighborhood Attention Transformer), self-contained, built from a Hugging Face config.

Module and parameter names mirror transformers' `DinatForImageClassification`, so published checkpoints
load unchanged and a missing or unexpected key is reported under its checkpoint name. Semantics follow
upstream exactly (summarised in the README, "The model"): the only kernel call is `kernels.na2d`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from dinat_batch.kernels import na2d

if TYPE_CHECKING:
    from dinat_batch.pipeline.model.loading import ModelPin
    from dinat_batch.pipeline.model.preprocessing import PreprocessConfig

# The published variants, for random-weight demos and tests; real checkpoints are always built from their
# own config.json.
_TINY_DILATIONS = [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
# id -> (embed_dim, depths, num_heads, kernel_size, dilations, mlp_ratio, layer_scale_init_value, image size)
VARIANTS: dict[str, tuple] = {
    "dinat-mini-in1k-224": (
        64,
        [3, 4, 6, 5],
        [2, 4, 8, 16],
        7,
        [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5],
        3.0,
        0.0,
        224,
    ),
    "dinat-tiny-in1k-224": (64, [3, 4, 18, 5], [2, 4, 8, 16], 7, _TINY_DILATIONS, 3.0, 0.0, 224),
    "dinat-small-in1k-224": (96, [3, 4, 18, 5], [3, 6, 12, 24], 7, _TINY_DILATIONS, 2.0, 0.0, 224),
    "dinat-base-in1k-224": (128, [3, 4, 18, 5], [4, 8, 16, 32], 7, _TINY_DILATIONS, 2.0, 1e-5, 224),
    "dinat-large-in22k-in1k-224": (192, [3, 4, 18, 5], [6, 12, 24, 48], 7, _TINY_DILATIONS, 2.0, 0.0, 224),
    "dinat-large-in22k-in1k-384": (
        192,
        [3, 4, 18, 5],
        [6, 12, 24, 48],
        7,
        [[1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5],
        2.0,
        0.0,
        384,
    ),
    "dinat-large-11x11-in22k-in1k-384": (
        192,
        [3, 4, 18, 5],
        [6, 12, 24, 48],
        11,
        _TINY_DILATIONS,
        2.0,
        0.0,
        384,
    ),
}


class DinatConfig(BaseModel):
    """The architecture fields of a Hugging Face `DinatConfig` (config.json); other fields are ignored.

    `hidden_size` in published configs is stale and never read: widths come from embed_dim.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    patch_size: int = 4
    num_channels: int = 3
    embed_dim: int = 64
    depths: list[int] = Field(default_factory=lambda: [3, 4, 6, 5])
    num_heads: list[int] = Field(default_factory=lambda: [2, 4, 8, 16])
    kernel_size: int = 7
    dilations: list[list[int]] = Field(default_factory=lambda: [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5])
    mlp_ratio: float = 3.0
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    layer_scale_init_value: float = 0.0
    id2label: dict[int, str] = Field(default_factory=dict)

    @field_validator("hidden_act")
    @classmethod
    def _gelu_only(cls, value: str) -> str:
        if value != "gelu":
            raise ValueError(f"hidden_act {value!r} is not supported; published DiNAT checkpoints use 'gelu'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DinatConfig:
        if self.patch_size != 4:
            raise ValueError(
                f"patch_size must be 4 (DiNAT's two stride-2 convolutions), got {self.patch_size}"
            )
        if not (len(self.depths) == len(self.num_heads) == len(self.dilations)):
            raise ValueError(
                f"depths, num_heads and dilations must have one entry per stage, got {len(self.depths)}, "
                f"{len(self.num_heads)} and {len(self.dilations)}"
            )
        for stage, (depth, dil) in enumerate(zip(self.depths, self.dilations, strict=True)):
            if len(dil) != depth:
                raise ValueError(f"stage {stage} has depth {depth} but {len(dil)} dilations")
        for stage, heads in enumerate(self.num_heads):
            if self.stage_width(stage) % heads:
                raise ValueError(
                    f"stage {stage} width {self.stage_width(stage)} is not divisible by {heads} heads"
                )
        return self

    def stage_width(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    @property
    def num_features(self) -> int:
        """Width of the final stage: the embedding dimension."""
        return self.stage_width(len(self.depths) - 1)

    @classmethod
    def variant(cls, name: str, num_labels: int = 1000) -> DinatConfig:
        embed_dim, depths, heads, kernel, dilations, mlp, layer_scale, _ = VARIANTS[name]
        return cls(
            embed_dim=embed_dim,
            depths=depths,
            num_heads=heads,
            kernel_size=kernel,
            dilations=dilations,
            mlp_ratio=mlp,
            layer_scale_init_value=layer_scale,
            id2label={i: f"LABEL_{i}" for i in range(num_labels)},
        )


@dataclass
class DinatOutput:
    """logits [B, num_labels] (None for a backbone-only checkpoint); embeddings [B, D]: the final layer
    norm's output mean-pooled over tokens (upstream's pooler_output); feature_maps: per-stage NHWC outputs
    when asked for."""

    embeddings: torch.Tensor
    logits: torch.Tensor | None = None
    feature_maps: tuple[torch.Tensor, ...] | None = None


class PatchEmbeddings(nn.Module):
    def __init__(self, config: DinatConfig):
        super().__init__()
        half = config.embed_dim // 2
        # two 3x3 stride-2 convolutions with no activation between them: upstream's stem
        self.projection = nn.Sequential(
            nn.Conv2d(config.num_channels, half, 3, stride=2, padding=1),
            nn.Conv2d(half, config.embed_dim, 3, stride=2, padding=1),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).permute(0, 2, 3, 1)


class Embeddings(nn.Module):
    def __init__(self, config: DinatConfig):
        super().__init__()
        self.patch_embeddings = PatchEmbeddings(config)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.norm(self.patch_embeddings(pixel_values))


class NeighborhoodAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kernel_size: int, dilation: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.backend = "auto"  # a kernels backend name; see Dinat.set_na_backend
        self.rpb = nn.Parameter(torch.zeros(heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key = nn.Linear(dim, dim, bias=qkv_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        shape = (b, h, w, self.heads, c // self.heads)
        q, k, v = (proj(x).view(shape) for proj in (self.query, self.key, self.value))
        out = na2d(q, k, v, self.kernel_size, self.dilation, rpb=self.rpb, backend=self.backend)
        return out.reshape(b, h, w, c)


class AttentionBlock(nn.Module):
    """Upstream's `attention` submodule: `self` (the NA) and `output.dense`."""

    def __init__(self, dim: int, heads: int, kernel_size: int, dilation: int, qkv_bias: bool):
        super().__init__()
        # upstream names the NA submodule `self`: its keys read `attention.self.query.weight`
        self.self = NeighborhoodAttention(dim, heads, kernel_size, dilation, qkv_bias)
        self.output = nn.Module()
        self.output.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.self(x))


class DinatLayer(nn.Module):
    def __init__(self, config: DinatConfig, dim: int, heads: int, dilation: int):
        super().__init__()
        self.window = config.kernel_size * dilation
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = AttentionBlock(dim, heads, config.kernel_size, dilation, config.qkv_bias)
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        hidden = int(config.mlp_ratio * dim)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(dim, hidden)
        self.output = nn.Module()
        self.output.dense = nn.Linear(hidden, dim)
        self.layer_scale_parameters = (
            nn.Parameter(torch.full((2, dim), config.layer_scale_init_value))
            if config.layer_scale_init_value > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, _ = x.shape
        y = self.layernorm_before(x)
        pad_h, pad_w = max(0, self.window - height), max(0, self.window - width)
        if pad_h or pad_w:
            # upstream zero-pads after the norm and lets the pad tokens be attended (not masked)
            y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        y = self.attention(y)[:, :height, :width]
        if self.layer_scale_parameters is not None:
            y = self.layer_scale_parameters[0] * y
        x = x + y
        y = self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))
        if self.layer_scale_parameters is not None:
            y = self.layer_scale_parameters[1] * y
        return x + y


class Downsampler(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class DinatStage(nn.Module):
    def __init__(self, config: DinatConfig, stage: int):
        super().__init__()
        dim = config.stage_width(stage)
        self.layers = nn.ModuleList(
            DinatLayer(config, dim, config.num_heads[stage], dilation) for dilation in config.dilations[stage]
        )
        last = stage == len(config.depths) - 1
        self.downsample = None if last else Downsampler(dim, config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stage output before downsampling, input of the next stage)."""
        for layer in self.layers:
            x = layer(x)
        return x, (x if self.downsample is None else self.downsample(x))


class DinatBackbone(nn.Module):
    """Upstream's `DinatModel`: stem, four stages, final layer norm."""

    def __init__(self, config: DinatConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = nn.Module()
        self.encoder.levels = nn.ModuleList(DinatStage(config, s) for s in range(len(config.depths)))
        self.layernorm = nn.LayerNorm(config.num_features, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, feature_maps: bool = False):
        x = self.embeddings(pixel_values)
        maps = []
        for level in self.encoder.levels:
            stage_out, x = level(x)
            maps.append(stage_out)
        x = self.layernorm(x)
        return x, tuple(maps) if feature_maps else None


class Dinat(nn.Module):
    """DiNAT for embeddings and, when the checkpoint has a classifier, ImageNet-style logits.

    Attributes set by `load_model`: `config`, `source`, `pin` (which checkpoint: `loading.ModelPin`),
    `weights_sha256`, `preprocessing`.
    """

    def __init__(self, config: DinatConfig, with_classifier: bool = True):
        super().__init__()
        self.config = config
        self.dinat = DinatBackbone(config)
        self.classifier = (
            nn.Linear(config.num_features, len(config.id2label))
            if with_classifier and config.id2label
            else None
        )
        self.source: str | None = None
        self.pin: ModelPin | None = None
        self.weights_sha256: str | None = None
        self.preprocessing: PreprocessConfig | None = None

    def set_na_backend(self, backend: str) -> None:
        """Run every attention layer on one kernels backend ("auto" picks per layer, the default)."""
        for module in self.modules():
            if isinstance(module, NeighborhoodAttention):
                module.backend = backend

    @property
    def has_classifier(self) -> bool:
        return self.classifier is not None

    def forward(self, pixel_values: torch.Tensor, feature_maps: bool = False) -> DinatOutput:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be [batch, {self.config.num_channels}, height, width], got {tuple(pixel_values.shape)}"
            )
        tokens, maps = self.dinat(pixel_values, feature_maps)
        embeddings = tokens.mean(dim=(1, 2))
        logits = self.classifier(embeddings) if self.classifier is not None else None
        return DinatOutput(embeddings=embeddings, logits=logits, feature_maps=maps)
