"""Evaluation metrics: mask IoU, interactive-segmentation curves (mIoU@k, NoC, NoF), average recall.

Conventions (RITM / SimpleClick / SAM paper):

- an IoU curve is ``ious[i]`` = IoU after click ``i + 1``; a set of curves is ``N x K`` (objects x clicks);
- NoC@t: the first click count whose IoU is >= t, or ``K`` (= max_clicks) when the curve never gets there;
- NoF@t: how many objects never reach t within the ``K`` clicks (RITM counts NoC == K, which also counts
  an object that reaches t exactly at click K; we count only true failures);
- average recall: per ground-truth instance the best IoU against any predicted mask, recall at IoU
  thresholds 0.50:0.05:0.95, averaged over the thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

#: IoU thresholds of the average recall: 0.50, 0.55, ..., 0.95. linspace, not arange: arange drifts
#: (its last value is 0.9500000000000004, so an IoU of exactly 0.95 would not count).
AR_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def mask_iou(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """IoU of two ``H x W`` bool masks, ``ignore`` pixels (``H x W`` bool) left out of both.

    Two empty masks agree perfectly: IoU 1.0.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred has shape {pred.shape} but gt has {gt.shape}")
    inter = pred & gt
    union = pred | gt
    if ignore is not None:
        ignore = np.asarray(ignore, dtype=bool)
        if ignore.shape != gt.shape:
            raise ValueError(f"ignore has shape {ignore.shape} but gt has {gt.shape}")
        inter &= ~ignore
        union &= ~ignore
    u = int(union.sum())
    return 1.0 if u == 0 else int(inter.sum()) / u


def _curves(ious: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    arr = np.asarray(ious, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"IoU curves must be N x max_clicks, got shape {arr.shape}")
    return arr


def noc(ious: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Per-object number of clicks to reach ``iou_threshold``: ``(N,)`` int, ``K`` where never reached.

    Args:
        ious: ``N x K`` IoU after each of ``K = max_clicks`` clicks.
    """
    arr = _curves(ious)
    reached = arr >= iou_threshold
    first = np.argmax(reached, axis=1) + 1  # argmax: first True
    return np.where(reached.any(axis=1), first, arr.shape[1]).astype(np.int64)


def nof(ious: np.ndarray, iou_threshold: float) -> int:
    """Number of objects (rows of the ``N x K`` curves) that never reach ``iou_threshold``."""
    return int((~(_curves(ious) >= iou_threshold).any(axis=1)).sum())


def _pct(t: float) -> int:
    return round(t * 100)


def summarize_curves(
    ious: np.ndarray,
    ks: Sequence[int] = (1, 3, 5),
    iou_thresholds: Sequence[float] = (0.85, 0.9),
) -> dict[str, float | int]:
    """Summary of ``N x K`` IoU-vs-clicks curves.

    Returns ``{"mIoU@k": mean IoU after k clicks (for each k <= K), "NoC@85": mean NoC, "NoF@85": count,
    ..., "num_objects": N, "max_clicks": K}``. With no objects the means are NaN.
    """
    arr = _curves(ious)
    n, k_max = arr.shape
    out: dict[str, float | int] = {}
    for k in ks:
        if 1 <= k <= k_max:
            out[f"mIoU@{k}"] = float(arr[:, k - 1].mean()) if n else float("nan")
    for t in iou_thresholds:
        out[f"NoC@{_pct(t)}"] = float(noc(arr, t).mean()) if n else float("nan")
        out[f"NoF@{_pct(t)}"] = nof(arr, t)
    out["num_objects"] = n
    out["max_clicks"] = k_max
    return out


def _encode(stack: np.ndarray) -> list:
    """COCO RLEs of ``N x H x W`` bool masks (one pycocotools call for the whole stack)."""
    # pycocotools wants H x W x N, Fortran order, uint8.
    return mask_utils.encode(np.asfortranarray(stack.transpose(1, 2, 0).astype(np.uint8)))


def best_ious(
    gt_masks: np.ndarray | Sequence[np.ndarray],
    pred_masks: np.ndarray | Sequence[np.ndarray],
    ignore: np.ndarray | None = None,
) -> np.ndarray:
    """For each ground-truth mask, its best IoU against any predicted mask: ``(G,)`` float64.

    Args:
        gt_masks: ``G x H x W`` bool (or a list of ``H x W``).
        pred_masks: ``P x H x W`` bool (or a list); zeros for every gt when P = 0.
        ignore: ``H x W`` bool pixels left out of every IoU (cleared in both masks before encoding).
    """
    gt = np.asarray(gt_masks, dtype=bool)
    if gt.ndim != 3:
        raise ValueError(f"gt_masks must be G x H x W, got shape {gt.shape}")
    if len(gt) == 0:
        return np.zeros(0, dtype=np.float64)
    if len(pred_masks) == 0:
        return np.zeros(len(gt), dtype=np.float64)
    pred = np.asarray(pred_masks, dtype=bool)
    if pred.ndim != 3 or pred.shape[1:] != gt.shape[1:]:
        raise ValueError(f"pred_masks have shape {pred.shape}, expected P x {gt.shape[1]} x {gt.shape[2]}")
    if ignore is not None:
        keep = ~np.asarray(ignore, dtype=bool)
        gt, pred = gt & keep, pred & keep
    # RLE IoU: cost scales with run counts, not pixels, and pycocotools does the P x G matrix in C.
    ious = mask_utils.iou(_encode(pred), _encode(gt), [0] * len(gt))
    return np.asarray(ious, dtype=np.float64).reshape(len(pred), len(gt)).max(axis=0)


def recall_curve(best: np.ndarray, thresholds: np.ndarray = AR_THRESHOLDS) -> np.ndarray:
    """Fraction of instances whose best IoU (``(G,)``) is >= each threshold: ``(T,)`` (NaN when G = 0)."""
    best = np.asarray(best, dtype=np.float64)
    if best.size == 0:
        return np.full(len(thresholds), np.nan)
    return (best[None, :] >= np.asarray(thresholds)[:, None]).mean(axis=1)


def average_recall(
    gt_masks: np.ndarray | Sequence[np.ndarray],
    pred_masks: np.ndarray | Sequence[np.ndarray],
    thresholds: np.ndarray = AR_THRESHOLDS,
    ignore: np.ndarray | None = None,
) -> float:
    """Average recall of ``pred_masks`` (``P x H x W``) over ``gt_masks`` (``G x H x W``), NaN when G = 0.

    For a whole data set pool :func:`best_ious` over images and call :func:`recall_curve` once: recall is
    per instance, not per image.
    """
    return float(recall_curve(best_ious(gt_masks, pred_masks, ignore), thresholds).mean())
