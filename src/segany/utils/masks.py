"""Mask utilities for "segment everything": boxes from masks, stability, NMS, crops and point grids.

The one home of these helpers; the automatic mask generator imports them. Behaviour follows the
official segment-anything 1.0 ``utils/amg.py`` (same numbers for grids, crop boxes, stability scores,
boxes), and the NMS follows ``torchvision.ops.nms`` (torchvision is not a dependency).

Conventions: masks are bool (``... x H x W``), boxes are XYXY in pixels, crop boxes are ``[x0, y0, x1, y1]``
lists of ints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import product
from typing import Any

import cv2
import numpy as np
import torch

from segany.errors import SegAnyError
from segany.io.rle import decode_rle

# Elements of the pairwise IoU matrix computed at once in NMS (1 MB of float32 per temporary): small
# enough to stay in cache and skip the page faults of big fresh allocations (timing in
# benchmarks/README.md), large enough to keep the work vectorised.
NMS_BLOCK = 1 << 18


# -- boxes ---------------------------------------------------------------------------------------


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes around masks, ``... x H x W`` bool -> ``... x 4`` int64.

    ``x1``/``y1`` are the largest column/row inside the mask (inclusive, as the official code), and an
    empty mask gives ``[0, 0, 0, 0]``.
    """
    if masks.dim() < 2:
        raise ValueError(f"batched_mask_to_box expects ... x H x W masks, got shape {tuple(masks.shape)}")
    *lead, h, w = masks.shape
    if masks.numel() == 0:
        return torch.zeros(*lead, 4, dtype=torch.int64, device=masks.device)
    masks = masks if masks.dtype == torch.bool else masks != 0
    rows = masks.any(dim=-1).to(torch.uint8)  # ... x H: which rows hold a pixel
    cols = masks.any(dim=-2).to(torch.uint8)  # ... x W
    # argmax returns the first maximum, so argmax of the flipped vector finds the last set index.
    top = rows.argmax(dim=-1)
    bottom = (h - 1) - rows.flip(-1).argmax(dim=-1)
    left = cols.argmax(dim=-1)
    right = (w - 1) - cols.flip(-1).argmax(dim=-1)
    out = torch.stack([left, top, right, bottom], dim=-1)
    empty = rows.amax(dim=-1) == 0
    return out.masked_fill(empty.unsqueeze(-1), 0)


def box_xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """``... x 4`` XYXY -> ``... x 4`` XYWH (a new tensor)."""
    out = boxes.clone()
    out[..., 2:] = boxes[..., 2:] - boxes[..., :2]
    return out


def _as_float(boxes: torch.Tensor) -> torch.Tensor:
    return boxes if boxes.is_floating_point() else boxes.float()


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of ``N x 4`` XYXY boxes -> ``N`` (``(x1 - x0) * (y1 - y0)``, as torchvision)."""
    boxes = _as_float(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of XYXY boxes, ``N x 4`` and ``M x 4`` -> ``N x M``.

    Same arithmetic as torchvision (areas without the +1, intersection clamped at 0); two zero-area boxes
    give NaN (0 / 0), which compares false against any threshold, as in torchvision's NMS.
    """
    boxes1, boxes2 = _as_float(boxes1), _as_float(boxes2)
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


# -- non-maximum suppression ---------------------------------------------------------------------


def _greedy_keep(boxes: torch.Tensor, idxs: torch.Tensor | None, iou_threshold: float) -> list[int]:
    """Greedy NMS over boxes already sorted by score; returns kept positions (ascending)."""
    n = boxes.shape[0]
    # Only box i suppressing a later box j > i matters, so each chunk of rows is compared with the
    # boxes from its first row on: the upper triangle, about half the work of the full matrix.
    over = np.zeros((n, n), dtype=bool)
    rows = max(1, NMS_BLOCK // n)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        sup = box_iou(boxes[s:e], boxes[s:]) > iou_threshold
        if idxs is not None:  # boxes of different categories never suppress each other
            sup &= idxs[s:e, None] == idxs[None, s:]
        over[s:e, s:] = sup.cpu().numpy()
    removed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        removed[i + 1 :] |= over[i, i + 1 :]
    return keep


def _nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor | None, thr: float) -> torch.Tensor:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"NMS expects N x 4 boxes, got shape {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1] or (idxs is not None and idxs.shape != boxes.shape[:1]):
        raise ValueError(f"NMS: {boxes.shape[0]} boxes but scores/idxs of shape {tuple(scores.shape)}")
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    # A stable sort keeps equal scores in input order, as torchvision's CPU kernel does.
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = _greedy_keep(_as_float(boxes)[order], None if idxs is None else idxs[order], thr)
    return order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)]


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, semantics of ``torchvision.ops.nms``.

    Args:
        boxes: ``N x 4`` XYXY.
        scores: ``N``.
        iou_threshold: a box is dropped when its IoU with a kept, higher-scoring box is > this.

    Returns:
        ``K`` int64 indices of the kept boxes, by decreasing score (ties in input order).
    """
    return _nms(boxes, scores, None, iou_threshold)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each category ``idxs`` (``N`` ints), semantics of ``torchvision.ops.batched_nms``.

    torchvision offsets each category's boxes so they cannot overlap; here the cross-category pairs are
    masked out of the IoU matrix instead, which gives the same kept set without the float rounding
    that large offsets bring. Returns kept indices by decreasing score.
    """
    return _nms(boxes, scores, idxs, iou_threshold)


