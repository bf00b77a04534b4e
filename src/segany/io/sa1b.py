"""SA-1B per-image annotation JSON: ``{"image": {...}, "annotations": [...]}``.

The format of the SA-1B release (one JSON per image): ``image`` holds ``image_id``, ``width``,
``height``, ``file_name``; each annotation holds ``id``, ``segmentation`` (COCO compressed RLE),
``bbox`` (XYWH), ``area``, ``predicted_iou``, ``stability_score``, ``point_coords`` (``[[x, y]]``) and
``crop_box`` (XYWH).

The validation helpers here are shared with :mod:`segany.io.coco`: a file written by someone else is
checked field by field, and every problem names the file, the annotation and the value.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segany.errors import SegAnyError
from segany.io.atomic import atomic_write_json
from segany.io.rle import decode_rle, encode_rle, rle_area, rle_to_bbox

ANNOTATION_KEYS = ("id", "segmentation", "bbox", "area")
#: Optional annotation fields (written when the record has them, checked when a file has them).
SCORE_KEYS = ("predicted_iou", "stability_score")


# -- small checks (shared with coco.py) ----------------------------------------------------------


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite JSON number (bools are not numbers, NaN/Infinity are refused)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def to_builtin(v: Any) -> Any:
    """numpy / torch values -> plain Python, so records from the generator serialise as JSON."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [to_builtin(x) for x in v]
    if isinstance(v, dict):
        return {k: to_builtin(x) for k, x in v.items()}
    return v


def check_image_info(info: Any, where: str, id_key: str = "image_id") -> dict[str, Any]:
    """Check an image entry (``id_key``, ``width``, ``height``, ``file_name``); returns it."""
    if not isinstance(info, dict):
        raise SegAnyError(f"{where}: the image entry must be an object, got {type(info).__name__}")
    for key in (id_key, "width", "height", "file_name"):
        if key not in info:
            raise SegAnyError(f"{where}: the image entry has no {key!r}")
    if not is_int(info[id_key]):
        raise SegAnyError(f"{where}: image {id_key} must be an integer, got {info[id_key]!r}")
    for key in ("width", "height"):
        if not is_int(info[key]) or info[key] <= 0:
            raise SegAnyError(f"{where}: image {key} must be a positive integer, got {info[key]!r}")
    if not isinstance(info["file_name"], str):
        raise SegAnyError(f"{where}: image file_name must be a string, got {info['file_name']!r}")
    return info


def check_box(v: Any, what: str, where: str) -> list[float]:
    """A box of 4 finite numbers with non-negative width and height (XYWH)."""
    if not isinstance(v, list) or len(v) != 4 or not all(is_number(x) for x in v):
        raise SegAnyError(f"{where}: {what} must be a list of 4 numbers, got {v!r}")
    if v[2] < 0 or v[3] < 0:
        raise SegAnyError(f"{where}: {what} {v!r} has a negative width or height")
    return v


def check_rle(seg: Any, height: int, width: int, where: str) -> dict[str, Any]:
    """Check a COCO RLE (compressed or uncompressed) against the image size; returns it.

    The counts are checked too (alphabet, runs summing to ``H x W``) without decoding the mask.
    """
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        raise SegAnyError(f"{where}: segmentation must be an RLE object with 'size' and 'counts'")
    size = seg["size"]
    if not isinstance(size, list) or len(size) != 2 or not all(is_int(s) for s in size):
        raise SegAnyError(f"{where}: segmentation size must be [height, width], got {size!r}")
    if size != [height, width]:
        raise SegAnyError(
            f"{where}: segmentation size {size} does not match the image (height {height}, width {width})"
        )
    try:
        rle_area(seg)
    except SegAnyError as e:
        raise SegAnyError(f"{where}: {e}") from None
    return seg


def normalize_segmentation(seg: Any, height: int, width: int, where: str) -> dict[str, Any]:
    """A bool mask / tensor, or compressed / uncompressed RLE -> compressed RLE with ``str`` counts."""
    if isinstance(seg, torch.Tensor):
        seg = seg.detach().cpu().numpy()
    if isinstance(seg, np.ndarray):
        if seg.shape != (height, width):
            raise SegAnyError(
                f"{where}: mask of shape {seg.shape} does not match the image (height {height}, width {width})"
            )
        return encode_rle(seg.astype(bool, copy=False))
    if isinstance(seg, dict) and isinstance(seg.get("counts"), bytes):
        seg = {"size": to_builtin(seg.get("size")), "counts": seg["counts"].decode("latin-1")}
    elif isinstance(seg, dict):
        seg = {"size": to_builtin(seg.get("size")), "counts": seg.get("counts")}
    check_rle(seg, height, width, where)
    if isinstance(seg["counts"], list):  # uncompressed: store the compact, standard form
        return encode_rle(decode_rle(seg))
    return seg


