"""Pictures of masks: colour overlays with outlines, prompt points and boxes; RGBA cut-outs.

Colours come from a fixed palette (golden-ratio hue steps), so mask ``i`` has the same colour in every
picture and neighbouring indices get well separated hues. Arrays are RGB(A) uint8 throughout; OpenCV
draws straight into them (its colour tuples are just channel values, so RGB order is kept).
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence

import cv2
import numpy as np

from segany.errors import SegAnyError
from segany.io.atomic import atomic_write_bytes
from segany.io.png import encode_png

_GOLDEN = 0.618033988749895
POSITIVE_COLOR = (40, 200, 40)
NEGATIVE_COLOR = (220, 40, 40)
CORNER_COLOR = (40, 120, 240)  # labels 2 / 3: box corners given as points
BOX_COLOR = (0, 255, 0)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def mask_color(i: int) -> tuple[int, int, int]:
    """RGB colour of mask ``i``: hue stepped by the golden ratio, saturated and bright."""
    hue = (0.08 + i * _GOLDEN) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def palette(n: int) -> np.ndarray:
    """``n x 3`` uint8 RGB colours, ``palette(n)[i] == mask_color(i)``."""
    return np.array([mask_color(i) for i in range(n)], dtype=np.uint8).reshape(n, 3)


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise SegAnyError(
            f"expected an H x W x 3 uint8 RGB image, got shape {image.shape} and dtype {image.dtype}"
        )
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def _check_masks(masks: Sequence[np.ndarray], hw: tuple[int, int]) -> list[np.ndarray]:
    out = []
    for i, m in enumerate(masks):
        m = np.asarray(m)
        if m.shape != hw:
            raise SegAnyError(f"mask {i} has shape {m.shape}, but the image is {hw[0]} x {hw[1]}")
        out.append(m.astype(bool, copy=False))
    return out


def _star(center: tuple[float, float], radius: float) -> np.ndarray:
    """Vertices of a five-pointed star, ``10 x 2`` int32 (alternating outer / inner points)."""
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    pts = np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], axis=1)
    return np.round(pts).astype(np.int32)


def _draw_points(out: np.ndarray, points: np.ndarray, labels: np.ndarray, size: int) -> None:
    for (x, y), lab in zip(points, labels):
        if lab == -1:  # padding, not a prompt
            continue
        if lab in (0, 1):
            star = _star((x, y), size)
            cv2.fillPoly(out, [star], POSITIVE_COLOR if lab == 1 else NEGATIVE_COLOR, lineType=cv2.LINE_AA)
            cv2.polylines(out, [star], True, WHITE, max(1, size // 5), lineType=cv2.LINE_AA)
        elif lab in (2, 3):
            c = (int(np.rint(x)), int(np.rint(y)))
            cv2.circle(out, c, max(2, size // 2), CORNER_COLOR, -1, lineType=cv2.LINE_AA)
            cv2.circle(out, c, max(2, size // 2), WHITE, max(1, size // 6), lineType=cv2.LINE_AA)
        else:
            raise SegAnyError(f"point label {lab} is not one of 1, 0, 2, 3, -1")


def overlay_masks(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    alpha: float = 0.5,
    draw_outline: bool = True,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
) -> np.ndarray:
    """Draw masks, prompt points and boxes over an image -> a new ``H x W x 3`` uint8 picture.

    Args:
        image: ``H x W x 3`` uint8 RGB (``H x W`` gray is accepted).
        masks: ``H x W`` bool masks; mask ``i`` is tinted :func:`mask_color(i) <mask_color>` with opacity
            ``alpha``. Larger masks are drawn first so small ones stay visible on top.
        draw_outline: outline each mask (holes too) in its colour.
        points: ``N x 2`` ``(x, y)`` pixels; ``labels`` (``N``, default all 1): 1 = green star,
            0 = red star, 2 / 3 = box-corner dots, -1 = skipped.
        boxes: ``K x 4`` (or ``4``) XYXY boxes, drawn green.
    """
    img = _rgb(image)
    h, w = img.shape[:2]
    masks = _check_masks(masks, (h, w))
    if not 0.0 <= alpha <= 1.0:
        raise SegAnyError(f"alpha must be within [0, 1], got {alpha}")
    colors = palette(len(masks)).astype(np.float32)
    order = sorted(range(len(masks)), key=lambda i: -int(np.count_nonzero(masks[i])))
    out = img.astype(np.float32)
    for i in order:
        m = masks[i]
        out[m] = out[m] * (1.0 - alpha) + colors[i] * alpha
    out = np.ascontiguousarray(np.clip(np.round(out), 0, 255).astype(np.uint8))

    # Line widths and marker sizes follow the picture size so they read the same at any resolution.
    thick = max(1, round(min(h, w) / 400))
    if draw_outline:
        for i in order:
            contours, _ = cv2.findContours(masks[i].astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
            # Contours lie on pixel centres: plain 8-connected lines are crisp, anti-aliasing only blurs.
            cv2.drawContours(out, contours, -1, mask_color(i), thick, lineType=cv2.LINE_8)
    if boxes is not None:
        bx = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
        if not np.isfinite(bx).all():
            raise SegAnyError("boxes must be finite XYXY numbers")
        for x0, y0, x1, y1 in np.round(bx).astype(int):
            # A dark line under the green one keeps the box visible on light and dark images alike.
            cv2.rectangle(out, (x0, y0), (x1, y1), BLACK, thick + 2)
            cv2.rectangle(out, (x0, y0), (x1, y1), BOX_COLOR, thick)
    if points is not None:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2) if np.size(points) else np.zeros((0, 2))
        labs = np.ones(len(pts), dtype=np.int64) if labels is None else np.asarray(labels).reshape(-1)
        if len(labs) != len(pts):
            raise SegAnyError(f"{len(pts)} points but {len(labs)} labels")
        if not np.isfinite(pts).all():
            raise SegAnyError("points must be finite (x, y) numbers")
        _draw_points(out, pts, labs, max(5, round(min(h, w) / 50)))
    return out


def cutout(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The masked object as ``h x w x 4`` RGBA uint8, cropped to the mask's bounding box.

    Pixels outside the mask are fully transparent (alpha 0), inside fully opaque.

    Raises:
        SegAnyError: the mask is empty or does not match the image.
    """
    img = _rgb(image)
    (m,) = _check_masks([mask], img.shape[:2])
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        raise SegAnyError("cutout: the mask is empty, there is nothing to cut out")
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    alpha = np.where(m[y0:y1, x0:x1], 255, 0).astype(np.uint8)
    return np.concatenate([img[y0:y1, x0:x1], alpha[:, :, None]], axis=2)


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an ``H x W x 3`` RGB or ``H x W x 4`` RGBA (or ``H x W`` gray) uint8 array as PNG, atomically."""
    try:
        data = encode_png(array)
    except SegAnyError as e:
        raise SegAnyError(f"{path}: {e}") from None
    atomic_write_bytes(path, data)
