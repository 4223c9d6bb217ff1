"""`dinat-batch predict` as a user runs it, on a checkpoint folder and local images."""

import io

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.model import load_model
from pipeline.model.export import random_model, save_checkpoint
from pipeline.preprocess import PreprocessConfig, preprocess
from tests.model.test_dinat import shortened


def test_predict_prints_top_k_and_flags_broken_images(tmp_path):
    folder = save_checkpoint(random_model(shortened("dinat-mini-in1k-224"), seed=2), tmp_path / "ckpt")
    image = tmp_path / "photo.png"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    image.write_bytes(buf.getvalue())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")

    result = CliRunner().invoke(
        app, ["predict", str(image), str(broken), "--model", str(folder), "--top-k", "3"]
    )
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0] == str(image) and lines[4] == str(broken)
    assert "ImageDecodeError: not a recognised image format" in lines[5]

    model = load_model(str(folder), device="cpu")
    with torch.inference_mode():
        logits = model(
            torch.from_numpy(preprocess(image.read_bytes(), PreprocessConfig()).pixel_values)[None]
        ).logits
    scores, ids = logits.softmax(-1)[0].topk(3)
    for line, score, label_id in zip(lines[1:4], scores.tolist(), ids.tolist(), strict=True):
        assert line.split() == [f"{score:.4f}", f"LABEL_{label_id}", f"({label_id})"]


def test_predict_refuses_bad_options_and_models(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "x.jpg", "--storage-options", "{not json"])
    assert result.exit_code == 2 and "not valid JSON" in result.output
    result = runner.invoke(app, ["predict", "x.jpg", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "no config.json" in result.output
