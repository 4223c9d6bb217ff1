"""Every kind of awkward or broken file in one run: exactly one row each, a prediction equal to the
runtime's where the file is a valid image, a readable error with its kind where it is not."""

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
from PIL import Image

from tests.data import parquet_file, photo, tar_shard
from tests.test_run import Place, check_table, run_on

RNG = np.random.default_rng(7)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def pixels(height: int, width: int, channels: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)


def valid_files() -> dict[str, bytes]:
    palette = Image.fromarray(pixels(40, 50)[..., 0], "L").convert("P")
    palette.info["transparency"] = 3
    frames = [Image.fromarray(pixels(30, 30)) for _ in range(3)]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return {
        "grey16.png": encode(Image.fromarray(RNG.integers(0, 65536, (40, 30)).astype(np.uint16)), "PNG"),
        "cmyk.jpg": encode(Image.fromarray(pixels(40, 30, 4), "CMYK"), "JPEG"),
        "palette-transparent.png": encode(palette, "PNG"),
        "rgba.png": encode(Image.fromarray(pixels(40, 30, 4), "RGBA"), "PNG"),
        "grey.jpg": encode(Image.fromarray(pixels(40, 30)[..., 0], "L"), "JPEG"),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "pages.tiff": encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "tiny-1x1.png": encode(Image.fromarray(pixels(1, 1)), "PNG"),
        "strip-10000x10.png": encode(Image.fromarray(pixels(10, 10000)), "PNG"),
        "rotated-exif.jpg": encode(Image.fromarray(pixels(20, 60)), "JPEG", exif=exif),
        "png-named.jpg": photo(5, "PNG"),
        "webp.webp": photo(6, "WEBP"),
        "bitmap.BMP": photo(7, "BMP"),
    }


def broken_files() -> dict[str, tuple[bytes, str]]:
    # a 1x1 PNG whose header declares 20000 x 20000: 400 megapixels promised by 70 bytes
    small = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    small[16:24] = struct.pack(">II", 20000, 20000)
    small[29:33] = struct.pack(">I", zlib.crc32(bytes(small[12:29])))
    bomb = bytes(small)
    return {
        "zero.jpg": (b"", "ImageDecodeError(empty)"),
        "cut.jpg": (photo(1)[:300], "ImageDecodeError(truncated)"),
        "cut.png": (photo(2, "PNG")[:500], "ImageDecodeError("),
        "noise.png": (RNG.bytes(4000), "ImageDecodeError(undecodable)"),
        "text.jpg": (b"<html>not found</html>", "ImageDecodeError(undecodable)"),
        "bomb.png": (bomb, "ImageDecodeError(too_large)"),
    }


def test_every_awkward_file_gives_exactly_one_row(tmp_path, tiny_model, ray_session):
    place = Place(str(tmp_path), {})
    good = place.put(valid_files(), "images")
    broken = broken_files()
    written = place.put({name: data for name, (data, _) in broken.items()}, "images")
    errors = {uri: broken[uri.rsplit("/", 1)[1]][1] for uri in written}

    summary, table = run_on(place, tiny_model, "images", max_pixels=100_000_000)

    check_table(table, good, errors, tiny_model)
    rows = {row["key"].rsplit("/", 1)[1]: row for row in table.to_pylist()}
    assert (rows["rotated-exif.jpg"]["width"], rows["rotated-exif.jpg"]["height"]) == (20, 60)
    assert (rows["strip-10000x10.png"]["width"], rows["strip-10000x10.png"]["height"]) == (10000, 10)
    assert summary.errors == len(errors) and sum(summary.errors_by_kind.values()) == len(errors)


def test_objects_over_the_byte_limit_are_error_rows_never_read_whole(tmp_path, tiny_model, ray_session):
    """max_bytes_per_image in the readers: a listed file (its size known before reading), a tar member
    (its header), and a URI in a table (read one byte past the limit, then stopped)."""
    limit = 20_000
    big = encode(Image.fromarray(pixels(120, 120)), "PNG")
    assert len(big) > limit
    place = Place(str(tmp_path), {})
    files = place.put({"small.jpg": photo(1), "big.png": big}, "images")
    small, large = files
    _, table = run_on(place, tiny_model, "images", max_bytes_per_image=limit)
    check_table(table, {small: photo(1)}, {large: "TooLarge"}, tiny_model)

    (shard,) = place.put({"s.tar": tar_shard([("a.jpg", photo(2)), ("b.png", big)])}, "shards")
    _, table = run_on(place, tiny_model, "shards", max_bytes_per_image=limit, overwrite=True)
    check_table(table, {f"{shard}#a": photo(2)}, {f"{shard}#b": "TooLarge"}, tiny_model)

    cells = pa.table({"uri": [small, large]})
    place.put({"t.parquet": parquet_file(cells)}, "table")
    _, table = run_on(
        place,
        tiny_model,
        "table",
        max_bytes_per_image=limit,
        overwrite=True,
        uri_column="uri",
        allowed_uri_prefixes=[place.uri("images")],
    )
    check_table(table, {small: photo(1)}, {large: "TooLarge"}, tiny_model)


def test_table_cells_over_the_byte_limit_are_error_rows(tmp_path):
    from dinat_batch.pipeline.config import RunConfig
    from dinat_batch.pipeline.stages.read import read_tables

    big = encode(Image.fromarray(pixels(120, 120)), "PNG")
    table = tmp_path / "t.parquet"
    table.write_bytes(parquet_file(pa.table({"image": pa.array([photo(3), big], pa.binary())})))
    config = RunConfig(input=str(tmp_path), output=str(tmp_path.parent / "out"), max_bytes_per_image=20_000)
    (rows,) = read_tables(pa.table({"uri": [str(table)]}), config)
    assert rows.column("data").to_pylist() == [photo(3), None]
    assert rows.column("error")[1].as_py().startswith("TooLarge: ")
