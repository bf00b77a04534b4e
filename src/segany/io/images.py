"""Reading images: every path in the project that opens a picture goes through :func:`load_image`.

Pictures come from users and strangers, so the loader is defensive: a bounded pixel count (no
decompression bombs), EXIF orientation applied (phone photos come out upright), and every mode
(grayscale, 16-bit, palette, RGBA, CMYK) converted to 8-bit RGB.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segany.errors import SegAnyError

#: Largest image accepted, in pixels (about 16k x 16k). Larger ones are refused before decoding.
MAX_PIXELS = 268_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the full range down to 8 bits rather than clipping.
        arr = np.asarray(img, dtype=np.float64)
        hi = max(float(arr.max()), 1.0)
        scale = 255.0 / (65535.0 if hi > 255 else 255.0)
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency over white, as viewers show it.
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to an ``H x W x 3`` uint8 RGB array, upright.

    Raises:
        SegAnyError: empty, truncated or corrupt data, an unknown format, or more than ``max_pixels``.
    """
    if not data:
        raise SegAnyError(f"{name}: the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise SegAnyError(f"{name}: the image has no pixels ({w}x{h})")
            if w * h > max_pixels:
                raise SegAnyError(
                    f"{name}: the image is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,}"
                )
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
            rgb.load()
            arr = np.asarray(rgb, dtype=np.uint8)
    except SegAnyError:
        raise
    except Image.DecompressionBombError as e:
        raise SegAnyError(f"{name}: refused, the image decodes to too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise SegAnyError(f"{name}: not an image in a format we can read") from None
    # TypeError: Pillow's TIFF decoder on a tag of the wrong type (e.g. rational strip offsets)
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as e:
        raise SegAnyError(f"{name}: the image is truncated or corrupt ({e})") from None
    return np.ascontiguousarray(arr)


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file as an ``H x W x 3`` uint8 RGB array, upright.

    Raises:
        SegAnyError: the file is missing, unreadable, not an image, corrupt, or too large.
    """
    path = Path(path)
    if not path.exists():
        raise SegAnyError(f"{path}: no such file")
    if path.is_dir():
        raise SegAnyError(f"{path}: is a folder, not an image")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SegAnyError(f"{path}: cannot read ({e.strerror})") from None
    return decode_image(data, name=str(path), max_pixels=max_pixels)


def list_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image paths.

    Raises:
        SegAnyError: an input that does not exist, or no image found at all.
    """
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            found.append(p)
        else:
            raise SegAnyError(f"{p}: no such file or folder")
    if not found:
        raise SegAnyError("no images found in " + ", ".join(str(i) for i in inputs))
    return found
