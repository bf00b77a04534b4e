"""Validation of what users give the predictors: images and prompt sets. Bad values raise
:class:`segany.errors.SegAnyError` with a message that names the value at fault."""

from __future__ import annotations

import numpy as np

from segany.errors import SegAnyError


def _as_array(name: str, value, shape_desc: str, ndim: int, last: int | None) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise SegAnyError(f"{name} must be numeric, shape {shape_desc}") from None
    if arr.ndim != ndim or (last is not None and arr.shape[-1] != last):
        raise SegAnyError(f"{name} must have shape {shape_desc}, got {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise SegAnyError(f"{name} holds NaN or infinite values")
    return arr


def check_fits_float32(name: str, arr: np.ndarray) -> None:
    """SegAnyError where ``arr`` holds values beyond float32 range."""
    # Finite but enormous values (e.g. 1e300) overflow to inf in the model's float32 frame and give NaN masks.
    with np.errstate(over="ignore"):
        fits = np.isfinite(arr.astype(np.float32)).all()
    if not fits:
        raise SegAnyError(f"{name} holds values too large for the model (beyond float32 range)")


def check_prompts(
    point_coords: np.ndarray | None,
    point_labels: np.ndarray | None,
    box: np.ndarray | None,
    mask_input: np.ndarray | None,
    mask_side: tuple[int, int],
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Validate one prompt set (shared by every predictor): ``(coords N x 2, labels N, box 4, mask 1 x h x w)``.

    Raises:
        SegAnyError: wrong shapes, NaN/inf, labels other than 1/0/2/3/-1, labels without points.
    """
    coords = labels = b = m = None
    if point_coords is not None:
        if point_labels is None:
            raise SegAnyError("point_labels must be supplied with point_coords")
        coords = _as_array("point_coords", point_coords, "N x 2", 2, 2)
        labels = _as_array("point_labels", point_labels, "N", 1, None)
        if len(labels) != len(coords):
            raise SegAnyError(f"{len(coords)} points but {len(labels)} labels")
        if not np.isin(labels, (0, 1, 2, 3, -1)).all():
            raise SegAnyError("point_labels must be 1 (positive), 0 (negative), 2/3 (box corners) or -1")
    elif point_labels is not None:
        raise SegAnyError("point_labels given without point_coords")
    if box is not None:
        b = _as_array("box", np.asarray(box).reshape(-1) if np.size(box) == 4 else box, "4 (x0, y0, x1, y1)", 1, 4)
    if mask_input is not None:
        h, w = mask_side
        m = _as_array("mask_input", mask_input, f"1 x {h} x {w}", 3, None)
        if m.shape != (1, h, w):
            raise SegAnyError(f"mask_input must have shape 1 x {h} x {w}, got {m.shape}")
    return coords, labels, b, m


def check_image(image: np.ndarray) -> None:
    """An image for the model must be an ``H x W x 3`` uint8 array with pixels; else SegAnyError."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise SegAnyError(f"image must be an H x W x 3 array, got shape {shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise SegAnyError(f"image has no pixels: shape {image.shape}")
    if image.dtype != np.uint8:
        raise SegAnyError(f"image must be uint8, got {image.dtype}")
