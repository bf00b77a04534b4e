"""COCO instances JSON: export a folder's masks, read (and check) files from anywhere.

Written files load with ``pycocotools.coco.COCO``: ``images``, ``annotations`` (compressed RLE
``segmentation``, ``area``, ``bbox`` XYWH, ``iscrowd`` 0, ``category_id``, ``score``) and ``categories``
(one class, ``1 "object"``, unless given). Reading accepts polygon and uncompressed-RLE segmentations and
returns every segmentation as compressed RLE, so the rest of the project sees one form.
"""

from __future__ import annotations

import os
from typing import Any

from pycocotools import mask as mask_utils

from segany.errors import SegAnyError
from segany.io.atomic import atomic_write_json
from segany.io.rle import decode_rle, encode_rle
from segany.io.sa1b import (
    check_annotation,
    check_box,
    check_image_info,
    check_rle,
    is_int,
    is_number,
    read_json,
    record_to_annotation,
    to_builtin,
)

DEFAULT_CATEGORIES: list[dict[str, Any]] = [{"id": 1, "name": "object", "supercategory": "object"}]


def _check_categories(categories: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(categories, list):
        raise SegAnyError(f"{where}: 'categories' must be a list")
    ids: set[int] = set()
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise SegAnyError(f"{where}: category {i} must be an object with an integer id and a name")
        if cat["id"] in ids:
            raise SegAnyError(f"{where}: category id {cat['id']} is used twice")
        ids.add(cat["id"])
    return categories


class CocoWriter:
    """Collect images and their generator records, then write one COCO instances JSON.

    >>> w = CocoWriter()
    >>> w.add({"image_id": 1, "width": 640, "height": 480, "file_name": "a.jpg"}, records)
    >>> w.write("instances.json")
    """

    def __init__(self, categories: list[dict[str, Any]] | None = None) -> None:
        cats = to_builtin(categories) if categories is not None else [dict(c) for c in DEFAULT_CATEGORIES]
        self.categories = _check_categories(cats, "categories")
        if not self.categories:
            raise SegAnyError("categories: at least one category is needed")
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self._image_ids: set[int] = set()

    def add(self, image_info: dict[str, Any], records: list[dict[str, Any]]) -> int:
        """Add one image (``image_id`` optional: the next free id) and its records; returns the image id.

        A record may carry ``category_id`` (default: the first category) and ``score`` (default: its
        ``predicted_iou`` when it has one).

        Raises:
            SegAnyError: a bad image entry, a repeated image id, a record that does not fit the image,
                or an unknown category.
        """
        info = to_builtin(image_info)
        if not isinstance(info, dict):
            raise SegAnyError(f"image entry must be a dict, got {type(image_info).__name__}")
        info = dict(info)
        if "image_id" not in info:
            info["image_id"] = max(self._image_ids, default=0) + 1
        name = info.get("file_name", "<image>")
        check_image_info(info, f"{name}")
        image_id = info["image_id"]
        if image_id in self._image_ids:
            raise SegAnyError(f"{name}: image id {image_id} is used twice")
        h, w = info["height"], info["width"]
        cat_ids = {c["id"] for c in self.categories}
        new = []
        for i, rec in enumerate(records):
            where = f"{name}: record {i}"
            ann = record_to_annotation(rec, len(self.annotations) + len(new) + 1, h, w, where)
            cat = to_builtin(rec.get("category_id", self.categories[0]["id"]))
            if not is_int(cat) or cat not in cat_ids:
                raise SegAnyError(f"{where}: category_id {cat!r} is not one of {sorted(cat_ids)}")
            ann.update(image_id=image_id, category_id=cat, iscrowd=0)
            score = rec.get("score", rec.get("predicted_iou"))
            if score is not None:
                ann["score"] = float(to_builtin(score))
            new.append(ann)
        coco_image = {k: v for k, v in info.items() if k != "image_id"}
        self.images.append({"id": image_id, **coco_image})
        self.annotations.extend(new)
        self._image_ids.add(image_id)
        return image_id

    def to_dict(self) -> dict[str, Any]:
        """The COCO instances structure (``info``, ``licenses``, ``images``, ``annotations``, ``categories``)."""
        return {
            "info": {"description": "segany masks"},
            "licenses": [],
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
        }

    def write(self, path: str | os.PathLike) -> None:
        """Write the JSON atomically."""
        atomic_write_json(path, self.to_dict())


def write_coco(
    path: str | os.PathLike,
    entries: list[tuple[dict[str, Any], list[dict[str, Any]]]],
    categories: list[dict[str, Any]] | None = None,
) -> None:
    """Write ``[(image_info, records), ...]`` as one COCO instances JSON (see :class:`CocoWriter`)."""
    writer = CocoWriter(categories)
    for info, records in entries:
        writer.add(info, records)
    writer.write(path)


def _segmentation_to_rle(seg: Any, h: int, w: int, where: str) -> dict[str, Any]:
    """Polygons / uncompressed RLE / compressed RLE -> compressed RLE with ``str`` counts."""
    if isinstance(seg, list):
        if not seg or not all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(is_number(c) for c in p)
            for p in seg
        ):
            # pycocotools would read a 4-number "polygon" as a box, so short ones are refused here.
            raise SegAnyError(
                f"{where}: polygon segmentation must be a list of [x1, y1, x2, y2, ...] lists "
                f"of at least 3 points"
            )
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        return {"size": [h, w], "counts": rle["counts"].decode("utf-8")}
    check_rle(seg, h, w, where)
    if isinstance(seg["counts"], list):
        return encode_rle(decode_rle(seg))
    return {"size": list(seg["size"]), "counts": seg["counts"]}


