"""Preprocessing against a direct PIL + numpy computation of the same steps, for every PIL mode; bad bytes."""

import io

import numpy as np
import pytest
from PIL import Image

from dinat_batch.pipeline.images import ImageDecodeError, preprocess
from dinat_batch.pipeline.model.preprocessing import PreprocessConfig

pytestmark = pytest.mark.standalone

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
RNG = np.random.default_rng(0)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def expected_values(rgb: Image.Image, size=(224, 224), resample=Image.Resampling.BICUBIC) -> np.ndarray:
    """ViTImageProcessor's steps on an RGB PIL image, in float64."""
    resized = np.asarray(rgb.resize(size, resample=resample), dtype=np.float64)
    return ((resized / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def random_image(mode: str, width=61, height=47) -> Image.Image:
    if mode in ("I;16", "I"):
        image = Image.fromarray(
            RNG.integers(0, 65536, (height, width)).astype(np.uint16 if mode == "I;16" else np.int32)
        )
        assert image.mode == mode
        return image
    if mode == "F":
        return Image.fromarray(RNG.uniform(-20, 300, (height, width)).astype(np.float32), "F")
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "P": 1}[mode]
    data = RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if mode == "P":
        image = Image.fromarray(data[..., 0], "L").convert("P")
        image.putpalette(RNG.integers(0, 256, 768, dtype=np.uint8).tobytes())
        image.info["transparency"] = 5
        return image
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


def direct_rgb(image: Image.Image) -> Image.Image:
    """The documented conversion per mode, written out independently."""
    if image.mode in ("I;16", "I"):
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if image.mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if image.mode == "P":
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "PNG"),
        ("L", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("I;16", "PNG"),
        ("I", "TIFF"),
        ("F", "TIFF"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
    ],
)
def test_every_mode_matches_direct_computation(mode, fmt):
    source = random_image(mode)
    data = encode(source, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    decoded = Image.open(io.BytesIO(data))
    out = preprocess(data, PreprocessConfig())
    assert out.pixel_values.shape == (3, 224, 224) and out.pixel_values.dtype == np.float32
    assert (out.width, out.height) == (61, 47)
    np.testing.assert_allclose(out.pixel_values, expected_values(direct_rgb(decoded)), atol=1e-6, rtol=0)


def test_preprocessor_config_is_followed():
    config = PreprocessConfig.model_validate(
        {"size": 384, "resample": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    )
    source = random_image("RGB")
    out = preprocess(encode(source, "PNG"), config)
    resized = np.asarray(source.resize((384, 384), resample=Image.Resampling.BILINEAR), dtype=np.float64)
    np.testing.assert_allclose(out.pixel_values, ((resized / 255 - 0.5) / 0.5).transpose(2, 0, 1), atol=1e-6)


def test_exif_orientation_is_applied():
    source = random_image("RGB", width=40, height=20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = preprocess(encode(source, "PNG", exif=exif), PreprocessConfig())
    assert (out.width, out.height) == (20, 40)
    np.testing.assert_allclose(
        out.pixel_values, expected_values(source.transpose(Image.Transpose.ROTATE_270)), atol=1e-6
    )


def test_animated_gif_uses_first_frame():
    frames = [random_image("RGB").convert("P") for _ in range(3)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = preprocess(data, PreprocessConfig())
    first = Image.open(io.BytesIO(data)).convert("RGB")
    np.testing.assert_allclose(out.pixel_values, expected_values(first), atol=1e-6)


def test_tiny_and_extreme_aspect_images_decode():
    assert preprocess(encode(random_image("RGB", 1, 1), "PNG"), PreprocessConfig()).pixel_values.shape == (
        3,
        224,
        224,
    )
    out = preprocess(encode(random_image("L", 10000, 10), "PNG"), PreprocessConfig())
    assert (out.width, out.height) == (10000, 10)


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header declaring a huge size, with almost no data."""
    small = encode(Image.new("L", (1, 1)), "PNG")
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return small[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + small[33:]


@pytest.mark.parametrize(
    ("data", "kind", "message"),
    [
        (b"", "empty", "the file is empty"),
        (b"hello, I am text pretending to be a jpeg", "undecodable", "not a recognised image format"),
        (bytes(RNG.integers(0, 256, 500, dtype=np.uint8)), "undecodable", "not a recognised image format"),
        (encode(random_image("RGB", 300, 200), "JPEG")[:1500], "truncated", "truncated"),
        (encode(random_image("RGB", 300, 200), "PNG")[:3000], "truncated", "corrupt"),
        (bomb_png(12000, 12000), "too_large", "12000 x 12000 = 144000000 pixels, over the limit"),
        (bomb_png(50000, 50000), "too_large", "over the limit"),
    ],
    ids=["empty", "text", "random", "truncated-jpeg", "truncated-png", "bomb", "huge-bomb"],
)
def test_bad_bytes_raise_readable_errors(data, kind, message):
    with pytest.raises(ImageDecodeError) as err:
        preprocess(data, PreprocessConfig())
    assert err.value.kind == kind
    assert message in str(err.value)


def test_pixel_limit_is_configurable():
    data = encode(random_image("RGB", 100, 100), "PNG")
    with pytest.raises(ImageDecodeError, match="10000 pixels, over the limit of 9999"):
        preprocess(data, PreprocessConfig(), max_pixels=9999)
