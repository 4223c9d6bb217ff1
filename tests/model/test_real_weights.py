"""Upstream's own integration check on the real dinat-mini weights, where a copy of them is at hand.

This machine and CI cannot reach the hub, so the test needs two environment variables, and says so in the
test summary (pytest -ra) when they are absent:
  DINAT_MINI_WEIGHTS  a source load_model accepts holding shi-labs/dinat-mini-in1k-224 (hub id, folder, URI)
  DINAT_CATS_IMAGE    COCO val2017 image 000000039769.jpg (two cats on a couch)
"""

import os
from pathlib import Path

import pytest
import torch

from dinat_batch.pipeline.images import preprocess
from dinat_batch.pipeline.model import load_model

pytestmark = pytest.mark.standalone

WEIGHTS = os.environ.get("DINAT_MINI_WEIGHTS")
IMAGE = os.environ.get("DINAT_CATS_IMAGE")


@pytest.mark.skipif(
    not (WEIGHTS and IMAGE), reason="real weights not at hand: set DINAT_MINI_WEIGHTS and DINAT_CATS_IMAGE"
)
def test_dinat_mini_on_the_cats_image_matches_upstream():
    model = load_model(WEIGHTS, device="cpu")
    image = preprocess(Path(IMAGE).read_bytes(), model.preprocessing)
    with torch.inference_mode():
        logits = model(torch.from_numpy(image.pixel_values)[None]).logits
    assert model.config.id2label[logits.argmax(-1).item()] == "tabby, tabby cat"
    torch.testing.assert_close(logits[0, :3], torch.tensor([-0.1545, -0.7667, 0.4642]), atol=1e-4, rtol=0)
