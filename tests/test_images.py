"""Tests for vit.images: decoding real image files made by the test into uint8 arrays."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit.images import IMAGE_EXTENSIONS, BadImageError, is_image_path, load_image

# four distinct, JPEG-friendly colours, one per 16x16 quadrant of a 32x32 (H x W) image;
# a non-symmetric layout tells every rotation and flip apart
QUADRANTS = np.array(
    [[[255, 0, 0], [0, 0, 255]], [[0, 255, 0], [255, 255, 255]]], dtype=np.uint8
)  # 2, 2, 3


def quadrant_image(h: int = 32, w: int = 48) -> np.ndarray:
    """uint8 [h, w, 3] of four flat colour blocks."""
    return np.repeat(np.repeat(QUADRANTS, h // 2, axis=0), w // 2, axis=1)


def png_bytes(pixels: np.ndarray, bit_depth: int, color_type: int) -> bytes:
    """A PNG file written chunk by chunk (Pillow cannot write 16-bit RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))  # filter 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_extensions_are_lowercase_and_matching_ignores_case():
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    assert is_image_path("a/B.JPEG") and is_image_path("x.Png") and is_image_path("y.webp")
    assert not is_image_path("notes.txt") and not is_image_path("png")


def test_rgb_png_is_lossless(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3)
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("ext", [".bmp", ".tif", ".ppm", ".gif", ".webp"])
def test_other_lossless_formats(tmp_path, ext):
    rgb = quadrant_image()
    kwargs = {"lossless": True} if ext == ".webp" else {}
    Image.fromarray(rgb).save(tmp_path / f"a{ext}", **kwargs)
    np.testing.assert_array_equal(load_image(tmp_path / f"a{ext}"), rgb)


def test_jpeg_close_to_source(tmp_path):
    rgb = quadrant_image()
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    out = load_image(tmp_path / "a.jpg")
    assert out.shape == rgb.shape
    # flat 16x16 blocks survive JPEG almost exactly away from block edges
    assert np.abs(out[4:12, 4:20].astype(int) - rgb[4:12, 4:20]).max() <= 8


# EXIF orientation tag -> the numpy operation that turns stored pixels into displayed ones
ORIENTATIONS = {
    2: lambda a: a[:, ::-1],  # mirror left-right
    3: lambda a: np.rot90(a, 2),  # rotate 180
    6: lambda a: np.rot90(a, -1),  # rotate 90 clockwise
    8: lambda a: np.rot90(a, 1),  # rotate 90 counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_applied(tmp_path, orientation):
    stored = quadrant_image(32, 48)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    out = load_image(path)
    expected = ORIENTATIONS[orientation](stored)
    assert out.shape == expected.shape
    err = np.abs(out.astype(int) - expected).reshape(-1, 3).max(axis=1)
    assert np.median(err) <= 4  # JPEG noise only, the layout matches
    # the displayed top-left quadrant centre has the expected flat colour
    h, w = expected.shape[:2]
    np.testing.assert_allclose(out[h // 4, w // 4], expected[h // 4, w // 4], atol=8)


def test_grayscale_replicated_or_kept(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (6, 9), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    rgb = load_image(tmp_path / "g.png")
    assert rgb.shape == (6, 9, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, :, c], gray)
    np.testing.assert_array_equal(load_image(tmp_path / "g.png", channels=1)[:, :, 0], gray)


def test_one_bit_image(tmp_path):
    bits = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    out = load_image(tmp_path / "b.png")
    np.testing.assert_array_equal(out, np.repeat(bits[:, :, None] * 255, 3, axis=2))


@pytest.mark.parametrize("transparency", [None, 0])
def test_palette_gives_palette_colours(tmp_path, transparency):
    palette = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 7]], dtype=np.uint8)
    index = np.array([[0, 1, 2, 1], [2, 2, 0, 1]], dtype=np.uint8)
    im = Image.fromarray(index, mode="P")
    im.putpalette(palette.reshape(-1).tolist())
    kwargs = {} if transparency is None else {"transparency": transparency}
    im.save(tmp_path / "p.png", **kwargs)
    assert Image.open(tmp_path / "p.png").mode == "P"
    # transparent entries keep their palette colour: alpha is dropped, not composited
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), palette[index])


