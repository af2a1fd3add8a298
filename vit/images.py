"""Decoding image files into uint8 arrays, treating every file as untrusted input.

One entry point, :func:`load_image`, turns any file Pillow can read into an ``[H, W, C]``
uint8 array with ``C`` 3 (RGB) or 1 (luminance). The conversion rules, applied the same way
to every file so that a data set mixing formats gives consistent pixels:

- EXIF orientation is applied, so the array is the image as a viewer shows it.
- Grayscale (``L``, 1-bit) is replicated into R, G and B for ``channels=3``.
- Palette images (``P``, with or without transparency) take their palette colours.
- Alpha (``RGBA``, ``LA``, ``PA``, transparent palettes) is dropped: we keep the stored
  colour channels and do not composite onto a background. A classifier trained here never
  sees alpha, and compositing would invent a background colour.
- ``CMYK`` and other colour spaces go through Pillow's conversion to RGB.
- 16-bit grayscale (``I;16``, ``I;16B``, ``I``) is scaled to 8 bit by ``round(v * 255 / 65535)``.
- ``channels=1`` is luminance as Pillow's ``L`` conversion computes it (ITU-R 601-2).

Multi-frame files (GIF, TIFF) give their first frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

# modes whose colour channels Pillow converts to RGB directly; alpha-carrying modes go
# through RGBA first so that the alpha channel is dropped rather than composited
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA", "P"})


class BadImageError(ValueError):
    """An image file that cannot be decoded: empty, truncated, corrupt, not an image, or
    too large to be safe. ``path`` is the file at fault."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_path(path: str | Path) -> bool:
    """Whether the file name ends in one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Decode an image file into a uint8 array [H, W, channels] (channels 3 or 1).

    Raises:
        BadImageError: the file is empty, truncated, corrupt, not an image, or has more
            pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (a possible decompression bomb).
        FileNotFoundError: the file does not exist.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    if path.stat().st_size == 0:  # also raises FileNotFoundError for a missing file
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            _check_pixel_count(im)
            # decode now: a truncated file fails here. NOTE: this relies on
            # PIL.ImageFile.LOAD_TRUNCATED_IMAGES being False (Pillow's default); code that
            # sets it True makes Pillow pad truncated files silently, and we cannot tell.
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_array(im, channels)
    except BadImageError as e:
        raise BadImageError(path, e.reason) from None
    except UnidentifiedImageError as e:
        raise BadImageError(path, "not a recognised image format") from e
    except (FileNotFoundError, IsADirectoryError, MemoryError):
        raise
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ...) on bad data
        raise BadImageError(path, f"cannot decode ({type(e).__name__}: {e})") from e


def _check_pixel_count(im: Image.Image) -> None:
    """Refuse images above Pillow's pixel limit before decoding them.

    Pillow only warns between 1x and 2x ``MAX_IMAGE_PIXELS``; we make that an error here
    rather than through the global warnings filter, which is not thread-safe.
    """
    limit = Image.MAX_IMAGE_PIXELS
    w, h = im.size
    if limit is not None and w * h > limit:
        raise BadImageError(
            "", f"{w}x{h} = {w * h} pixels exceeds the limit of {limit} (decompression bomb?)"
        )


def _to_array(im: Image.Image, channels: int) -> np.ndarray:
    """Convert a decoded Pillow image to uint8 [H, W, channels] by the module's rules."""
    if im.mode.startswith("I"):
        gray = _sixteen_bit_to_uint8(np.asarray(im))  # H, W
        return _gray_to_channels(gray, channels)
    if im.mode == "F":
        raise BadImageError("", "floating-point pixels (mode F) are not supported")
    if im.mode in ("L", "1"):
        return _gray_to_channels(np.asarray(im.convert("L")), channels)
    if im.mode in _ALPHA_MODES:
        rgb = np.asarray(im.convert("RGBA"))[:, :, :3]  # H, W, 3: alpha dropped
    else:
        rgb = np.asarray(im.convert("RGB"))  # H, W, 3
    if channels == 1:
        gray = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("L"))
        return gray[:, :, None]  # H, W, 1
    return np.ascontiguousarray(rgb)


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale 16-bit values to 8 bit as round(v * 255 / 65535).

    65535 = 255 * 257, so this is round(v / 257), which never ties; integer arithmetic
    makes it exact.
    """
    values = values.astype(np.int64)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi > 65535:
        raise BadImageError("", f"integer pixels in [{lo}, {hi}] are outside the 16-bit range")
    return ((values + 128) // 257).astype(np.uint8)


def _gray_to_channels(gray: np.ndarray, channels: int) -> np.ndarray:
    """Gray [H, W] to [H, W, channels], replicating into RGB when channels is 3."""
    return np.repeat(gray[:, :, None], channels, axis=2)  # H, W, channels