def check_annotation(
    ann: Any, height: int, width: int, where: str, required: tuple[str, ...] = ANNOTATION_KEYS
) -> dict[str, Any]:
    """Check one SA-1B style annotation (types, RLE size, boxes, scores, points); returns it."""
    if not isinstance(ann, dict):
        raise SegAnyError(f"{where}: must be an object, got {type(ann).__name__}")
    for key in required:
        if key not in ann:
            raise SegAnyError(f"{where}: missing key {key!r}")
    if "id" in ann and not is_int(ann["id"]):
        raise SegAnyError(f"{where}: id must be an integer, got {ann['id']!r}")
    if "segmentation" in ann:
        check_rle(ann["segmentation"], height, width, where)
    if "bbox" in ann:
        check_box(ann["bbox"], "bbox", where)
    if "area" in ann and (not is_number(ann["area"]) or ann["area"] < 0):
        raise SegAnyError(f"{where}: area must be a non-negative number, got {ann['area']!r}")
    for key in (*SCORE_KEYS, "score"):
        if key in ann and not is_number(ann[key]):
            raise SegAnyError(f"{where}: {key} must be a number, got {ann[key]!r}")
    if "point_coords" in ann:
        pts = ann["point_coords"]
        if not isinstance(pts, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(is_number(c) for c in p) for p in pts
        ):
            raise SegAnyError(f"{where}: point_coords must be a list of [x, y] numbers, got {pts!r}")
    if "crop_box" in ann:
        check_box(ann["crop_box"], "crop_box", where)
    return ann


def record_to_annotation(record: dict[str, Any], ann_id: int, height: int, width: int, where: str) -> dict:
    """A generator record -> an SA-1B annotation (plain JSON types, compressed RLE, checked).

    ``area`` and ``bbox`` are computed from the mask when the record lacks them.
    """
    if not isinstance(record, dict) or "segmentation" not in record:
        raise SegAnyError(f"{where}: a record must be a dict with a 'segmentation'")
    seg = normalize_segmentation(record["segmentation"], height, width, where)
    ann: dict[str, Any] = {"id": ann_id, "segmentation": seg}
    ann["bbox"] = to_builtin(record["bbox"]) if "bbox" in record else rle_to_bbox(seg)
    ann["area"] = to_builtin(record["area"]) if "area" in record else rle_area(seg)
    for key in (*SCORE_KEYS, "point_coords", "crop_box"):
        if key in record:
            ann[key] = to_builtin(record[key])
    check_annotation(ann, height, width, where)
    ann["bbox"] = [float(x) for x in ann["bbox"]]
    return ann


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a missing file or a syntax error is a SegAnyError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SegAnyError(f"{path}: no such file")
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise SegAnyError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise SegAnyError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except OSError as e:
        raise SegAnyError(f"{path}: cannot read ({e.strerror})") from None


# -- the format ----------------------------------------------------------------------------------


def write_sa1b(path: str | os.PathLike, image_info: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Write one image's masks as an SA-1B JSON, atomically.

    Args:
        path: the ``.json`` to write.
        image_info: ``image_id`` (int), ``width``, ``height``, ``file_name``.
        records: generator records; ``segmentation`` is a COCO RLE (compressed or not) or an ``H x W``
            bool mask. ``bbox`` (XYWH), ``area``, ``predicted_iou``, ``stability_score``,
            ``point_coords``, ``crop_box`` (XYWH) are copied; annotation ids run 1, 2, ...

    Raises:
        SegAnyError: a bad image entry, or a record whose mask / fields do not fit the image.
    """
    info = check_image_info(to_builtin(image_info), f"{path}")
    h, w = info["height"], info["width"]
    anns = [record_to_annotation(r, i + 1, h, w, f"{path}: record {i}") for i, r in enumerate(records)]
    atomic_write_json(path, {"image": info, "annotations": anns})


def read_sa1b(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read and check an SA-1B JSON -> ``(image_info, annotations)``.

    Raises:
        SegAnyError: bad JSON, a missing key, a wrong type, an RLE whose size is not the image's,
            a malformed box, or repeated annotation ids; the message names the file and annotation.
    """
    data = read_json(path)
    if not isinstance(data, dict) or "image" not in data or "annotations" not in data:
        raise SegAnyError(f"{path}: not an SA-1B file (expected an object with 'image' and 'annotations')")
    info = check_image_info(data["image"], f"{path}")
    anns = data["annotations"]
    if not isinstance(anns, list):
        raise SegAnyError(f"{path}: 'annotations' must be a list, got {type(anns).__name__}")
    seen: set[int] = set()
    for i, ann in enumerate(anns):
        where = f"{path}: annotation {i}"
        check_annotation(ann, info["height"], info["width"], where)
        if ann["id"] in seen:
            raise SegAnyError(f"{where}: id {ann['id']} is used twice")
        seen.add(ann["id"])
    return info, anns


def iter_sa1b_masks(path: str | os.PathLike) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Read an SA-1B JSON -> ``(image_info, [H x W bool mask per annotation])``."""
    info, anns = read_sa1b(path)
    return info, [decode_rle(a["segmentation"]) for a in anns]