# -- scores --------------------------------------------------------------------------------------


def calculate_stability_score(
    logits: torch.Tensor, mask_threshold: float, threshold_offset: float
) -> torch.Tensor:
    """IoU of each mask thresholded at ``thr + offset`` and at ``thr - offset``, ``N x H x W`` -> ``N``.

    The high-threshold mask lies inside the low-threshold one, so the IoU is a ratio of pixel counts.
    Counts are summed in int16 along rows, then int32, so no int64 copy of the logits is made. An
    all-background mask gives NaN (0 / 0), as the official code.
    """
    if logits.device.type == "cpu" and not logits.requires_grad and logits.dtype == torch.float32:
        # NumPy's comparison and count: faster than torch's comparison to bool and sums (benchmarks/README.md).
        arr = logits.detach().reshape(-1, *logits.shape[-2:]).numpy()
        counts = [
            [np.count_nonzero(np.greater(m, mask_threshold + threshold_offset)) for m in arr],
            [np.count_nonzero(np.greater(m, mask_threshold - threshold_offset)) for m in arr],
        ]
        inter, union = torch.tensor(counts, dtype=torch.int32).view(2, *logits.shape[:-2])
        return inter / union
    # int16 row sums overflow past 32767 columns; fall back to int32 for such (rare) widths.
    row_dtype = torch.int16 if logits.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
    inter = (logits > (mask_threshold + threshold_offset)).sum(-1, dtype=row_dtype).sum(-1, dtype=torch.int32)
    union = (logits > (mask_threshold - threshold_offset)).sum(-1, dtype=row_dtype).sum(-1, dtype=torch.int32)
    return inter / union


# -- point grids and crops -----------------------------------------------------------------------


def build_point_grid(n_per_side: int) -> np.ndarray:
    """``n*n x 2`` points ``(x, y)`` in [0, 1], cell centres of an ``n x n`` grid, x fastest."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer (``n_layers + 1``); layer ``i`` has ``n_per_side / scale**i`` per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes ``[x0, y0, x1, y1]`` for the whole image then each layer, and each box's layer.

    Layer ``i`` (1-based) cuts the image into ``2**i x 2**i`` overlapping crops; the overlap is
    ``overlap_ratio`` of the short side scaled by the crop count. Same boxes, same order as the official
    code (the arithmetic is kept identical so rounding matches).
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes: list[list[int]] = [[0, 0, im_w, im_h]]
    layer_idxs: list[int] = [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops)

    for i_layer in range(n_layers):
        n_crops = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops))
        crop_w = crop_len(im_w, n_crops, overlap)
        crop_h = crop_len(im_h, n_crops, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n_crops)]
        y0s = [int((crop_h - overlap) * i) for i in range(n_crops)]
        for x0, y0 in product(x0s, y0s):  # x outer, y inner: the official order
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """``N x 4`` crop-frame XYXY boxes -> ``N`` bool: touches a crop edge that is not an image edge.

    Masks cut by a crop boundary are incomplete; the generator drops them and lets a neighbouring crop
    (or the full image) supply the whole object.
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(boxes, crop[None, :], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig[None, :], atol=atol, rtol=0)
    return torch.any(near_crop & ~near_image, dim=1)


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Shift ``N x 4`` (or ``B x N x 4``) XYXY boxes from crop to image coordinates."""
    x0, y0 = crop_box[0], crop_box[1]
    offset = torch.tensor([x0, y0, x0, y0], device=boxes.device)
    return boxes + offset  # broadcasts over any leading dims


def uncrop_points(points: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Shift ``N x 2`` (or ``B x N x 2``) points ``(x, y)`` from crop to image coordinates."""
    offset = torch.tensor([crop_box[0], crop_box[1]], device=points.device)
    return points + offset


