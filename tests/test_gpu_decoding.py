"""Decoding next to the model, without a GPU: which images the CPU stage sends on as bytes, the device-side
orientation and resize against the CPU path, the per-image fallback, and the actor's rows either way.

nvJPEG itself needs a GPU; here a stand-in with its contract (bytes in, pixels as stored in the file out,
or the exception for what it refuses) takes its place. benchmarks/gpu.py checks the real one."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from pydantic import ValidationError

from dinat_batch.pipeline import gpu_decoding
from dinat_batch.pipeline.config import RunConfig
from dinat_batch.pipeline.gpu_decoding import (
    PEAK_BYTES_PER_PIXEL,
    DeviceDecoder,
    bisected,
    default_share,
    orient,
    probe,
    unsupported,
)
from dinat_batch.pipeline.images import cpu_pixels, device_decodable
from dinat_batch.pipeline.model.export import random_model, save_checkpoint
from dinat_batch.pipeline.model.preprocessing import PreprocessConfig
from dinat_batch.pipeline.run import _device_share
from dinat_batch.pipeline.stages.decode import decode_batch
from dinat_batch.pipeline.stages.infer import Actors, ActorSettings, Predictor
from tests.data import MAX_PIXELS, TINY, TINY_INPUT, photo

pytestmark = [pytest.mark.standalone, pytest.mark.usefixtures("process_malloc_as_is")]

RNG = np.random.default_rng(7)


def smooth_rgb(width: int, height: int) -> Image.Image:
    # a smooth picture, as photos are: JPEG round trips of noise differ too much to compare resizers
    small = Image.fromarray(RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, orientation: int = 1, **kwargs) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95, **kwargs)
    return buf.getvalue()


def stand_in(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """nvJPEG's contract on the CPU: RGB pixels [3, H, W] as stored (no EXIF orientation)."""
    out = []
    for data in datas:
        try:
            image = Image.open(io.BytesIO(data.numpy().tobytes()))
            out.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).to(device))
        except Exception as err:
            out.append(RuntimeError(f"nvjpeg refused the image: {err}"))
    return out


def rows(
    items: dict[str, bytes], to_device: bool, config: PreprocessConfig = TINY_INPUT
) -> dict[str, np.ndarray]:
    keys = list(items)
    batch = {
        "key": np.array(keys, dtype=object),
        "data": np.array([items[k] for k in keys], dtype=object),
        "error": np.array([None] * len(keys), dtype=object),
    }
    return decode_batch(batch, config, MAX_PIXELS, device_share=float(to_device))


def test_only_jpegs_a_gpu_decoder_takes_are_sent_on():
    rgb = smooth_rgb(40, 30)
    header = device_decodable(jpeg(rgb), MAX_PIXELS)
    assert header is not None and (header.width, header.height, header.orientation) == (40, 30, 1)
    assert device_decodable(jpeg(rgb.convert("L")), MAX_PIXELS) is not None
    rotated = device_decodable(jpeg(rgb, orientation=6), MAX_PIXELS)
    assert (rotated.width, rotated.height, rotated.orientation) == (30, 40, 6)
    refused = {
        "progressive": jpeg(rgb, progressive=True),
        "cmyk": jpeg(rgb.convert("CMYK")),
        "png": photo(1, "PNG"),
        "corrupt": b"\xff\xd8\xff\xe0 not really",
        "empty": b"",
        "over the pixel limit": jpeg(rgb),
    }
    for name, data in refused.items():
        limit = 100 if name == "over the pixel limit" else MAX_PIXELS
        assert device_decodable(data, limit) is None, name


