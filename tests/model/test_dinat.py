"""The runtime's DiNAT against an independent upstream-semantics forward, on random weights."""

import pytest
import torch

from dinat_batch.pipeline.model import VARIANTS, Dinat, DinatConfig
from dinat_batch.pipeline.model.export import random_model
from tests.model.upstream import upstream_forward

pytestmark = pytest.mark.standalone

# parameter counts published with the checkpoints (millions)
PUBLISHED_PARAMS = {
    "dinat-mini-in1k-224": 20.0,
    "dinat-tiny-in1k-224": 27.9,
    "dinat-small-in1k-224": 50.7,
    "dinat-base-in1k-224": 89.8,
    "dinat-large-in22k-in1k-224": 200.9,
    "dinat-large-in22k-in1k-384": 200.9,
    "dinat-large-11x11-in22k-in1k-384": 201.1,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_builds_with_its_published_size(variant):
    with torch.device("meta"):
        model = Dinat(DinatConfig.variant(variant))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(params, 1) == PUBLISHED_PARAMS[variant]


def shortened(variant: str, layers: int = 2) -> DinatConfig:
    """The variant's widths, heads, kernel, dilations and layer scale with fewer layers per stage."""
    config = DinatConfig.variant(variant, num_labels=10)
    return config.model_copy(
        update={"depths": [layers] * 4, "dilations": [d[:layers] for d in config.dilations]}
    )


def check_against_upstream(model: Dinat, sizes, batch=2, atol=1e-4):
    state = model.state_dict()
    config = model.config.model_dump()
    gen = torch.Generator().manual_seed(1)
    for height, width in sizes:
        pixels = torch.randn(batch, 3, height, width, generator=gen)
        with torch.inference_mode():
            out = model(pixels)
            logits, embeddings = upstream_forward(state, config, pixels)
        torch.testing.assert_close(out.embeddings, embeddings, atol=atol, rtol=0)
        torch.testing.assert_close(out.logits, logits, atol=atol, rtol=0)


def distinct_when_shortened(size: int) -> list[str]:
    """The variants at `size` whose shortened configs differ: shortened to 2 layers, tiny is mini (they
    differ in depth only), and checking both would repeat the same computation."""
    seen, distinct = [], []
    for variant in VARIANTS:
        config = shortened(variant).model_dump()
        if VARIANTS[variant][-1] == size and config not in seen:
            seen.append(config)
            distinct.append(variant)
    return distinct


@pytest.mark.parametrize("variant", distinct_when_shortened(224))
def test_224_variants_match_upstream(variant):
    model = random_model(shortened(variant), seed=3)
    # the sizes take the padding paths (160: maps under the window), odd maps and larger inputs; the wider
    # variants differ in widths, heads and layer scale, which their own size and an odd one exercise
    sizes = [(224, 224), (200, 300)]
    if variant == "dinat-mini-in1k-224":
        sizes += [(160, 160), (384, 384)]
    check_against_upstream(model, sizes, batch=1)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if VARIANTS[v][-1] == 384])
def test_384_variants_match_upstream(variant):
    model = random_model(shortened(variant, layers=1), seed=4)
    check_against_upstream(model, [(384, 384), (200, 300)], batch=1)


def test_full_depth_mini_matches_upstream():
    model = random_model("dinat-mini-in1k-224", seed=5)
    check_against_upstream(model, [(224, 224), (96, 128)])


def test_batch_size_invariance_and_determinism():
    model = random_model(shortened("dinat-mini-in1k-224"), seed=6)
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randn(4, 3, 224, 224, generator=gen)
    with torch.inference_mode():
        batched = model(pixels)
        alone = model(pixels[2:3])
        again = model(pixels)
    torch.testing.assert_close(alone.logits[0], batched.logits[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.embeddings[0], batched.embeddings[2], atol=1e-5, rtol=0)
    assert torch.equal(again.logits, batched.logits) and torch.equal(again.embeddings, batched.embeddings)


def test_bfloat16_agrees_with_float32():
    model = random_model(shortened("dinat-mini-in1k-224"), seed=7)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = model(pixels)
        half = model.to(torch.bfloat16)(pixels.bfloat16())
    assert half.embeddings.dtype == torch.bfloat16
    cosine = torch.nn.functional.cosine_similarity(full.embeddings, half.embeddings.float())
    assert cosine.min() > 0.99


def test_feature_maps_and_input_check():
    model = random_model(shortened("dinat-mini-in1k-224"), seed=8)
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 224, 224), feature_maps=True)
    assert [tuple(m.shape) for m in out.feature_maps] == [
        (1, 56, 56, 64),
        (1, 28, 28, 128),
        (1, 14, 14, 256),
        (1, 7, 7, 512),
    ]
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 3, height, width\]"):
        model(torch.randn(1, 4, 224, 224))