def uncrop_masks(masks: torch.Tensor, crop_box: Sequence[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Pad ``... x h x w`` crop masks with background to ``... x orig_h x orig_w`` image masks."""
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    return torch.nn.functional.pad(masks, (x0, pad_x - x0, y0, pad_y - y0), value=0)


def batch_iterator(batch_size: int, *args: Sequence[Any]) -> Iterator[list[Any]]:
    """Yield ``[a[b:b+batch_size] for a in args]`` over equally long sequences."""
    if not args or any(len(a) != len(args[0]) for a in args):
        raise ValueError("batch_iterator needs one or more sequences of the same length")
    for start in range(0, len(args[0]), batch_size):
        yield [a[start : start + batch_size] for a in args]


# -- post-processing -----------------------------------------------------------------------------


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill small holes (``mode="holes"``) or drop small islands (``"islands"``) of an ``H x W`` mask.

    Regions are 8-connected; "small" is fewer than ``area_thresh`` pixels. In islands mode, when every
    island is small the largest one is kept. Returns ``(mask, changed)``; an unchanged mask is returned
    as given.
    """
    if mode not in ("holes", "islands"):
        raise SegAnyError(f"remove_small_regions: mode must be 'holes' or 'islands', got {mode!r}")
    if mask.size == 0:
        return mask, False
    holes = mode == "holes"
    # Holes are the islands of the inverted mask.
    working = (mask != holes).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the background of `working`
    small = np.flatnonzero(sizes < area_thresh) + 1
    if small.size == 0:
        return mask, False
    if holes:
        fill = np.zeros(n_labels, dtype=bool)
        fill[0] = True  # the mask itself
        fill[small] = True  # plus the small holes
    else:
        fill = np.ones(n_labels, dtype=bool)
        fill[0] = False
        fill[small] = False
        if not fill.any():
            fill[int(np.argmax(sizes)) + 1] = True
    return fill[regions], True  # a lookup table: one pass over the pixels


def keep_parts_touching_box(mask: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """``H x W`` bool mask from a box prompt -> the mask without its parts (8-connected) that lie wholly
    outside the XYXY ``box``. A box says the object is in it: a separate speck elsewhere is not the
    object, while a part that reaches into the box is kept whole (the model says the object is larger
    than the box drawn)."""
    if not mask.any():
        return mask
    h, w = mask.shape
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(w, math.ceil(box[2]) + 1), min(h, math.ceil(box[3]) + 1)
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    inside = np.zeros(n, dtype=bool)
    inside[np.unique(labels[y0:y1, x0:x1])] = True
    inside[0] = False  # the background
    return inside[labels]


# -- uncompressed RLE (the generator's "uncompressed_rle" output) ------------------------------------


def mask_instances(
    logits: np.ndarray, iou: float, threshold: float, min_area: float, max_instances: int, min_score: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The connected parts (8-connected) of ``logits > threshold`` (``H x W``) as instances, best first.

    Each part is scored by its mean probability (the logits' sigmoid) times ``iou`` (clipped to [0, 1]);
    parts under ``min_area`` pixels or ``min_score`` are dropped.

    Returns:
        masks ``K x H x W`` bool and scores ``K`` float32 (K <= ``max_instances``), sorted by score.
    """
    h, w = logits.shape
    prob = 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats((logits > threshold).astype(np.uint8), connectivity=8)
    masks, scores = [], []
    for k in range(1, n):
        if stats[k, cv2.CC_STAT_AREA] < min_area:
            continue
        part = labels == k
        score = float(prob[part].mean() * np.clip(iou, 0, 1))
        if score >= min_score:
            masks.append(part)
            scores.append(score)
    order = np.argsort(-np.asarray(scores, np.float32))[:max_instances]
    if len(order) == 0:
        return np.zeros((0, h, w), bool), np.zeros((0,), np.float32)
    return np.stack([masks[i] for i in order]), np.asarray(scores, np.float32)[order]


def mask_to_rle_pytorch(tensor: torch.Tensor) -> list[dict[str, Any]]:
    """Encode ``B x H x W`` bool masks as uncompressed COCO RLE ``{"size": [H, W], "counts": [int]}``.

    Runs are in column-major (Fortran) order and start with a background run (0 when the first pixel
    is set), the pycocotools convention. All change points are found in one pass over the batch.
    For compressed RLE use :func:`segany.io.rle.encode_rle`.
    """
    if tensor.dim() != 3:
        raise ValueError(f"mask_to_rle_pytorch expects B x H x W masks, got shape {tuple(tensor.shape)}")
    b, h, w = tensor.shape
    n = h * w
    if n == 0:
        return [{"size": [h, w], "counts": []} for _ in range(b)]
    flat = tensor.permute(0, 2, 1).flatten(1)
    flat = flat if flat.dtype == torch.bool else flat != 0
    rows, cols = (flat[:, 1:] ^ flat[:, :-1]).nonzero(as_tuple=True)  # rows come out sorted
    per_mask = torch.bincount(rows, minlength=b).cpu().numpy()
    starts = np.split((cols + 1).cpu().numpy(), np.cumsum(per_mask)[:-1])
    first = flat[:, 0].cpu().tolist()
    out = []
    for i in range(b):
        bounds = np.concatenate(([0], starts[i], [n]))
        counts = [0] if first[i] else []
        counts.extend(np.diff(bounds).tolist())
        out.append({"size": [h, w], "counts": counts})
    return out


#: Alias: the uncompressed flavour of RLE, by a descriptive name.
masks_to_uncompressed_rle = mask_to_rle_pytorch


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode an RLE (uncompressed or compressed) to an ``H x W`` bool mask (via segany.io.rle)."""
    return decode_rle(rle)
