"""Official module path ``segment_anything.utils.amg``: the automatic mask generator's helpers under
their official names and signatures.

All but :class:`MaskData` are segany's own implementations (:mod:`segany.utils.masks`,
:mod:`segany.io.rle`), which give the official results; ``rle_to_mask`` and ``area_from_rle`` also
take compressed RLE. segany's generator keeps its candidates in its own structure, so
:class:`MaskData` is here only for official code that uses it directly.
"""

from __future__ import annotations

from collections.abc import ItemsView
from copy import deepcopy
from typing import Any

import numpy as np
import torch

from segany.io.rle import compress_rle
from segany.io.rle import rle_area as area_from_rle
from segany.utils.masks import (
    batch_iterator,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    build_point_grid,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    remove_small_regions,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)

__all__ = [
    "MaskData",
    "area_from_rle",
    "batch_iterator",
    "batched_mask_to_box",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "coco_encode_rle",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle_pytorch",
    "remove_small_regions",
    "rle_to_mask",
    "uncrop_boxes_xyxy",
    "uncrop_masks",
    "uncrop_points",
]

_Column = list | np.ndarray | torch.Tensor


def coco_encode_rle(uncompressed_rle: dict[str, Any]) -> dict[str, Any]:
    """Uncompressed RLE -> COCO compressed RLE with a str ``counts`` (JSON-serialisable)."""
    return compress_rle(uncompressed_rle)


class MaskData:
    """Columns of per-mask data (lists, numpy arrays or tensors of equal length) filtered and
    concatenated together."""

    def __init__(self, **kwargs: _Column) -> None:
        for k, v in kwargs.items():
            self._check(k, v)
        self._stats: dict[str, Any] = dict(kwargs)

    @staticmethod
    def _check(key: str, item: Any) -> None:
        if not isinstance(item, (list, np.ndarray, torch.Tensor)):
            raise TypeError(f"MaskData key {key!r}: only lists, numpy arrays and torch tensors, got {type(item)}")

    def __setitem__(self, key: str, item: _Column) -> None:
        self._check(key, item)
        self._stats[key] = item

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def items(self) -> ItemsView[str, Any]:
        return self._stats.items()

    def filter(self, keep: torch.Tensor) -> None:
        """Keep the rows ``keep`` selects (a bool mask or indices), in every column."""
        for k, v in self._stats.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                self._stats[k] = v[torch.as_tensor(keep, device=v.device)]
            elif isinstance(v, np.ndarray):
                self._stats[k] = v[keep.detach().cpu().numpy()]
            elif keep.dtype == torch.bool:
                self._stats[k] = [a for a, kept in zip(v, keep.tolist()) if kept]
            else:
                self._stats[k] = [v[i] for i in keep.tolist()]

    def cat(self, new_stats: MaskData) -> None:
        """Append the rows of ``new_stats`` (columns missing here are copied)."""
        for k, v in new_stats.items():
            if k not in self._stats or self._stats[k] is None:
                self._stats[k] = deepcopy(v)
            elif isinstance(v, torch.Tensor):
                self._stats[k] = torch.cat([self._stats[k], v], dim=0)
            elif isinstance(v, np.ndarray):
                self._stats[k] = np.concatenate([self._stats[k], v], axis=0)
            elif isinstance(v, list):
                self._stats[k] = self._stats[k] + deepcopy(v)
            else:
                raise TypeError(f"MaskData key {k!r} has an unsupported type {type(v)}")

    def to_numpy(self) -> None:
        """Tensors -> numpy arrays (on the CPU)."""
        for k, v in self._stats.items():
            if isinstance(v, torch.Tensor):
                self._stats[k] = v.detach().cpu().numpy()
