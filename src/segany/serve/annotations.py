"""Annotation mode: accepted masks of an image saved as SA-1B JSON + the image, inside the dataset folder.

Every path is built by the server from a validated dataset name and the image's hash; nothing a client
sends is ever used as a path. Layout (as an SA-1B tar unpacks)::

    DATASET_DIR/NAME/sa_<hash16>.<ext>    the uploaded file, unchanged
    DATASET_DIR/NAME/sa_<hash16>.json     {"image": {...}, "annotations": [...]}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from segany.errors import SegAnyError
from segany.io.atomic import atomic_write_bytes
from segany.io.sa1b import write_sa1b
from segany.serve.cache import ImageEntry

#: Dataset names: letters, digits, "_" and "-", starting with a letter or digit (no dots, no slashes).
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def dataset_folder(root: Path, name: str) -> Path:
    """``root / name`` for a valid name, checked to lie directly inside ``root``.

    Raises:
        SegAnyError: the name does not match :data:`DATASET_NAME`.
    """
    if not DATASET_NAME.fullmatch(name):
        raise SegAnyError(
            f"invalid dataset name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    root = root.resolve()
    folder = (root / name).resolve()
    if folder.parent != root:  # belt and braces: the regex already rules out separators and dots
        raise SegAnyError(f"invalid dataset name {name!r}")
    return folder


def save_annotations(root: Path, name: str, entry: ImageEntry, masks: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the image and its SA-1B JSON (replacing an earlier save of the same image).

    Args:
        masks: records with ``segmentation`` (COCO RLE of the image's size) and optional
            ``predicted_iou`` / ``point_coords``.
    Returns:
        ``{"dataset", "image", "annotations", "count"}`` with paths relative to the dataset folder.
    """
    folder = dataset_folder(root, name)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"sa_{entry.image_id[:16]}"
    image_name = stem + entry.ext
    info = {
        # SA-1B ids are integers: 52 bits of the hash stay exact in JavaScript numbers too.
        "image_id": int(entry.image_id[:13], 16),
        "width": entry.width,
        "height": entry.height,
        "file_name": image_name,
    }
    json_path = folder / f"{stem}.json"
    try:
        write_sa1b(json_path, info, masks)  # validates every RLE against the image size
    except SegAnyError as e:  # name the file as the client knows it, not by its server path
        raise SegAnyError(str(e).replace(str(json_path), f"{name}/{json_path.name}")) from None
    atomic_write_bytes(folder / image_name, entry.data)
    return {"dataset": name, "image": image_name, "annotations": f"{stem}.json", "count": len(masks)}