def read_coco(path: str | os.PathLike) -> dict[int, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Read and check a COCO instances JSON -> ``{image_id: (image_info, annotations)}``.

    ``image_info`` has ``image_id``, ``width``, ``height``, ``file_name`` (plus any other keys of the
    image entry); annotations keep their keys, with ``segmentation`` as compressed RLE and ``iscrowd``
    filled in (0). Images without annotations map to an empty list; order follows ``images``.

    Raises:
        SegAnyError: bad JSON, missing lists or keys, wrong types, repeated ids, an annotation of an
            unknown image or category, a segmentation that does not fit its image.
    """
    data = read_json(path)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise SegAnyError(f"{path}: not a COCO instances file (expected 'images' and 'annotations' lists)")
    cat_ids = None
    if "categories" in data:
        cat_ids = {c["id"] for c in _check_categories(data["categories"], f"{path}")}
    out: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for i, img in enumerate(data["images"]):
        where = f"{path}: image {i}"
        check_image_info(img, where, id_key="id")
        if img["id"] in out:
            raise SegAnyError(f"{where}: image id {img['id']} is used twice")
        info = {"image_id": img["id"], **{k: v for k, v in img.items() if k != "id"}}
        out[img["id"]] = (info, [])
    seen: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotation {i}"
        if not isinstance(ann, dict):
            raise SegAnyError(f"{where}: must be an object, got {type(ann).__name__}")
        for key in ("id", "image_id", "category_id", "segmentation", "bbox", "area"):
            if key not in ann:
                raise SegAnyError(f"{where}: missing key {key!r}")
        if not is_int(ann["id"]):
            raise SegAnyError(f"{where}: id must be an integer, got {ann['id']!r}")
        if ann["id"] in seen:
            raise SegAnyError(f"{where}: id {ann['id']} is used twice")
        seen.add(ann["id"])
        if not is_int(ann["image_id"]) or ann["image_id"] not in out:
            raise SegAnyError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        if not is_int(ann["category_id"]) or (cat_ids is not None and ann["category_id"] not in cat_ids):
            raise SegAnyError(f"{where}: category_id {ann['category_id']!r} is not in 'categories'")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            raise SegAnyError(f"{where}: iscrowd must be 0 or 1, got {crowd!r}")
        info = out[ann["image_id"]][0]
        h, w = info["height"], info["width"]
        rle = _segmentation_to_rle(ann["segmentation"], h, w, where)
        check_box(ann["bbox"], "bbox", where)
        norm = {**ann, "segmentation": rle, "iscrowd": int(crowd)}
        check_annotation(norm, h, w, where, required=())
        out[ann["image_id"]][1].append(norm)
    return out
