"""The standard interactive click simulator (RITM / SimpleClick / SAM paper evaluation).

Each new click goes to the centre of the largest error: the false-negative (missed object) and
false-positive (spill) regions are distance-transformed, the region whose interior reaches deeper wins
(FN on ties) and the click lands on its pixel farthest from the region boundary - positive in an FN
region, negative in an FP region. On an empty prediction the first click is the object's interior-most
point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Click:
    """One simulated click at pixel column ``x``, row ``y``; ``is_positive`` = on the object."""

    x: int
    y: int
    is_positive: bool


def _check_mask(name: str, mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {mask.shape}, expected {shape}")
    return mask.astype(bool, copy=False)


def inner_distance(region: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each ``region`` pixel (``H x W`` bool) to the nearest non-region pixel.

    The map is padded with one pixel of False first so that the image border counts as a region border
    (an error touching the border must not have its deepest point on the border itself).
    """
    padded = np.pad(region, 1, mode="constant", constant_values=False).astype(np.uint8)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist[1:-1, 1:-1]


def next_click(gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> Click | None:
    """The next simulated click for ground truth ``gt`` given the current prediction ``pred``.

    Args:
        gt: ``H x W`` bool, the object.
        pred: ``H x W`` bool, the current prediction (all False before the first click).
        ignore: ``H x W`` bool or None; these pixels are never errors, so never clicked.

    Returns:
        The click, or None when there is no error left outside ``ignore`` (nothing to correct).
        Deterministic: among pixels at the maximal distance the first in row-major order wins.
    """
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise ValueError(f"gt must be H x W, got shape {gt.shape}")
    gt = gt.astype(bool, copy=False)
    pred = _check_mask("pred", pred, gt.shape)
    fn = gt & ~pred
    fp = ~gt & pred
    if ignore is not None:
        keep = ~_check_mask("ignore", ignore, gt.shape)
        fn &= keep
        fp &= keep
    fn_dist = inner_distance(fn)
    fp_dist = inner_distance(fp)
    fn_max = float(fn_dist.max(initial=0.0))
    fp_max = float(fp_dist.max(initial=0.0))
    if fn_max == 0.0 and fp_max == 0.0:  # every pixel outside `ignore` is already right
        return None
    is_positive = fn_max >= fp_max  # FN wins ties: missing object is the worse error
    dist = fn_dist if is_positive else fp_dist
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)  # argmax = first occurrence
    return Click(x=int(x), y=int(y), is_positive=is_positive)


def clicks_to_prompt(clicks: Sequence[Click]) -> tuple[np.ndarray, np.ndarray]:
    """SamPredictor point prompt for ``clicks``: ``(coords N x 2 float32 (x, y), labels (N,) int64)``."""
    coords = np.array([[c.x, c.y] for c in clicks], dtype=np.float32).reshape(-1, 2)
    labels = np.array([1 if c.is_positive else 0 for c in clicks], dtype=np.int64)
    return coords, labels