def test_the_cpu_stage_passes_jpeg_bytes_and_decodes_the_rest():
    items = {"a.jpg": jpeg(smooth_rgb(40, 30), orientation=8), "b.png": photo(2, "PNG"), "c.jpg": b"nope"}
    out = rows(items, to_device=True)
    assert out["data"][0] == items["a.jpg"] and out["data"][1] is None and out["data"][2] is None
    assert out["orientation"].tolist() == [8, 1, 1]
    assert out["width"].tolist() == [30, 72, 0] and out["height"].tolist() == [40, 56, 0]
    assert out["pixels"][0] == b"" and out["pixels"][2] == b""  # sent on as JPEG; an error
    assert len(out["pixels"][1]) == TINY_INPUT.height * TINY_INPUT.width * 3
    assert out["error"][2].startswith("ImageDecodeError(undecodable)")
    assert "data" not in rows(items, to_device=False)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil(orientation):
    stored = Image.fromarray(RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    stored.getexif()[0x0112] = orientation
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.info["exif"] = exif.tobytes()
    expected = np.array(ImageOps.exif_transpose(stored))
    got = orient(torch.from_numpy(np.array(stored)).permute(2, 0, 1), orientation).permute(1, 2, 0)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_device_pixels_match_the_cpu_path_within_one_level():
    config = PreprocessConfig(size=64)
    datas = [jpeg(smooth_rgb(90, 70), o) for o in (1, 6, 3)] + [jpeg(smooth_rgb(90, 70).convert("L"))]
    pixels, errors = DeviceDecoder(config, torch.device("cpu"), MAX_PIXELS, jpeg=stand_in)(
        datas, [1, 6, 3, 1]
    )
    assert errors == [None] * 4
    for got, data in zip(pixels.numpy(), datas, strict=True):
        expected, _, _ = cpu_pixels(data, config, MAX_PIXELS)
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_what_the_gpu_decoder_refuses_takes_the_cpu_path_one_image_at_a_time(caplog):
    config = PreprocessConfig(size=64)
    good, odd, broken = jpeg(smooth_rgb(50, 40)), jpeg(smooth_rgb(60, 30)), b"\xff\xd8\xff broken"

    def refuses_odd(datas, device):
        decoded = stand_in(datas, device)
        refused = [d.numel() == len(odd) for d in datas]
        return [RuntimeError("unsupported") if r else x for r, x in zip(refused, decoded, strict=True)]

    decoder = DeviceDecoder(config, torch.device("cpu"), MAX_PIXELS, jpeg=refuses_odd)
    pixels, errors = decoder([good, odd, broken], [1, 1, 1])
    assert decoder.fallbacks == 2
    np.testing.assert_array_equal(pixels[1].numpy(), cpu_pixels(odd, config, MAX_PIXELS)[0])
    assert errors[0] is None and errors[1] is None
    assert errors[2].startswith("ImageDecodeError(") and not pixels[2].any()
    refuses_all = DeviceDecoder(
        config, torch.device("cpu"), MAX_PIXELS, jpeg=lambda d, _: [OSError("no")] * len(d)
    )
    with caplog.at_level(logging.WARNING):
        pixels, errors = refuses_all([good, odd], [1, 1])
    assert errors == [None, None] and "refused a whole batch of 2 JPEGs" in caplog.text
    no_gpu = DeviceDecoder(config, torch.device("cpu"), MAX_PIXELS, jpeg=None)
    pixels, errors = no_gpu([good, broken], [1, 1])
    np.testing.assert_array_equal(pixels[0].numpy(), cpu_pixels(good, config, MAX_PIXELS)[0])
    assert errors[1] is not None


def test_the_actor_gives_the_same_rows_for_bytes_decoded_next_to_the_model(tiny_model):
    items = {
        "a.jpg": jpeg(smooth_rgb(80, 60)),
        "b.jpg": jpeg(smooth_rgb(80, 60), orientation=6),
        "c.png": photo(3, "PNG"),
        "d.jpg": b"\xff\xd8\xff broken",
    }
    actor = Predictor(
        ActorSettings(model=str(tiny_model), run_id="r", top_k=3, device="cpu", jpegs_to_device=True)
    )
    actor.decoder.jpeg = stand_in
    on_device = actor(rows(items, to_device=True)).to_pylist()
    on_cpu = actor(rows(items, to_device=False)).to_pylist()
    for near, far in zip(on_device, on_cpu, strict=True):
        assert (near["key"], near["status"], near["width"], near["height"]) == (
            far["key"],
            far["status"],
            far["width"],
            far["height"],
        )
        if near["status"] == "ok":
            cosine = np.dot(near["embedding"], far["embedding"]) / (
                np.linalg.norm(near["embedding"]) * np.linalg.norm(far["embedding"])
            )
            assert cosine > 0.999
    assert on_device[3]["error"] == on_cpu[3]["error"]


def test_gpu_decoding_says_why_it_cannot_run(monkeypatch):
    assert "GPU inference actors" in unsupported(PreprocessConfig(), "cpu")
    lanczos = PreprocessConfig(resample=Image.Resampling.LANCZOS)
    assert "LANCZOS" in unsupported(lanczos, "cuda")
    # the driver does not need torchvision for actors that have it: the actor finds out where it runs
    monkeypatch.setattr(gpu_decoding.importlib.util, "find_spec", lambda name: None)
    assert unsupported(PreprocessConfig(), "cuda") is None
    assert "pip install 'dinat-batch[gpu]'" in probe(torch.device("cpu"))


def test_the_cpus_decode_what_they_can_and_the_gpus_the_rest():
    # measured on an H200 with dinat-mini: the CPUs alone were best at 12 and 16 per GPU, a quarter at 8
    assert default_share(cpus=12, gpus=1) == default_share(cpus=64, gpus=4) == 0.0
    assert 0.25 <= default_share(cpus=8, gpus=1) <= 0.3
    assert default_share(cpus=16, gpus=8) > default_share(cpus=32, gpus=8) > 0
    assert default_share(cpus=4, gpus=0) == 0.0  # no GPU yet: nothing to balance against


def test_the_run_settles_its_share_from_the_config_and_the_cluster():
    gpu_pool = Actors("cuda", 1, 1, None, {})

    def share(resources=None, actors=gpu_pool, **config):
        run_config = RunConfig(input="/in", output="/out", **config)
        return _device_share(run_config, actors, PreprocessConfig(), resources or {"CPU": 8, "GPU": 1})

    assert share() == default_share(8, 1) > 0 and share({"CPU": 64, "GPU": 2}) == 0.0
    assert share(decode="gpu") == 1.0 and share(decode="gpu", device_decode_share=0.3) == 0.3
    assert share(device_decode_share=0.3) == 0.3 and share(decode="cpu") == 0.0
    # a pool held to one actor weighs the CPUs against one GPU, not the cluster's eight
    assert share({"CPU": 64, "GPU": 8}) > 0 and share({"CPU": 64, "GPU": 8}, Actors("cuda", 1, 1, 1, {})) == 0
    assert share(actors=Actors("cpu", 0, 1, 1, {}), device_decode_share=1.0) == 0.0
    assert share({"CPU": 4, "GPU": 0}, Actors("cuda", 1, 1, 2, {})) == 0.0  # an autoscaler's, no GPU yet
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        RunConfig(input="/in", output="/out", device_decode_share=1.5)
    with pytest.raises(ValidationError, match="for decode auto or gpu"):
        RunConfig(input="/in", output="/out", decode="cpu", device_decode_share=0.3)
    with pytest.raises(ValidationError, match="would decode nothing on the GPU"):
        RunConfig(input="/in", output="/out", decode="gpu", device_decode_share=0)


def test_a_filter_without_a_gpu_equivalent_keeps_the_cpu_path(tmp_path):
    """Every actor holds a decoder for bytes it may be sent; a LANCZOS checkpoint must still load and run."""
    lanczos = PreprocessConfig(size=64, resample=Image.Resampling.LANCZOS)
    with pytest.raises(ValueError, match="LANCZOS"):
        DeviceDecoder(lanczos, torch.device("cpu"), MAX_PIXELS, jpeg=stand_in)
    folder = save_checkpoint(random_model(TINY), tmp_path / "lanczos", preprocessing=lanczos)
    actor = Predictor(
        ActorSettings(model=str(folder), run_id="r", top_k=3, device="cpu", jpegs_to_device=True)
    )
    items = {"a.jpg": jpeg(smooth_rgb(80, 60)), "b.png": photo(3, "PNG")}
    statuses = [row["status"] for row in actor(rows(items, to_device=True, config=lanczos)).to_pylist()]
    assert statuses == ["ok", "ok"]


def test_a_cut_short_jpeg_takes_the_cpu_path_and_its_error_row():
    """nvJPEG may decode a damaged scan without complaint: a JPEG without its end marker is not sent on."""
    whole = jpeg(smooth_rgb(80, 60))
    cut = whole[: len(whole) * 2 // 3]
    assert device_decodable(cut, MAX_PIXELS) is None
    assert device_decodable(whole + b"\0" * 16, MAX_PIXELS) is not None  # padding after the end is fine
    out = rows({"cut.jpg": cut}, to_device=True)
    assert out["data"][0] is None and out["error"][0].startswith("ImageDecodeError(truncated)")


def test_a_refused_batch_is_bisected_down_to_the_refused_images():
    calls = []

    def decode_many(items):
        calls.append(len(items))
        if "bad" in items:
            raise RuntimeError("nvjpeg: bad image in batch")
        return [item.upper() for item in items]

    items = [f"img{i}" for i in range(16)]
    items[11] = "bad"
    out = bisected(decode_many, items)
    assert [o for i, o in enumerate(out) if i != 11] == [f"IMG{i}" for i in range(16) if i != 11]
    assert isinstance(out[11], RuntimeError)
    assert len(calls) <= 2 * 4 + 1  # not one call per image


def test_decoding_is_chunked_by_decoded_bytes_and_splits_what_runs_out_of_memory(monkeypatch):
    config = PreprocessConfig(size=64)
    datas = [jpeg(smooth_rgb(90, 70), o) for o in (1, 6, 3, 1, 8)]
    seen = []

    def recording(batch, device):
        seen.append(len(batch))
        return stand_in(batch, device)

    whole, _ = DeviceDecoder(config, torch.device("cpu"), MAX_PIXELS, jpeg=stand_in)(datas, [1, 6, 3, 1, 8])
    two_images = 2 * PEAK_BYTES_PER_PIXEL * 90 * 70
    chunked = DeviceDecoder(config, torch.device("cpu"), MAX_PIXELS, jpeg=recording, budget=two_images)
    pixels, errors = chunked(datas, [1, 6, 3, 1, 8], [90 * 70] * 5)
    assert seen == [2, 2, 1] and errors == [None] * 5
    np.testing.assert_array_equal(pixels.numpy(), whole.numpy())
    seen.clear()
    chunked(datas, [1, 6, 3, 1, 8])  # sizes read from the headers when not given
    assert seen == [2, 2, 1]

    resize = DeviceDecoder._resize

    def out_of_memory_above_one(self, images):
        if len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return resize(self, images)

    monkeypatch.setattr(DeviceDecoder, "_resize", out_of_memory_above_one)
    split = DeviceDecoder(config, torch.device("cpu"), MAX_PIXELS, jpeg=stand_in)
    pixels, errors = split(datas, [1, 6, 3, 1, 8])
    assert errors == [None] * 5 and split.fallbacks == 0
    np.testing.assert_array_equal(pixels.numpy(), whole.numpy())