def test_rgba_and_la_drop_alpha(tmp_path):
    rgba = np.random.default_rng(2).integers(0, 256, (4, 5, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # fully transparent pixels keep their stored colour
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgba[:, :, :3])
    la = rgba[:, :, [0, 3]]
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    np.testing.assert_array_equal(out, np.repeat(la[:, :, :1], 3, axis=2))


def test_rgba_luminance_ignores_alpha(tmp_path):
    rgba = np.random.default_rng(3).integers(0, 256, (4, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    rgb = rgba[:, :, :3].astype(np.float64)
    expected = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2 luma
    out = load_image(tmp_path / "a.png", channels=1)
    assert out.shape == (4, 5, 1)
    assert np.abs(out[:, :, 0] - expected).max() <= 0.51


def test_cmyk_converted(tmp_path):
    cmyk = np.array([[[255, 0, 0, 0], [0, 0, 0, 255], [100, 50, 0, 100]]], dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    c, m, y, k = (cmyk[..., i].astype(float) for i in range(4))
    expected = np.stack([(255 - c), (255 - m), (255 - y)], -1) * (255 - k[..., None]) / 255
    np.testing.assert_array_equal(load_image(tmp_path / "c.tif"), np.rint(expected))


SIXTEEN = np.array([[0, 257, 257 * 100, 257 * 200], [32768, 65535, 1000, 129]], np.uint16)


def expected_8bit(values: np.ndarray) -> np.ndarray:
    return np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def test_sixteen_bit_known_values():
    ref = expected_8bit(SIXTEEN)
    assert ref[1, 0] == 128 and ref[1, 1] == 255 and ref[0, 2] == 100 and ref[0, 3] == 200


@pytest.mark.parametrize(
    "name, mode", [("g16.png", "I;16"), ("g16.tif", "I;16"), ("g16b.tif", "I;16B")]
)
def test_sixteen_bit_gray_scaled(tmp_path, name, mode):
    im = Image.frombytes(mode, SIXTEEN.shape[::-1], SIXTEEN.astype(_byte_order(mode)).tobytes())
    im.save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == mode
    out = load_image(tmp_path / name)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], expected_8bit(SIXTEEN))
    np.testing.assert_array_equal(load_image(tmp_path / name, 1)[:, :, 0], expected_8bit(SIXTEEN))


def _byte_order(mode: str) -> str:
    return ">u2" if mode.endswith("B") else "<u2"


def test_sixteen_bit_pgm_mode_i(tmp_path):
    header = b"P5\n%d %d\n65535\n" % SIXTEEN.shape[::-1]
    (tmp_path / "g.pgm").write_bytes(header + SIXTEEN.astype(">u2").tobytes())
    assert Image.open(tmp_path / "g.pgm").mode == "I"
    np.testing.assert_array_equal(
        load_image(tmp_path / "g.pgm", 1)[:, :, 0], expected_8bit(SIXTEEN)
    )


def test_sixteen_bit_rgb_png(tmp_path):
    rgb16 = np.stack([SIXTEEN, SIXTEEN[::-1], SIXTEEN[:, ::-1]], axis=-1).astype(">u2")
    (tmp_path / "rgb16.png").write_bytes(png_bytes(rgb16, bit_depth=16, color_type=2))
    out = load_image(tmp_path / "rgb16.png")
    # NOTE: Pillow keeps the high byte of 16-bit RGB; it equals the rounded value for
    # 0, 257*k, 32768 and 65535 (checked here) and is off by at most one elsewhere
    exact = np.isin(rgb16.astype(np.int64), [0, 32768, 65535]) | (rgb16 % 257 == 0)
    np.testing.assert_array_equal(out[exact], expected_8bit(rgb16)[exact])
    assert np.abs(out.astype(int) - expected_8bit(rgb16)).max() <= 1


def test_channels_must_be_1_or_3(tmp_path):
    Image.fromarray(quadrant_image()).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="channels"):
        load_image(tmp_path / "a.png", channels=4)


def _noise_jpeg(path: Path) -> bytes:
    noise = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    return path.read_bytes()


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg_is_bad(tmp_path, keep):
    data = _noise_jpeg(tmp_path / "full.jpg")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BadImageError, match="cut.jpg") as info:
        load_image(path)
    assert info.value.path == str(path)


def test_truncated_png_is_bad(tmp_path):
    noise = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def test_corrupt_png_crc_is_bad(tmp_path):
    data = bytearray(png_bytes(quadrant_image(), 8, 2))
    data[40] ^= 0xFF  # a byte inside the IDAT chunk: its CRC no longer matches
    (tmp_path / "crc.png").write_bytes(bytes(data))
    with pytest.raises(BadImageError, match="crc.png"):
        load_image(tmp_path / "crc.png")


def test_zero_byte_file_is_bad(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadImageError, match=r"empty.jpg: empty file"):
        load_image(tmp_path / "empty.jpg")


def test_text_named_png_is_bad(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image\n")
    with pytest.raises(BadImageError, match="notes.png: not a recognised image format"):
        load_image(tmp_path / "notes.png")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [11, 20])  # 121 px: Pillow would only warn; 400 px: error
def test_decompression_bomb_refused(tmp_path, monkeypatch, side):
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadImageError, match="big.png"):
        load_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(tmp_path / "big.png").shape == (side, side, 3)
