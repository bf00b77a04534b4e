"""PNG outputs: label maps (one id per mask), single masks, and the PNG encoder the pictures use.

Label maps follow the project's label-map convention (:mod:`segany.io.labelmaps`): 0 = background,
255 = void, so object ids skip 255; uint8 when every id fits below 255, uint16 otherwise. Reading is
:func:`segany.io.labelmaps.read_label_map` (re-exported here).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import cv2
import numpy as np

from segany.errors import SegAnyError
from segany.io.atomic import atomic_write_bytes
from segany.io.labelmaps import VOID_ID, read_label_map, split_label_map

__all__ = [
    "encode_png",
    "label_ids",
    "label_map_to_masks",
    "read_label_map",
    "write_label_map",
    "write_mask_png",
]

#: Most masks a uint16 label map holds (ids 1..65535 without the void id).
MAX_LABELS = 65535 - 1


def encode_png(array: np.ndarray, compression: int | None = None) -> bytes:
    """Encode ``H x W`` (uint8 / uint16 gray), ``H x W x 3`` (RGB) or ``H x W x 4`` (RGBA) uint8 as PNG
    (``compression`` 0..9: zlib's level, OpenCV's default when None)."""
    array = np.asarray(array)
    ok_gray = array.ndim == 2 and array.dtype in (np.uint8, np.uint16)
    ok_color = array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8
    if not (ok_gray or ok_color) or array.shape[0] == 0 or array.shape[1] == 0:
        raise SegAnyError(
            f"cannot write a PNG from an array of shape {array.shape} and dtype {array.dtype} "
            "(expected non-empty HxW uint8/uint16, HxWx3 or HxWx4 uint8)"
        )
    if array.ndim == 3:  # OpenCV stores BGR(A); our arrays are RGB(A)
        code = cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
        array = cv2.cvtColor(np.ascontiguousarray(array), code)
    params = [] if compression is None else [cv2.IMWRITE_PNG_COMPRESSION, int(compression)]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array), params)
    if not ok:
        raise SegAnyError(f"PNG encoding failed for an array of shape {array.shape}")
    return buf.tobytes()


def write_mask_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write an ``H x W`` mask as a black (0) / white (255) uint8 PNG, atomically."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise SegAnyError(f"{path}: a mask must be H x W, got shape {mask.shape}")
    atomic_write_bytes(path, encode_png(np.where(mask.astype(bool), 255, 0).astype(np.uint8)))


def label_ids(n: int) -> list[int]:
    """The ids :func:`write_label_map` gives ``n`` masks: 1, 2, ..., skipping the void id 255."""
    return [i + 1 if i + 1 < VOID_ID else i + 2 for i in range(n)]


def write_label_map(
    path: str | os.PathLike,
    masks: Sequence[np.ndarray],
    order: str = "area",
    shape: tuple[int, int] | None = None,
) -> list[int]:
    """Write masks as one label-map PNG, atomically; returns each mask's id (see :func:`label_ids`).

    Args:
        path: the ``.png`` to write.
        masks: ``H x W`` bool masks; mask ``i`` gets id ``label_ids(n)[i]``.
        order: where masks overlap, ``"area"`` draws the larger first so small masks stay visible;
            ``"given"`` draws in list order (later masks on top).
        shape: ``(H, W)``, needed only when ``masks`` is empty.

    Raises:
        SegAnyError: masks of different shapes, no masks and no shape, too many masks, a bad order.
    """
    if order not in ("area", "given"):
        raise SegAnyError(f"write_label_map: order must be 'area' or 'given', got {order!r}")
    masks = [np.asarray(m) for m in masks]
    if not masks and shape is None:
        raise SegAnyError(f"{path}: no masks, so the label map size is unknown (pass shape=(H, W))")
    hw = tuple(shape) if shape is not None else masks[0].shape
    for i, m in enumerate(masks):
        if m.shape != hw or m.ndim != 2:
            raise SegAnyError(f"{path}: mask {i} has shape {m.shape}, expected {hw}")
    if len(masks) > MAX_LABELS:
        raise SegAnyError(f"{path}: {len(masks)} masks, a 16-bit label map holds at most {MAX_LABELS}")
    ids = label_ids(len(masks))
    dtype = np.uint8 if not ids or ids[-1] < VOID_ID else np.uint16
    label_map = np.zeros(hw, dtype=dtype)
    draw = range(len(masks))
    if order == "area":
        areas = [int(np.count_nonzero(m)) for m in masks]
        draw = sorted(draw, key=lambda i: -areas[i])  # stable: equal areas keep list order
    for i in draw:
        label_map[masks[i].astype(bool, copy=False)] = ids[i]
    atomic_write_bytes(path, encode_png(label_map))
    return ids


def label_map_to_masks(label_map: np.ndarray, void: Iterable[int] = ()) -> dict[int, np.ndarray]:
    """Split an ``H x W`` label map into ``{id: H x W bool mask}``, ids ascending.

    0 is always background; ``void`` lists further values that are not objects (e.g. ``(255,)`` for
    data sets that mark void pixels).
    """
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise SegAnyError(f"a label map must be H x W, got shape {label_map.shape}")
    masks, ids, _ = split_label_map(label_map, ignore_ids=frozenset(int(v) for v in void), void_id=None)
    return {int(i): m for i, m in zip(ids, masks)}
