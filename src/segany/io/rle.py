"""COCO run-length encoding, the one implementation in the project (backed by pycocotools)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segany.errors import SegAnyError


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode an ``H x W`` boolean mask as COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    if mask.ndim != 2:
        raise ValueError(f"encode_rle expects an H x W mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("utf-8")}


def _validate(rle: Any) -> dict[str, Any]:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise SegAnyError("malformed RLE: expected an object with 'size' and 'counts'")
    size = rle["size"]
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in size)
    ):
        raise SegAnyError(f"malformed RLE: 'size' must be [height, width] of non-negative ints, got {size!r}")
    h, w = size
    counts = rle["counts"]
    if isinstance(counts, list):
        # Uncompressed RLE: run lengths alternate background/foreground, starting with background.
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise SegAnyError("malformed RLE: uncompressed 'counts' must be non-negative ints")
        if sum(counts) != h * w:
            raise SegAnyError(f"malformed RLE: counts sum to {sum(counts)}, expected {h}*{w}={h * w}")
        return mask_utils.frPyObjects({"size": [h, w], "counts": list(counts)}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("utf-8")
    if not isinstance(counts, bytes):
        raise SegAnyError("malformed RLE: 'counts' must be a string or a list of ints")
    if any(c < 48 or c > 111 for c in counts):  # the COCO alphabet is chr(48)..chr(111)
        raise SegAnyError("malformed RLE: 'counts' holds characters outside the COCO RLE alphabet")
    runs = _compressed_runs(counts)
    # pycocotools does not check the runs: short or overlong ones decode to garbage or crash.
    if (runs < 0).any() or int(runs.sum()) != h * w:
        raise SegAnyError(
            f"malformed RLE: the runs of 'counts' add up to {int(runs.sum())}, expected {h}*{w}={h * w}"
            if (runs >= 0).all()
            else "malformed RLE: 'counts' decodes to negative run lengths"
        )
    return {"size": [h, w], "counts": counts}


def _compressed_runs(counts: bytes) -> np.ndarray:
    """Run lengths of a compressed COCO counts string (pycocotools' rleFrString, vectorised)."""
    if not counts:
        return np.zeros(0, dtype=np.int64)
    a = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    more = (a & 0x20) != 0
    if more[-1]:
        raise SegAnyError("malformed RLE: 'counts' ends in the middle of a number")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 7:  # 35 bits: far more pixels than any image has
        raise SegAnyError("malformed RLE: 'counts' holds a run length that is too large")
    pos = np.arange(len(a)) - np.repeat(starts, lengths)
    vals = np.add.reduceat((a & 0x1F) << (5 * pos), starts)
    vals = np.where((a[ends] & 0x10) != 0, vals - (np.int64(1) << (5 * lengths)), vals)
    # From the 4th run on, each is stored as the difference to the run two before.
    vals[1::2] = np.cumsum(vals[1::2])
    vals[2::2] = np.cumsum(vals[2::2])
    return vals


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Decode COCO RLE (compressed or uncompressed) to an ``H x W`` boolean mask.

    Raises:
        SegAnyError: the RLE is malformed or its runs do not add up to ``H x W``.
    """
    coco = _validate(rle)
    h, w = coco["size"]
    if h * w == 0:
        return np.zeros((h, w), dtype=bool)
    m = mask_utils.decode(coco)
    if m.shape != (h, w):
        raise SegAnyError("malformed RLE: decoded shape does not match 'size'")
    return m.astype(bool)


def compress_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """Any valid RLE (uncompressed ``counts`` list or compressed) -> compressed, ``counts`` a str."""
    coco = _validate(rle)
    return {"size": [int(s) for s in coco["size"]], "counts": coco["counts"].decode("utf-8")}


def rle_area(rle: dict[str, Any]) -> int:
    """Foreground pixel count of an RLE."""
    return int(mask_utils.area(_validate(rle)))


def rle_to_bbox(rle: dict[str, Any]) -> list[float]:
    """Bounding box ``[x, y, w, h]`` of an RLE's foreground (zeros when empty)."""
    return [float(v) for v in mask_utils.toBbox(_validate(rle))]
