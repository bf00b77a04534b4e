"""Stand-ins for the handful of torchvision / timm names the reference packages import.

``segment_anything`` imports ``torchvision.transforms.functional.{resize, to_pil_image}`` and
``torchvision.ops.boxes.{batched_nms, box_area}``; ``mobile_sam`` additionally imports
``timm.models.layers.{DropPath, to_2tuple, trunc_normal_}`` and ``timm.models.registry.register_model``.
Neither torchvision nor timm may be installed beside this torch, so these fakes are put into
``sys.modules`` only while the reference packages are imported, then removed again (the reference
modules keep the functions they bound), so no other code ever sees a fake ``torchvision``.
"""

from __future__ import annotations

import collections.abc
import importlib
import itertools
import sys
import types
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

# ----------------------------------------------------------------------------- torchvision


def resize(img: Any, size: Any, interpolation: Any = None, max_size: Any = None, antialias: Any = True):
    """``torchvision.transforms.functional.resize`` for a PIL image and an explicit ``[h, w]`` size:
    torchvision (``_functional_pil.resize``) then calls ``img.resize((w, h), Image.BILINEAR)``."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"resize stand-in only handles PIL images, got {type(img).__name__}")
    if isinstance(size, int) or len(size) != 2:
        raise NotImplementedError("resize stand-in only handles an explicit [h, w] size")
    if interpolation not in (None, "bilinear", Image.BILINEAR):
        raise NotImplementedError("resize stand-in only does bilinear")
    h, w = int(size[0]), int(size[1])
    if (img.height, img.width) == (h, w):  # torchvision returns the input unchanged
        return img
    return img.resize((w, h), Image.BILINEAR)


def to_pil_image(pic: Any, mode: Any = None) -> Image.Image:
    """``torchvision.transforms.functional.to_pil_image`` for an ``HxWxC`` (or ``HxW``) uint8 array."""
    if not isinstance(pic, np.ndarray) or pic.dtype != np.uint8 or pic.ndim not in (2, 3):
        raise TypeError("to_pil_image stand-in only handles HxW / HxWxC uint8 numpy arrays")
    if pic.ndim == 3 and pic.shape[2] == 1:
        pic = pic[:, :, 0]
    if mode is not None:
        return Image.fromarray(pic).convert(mode)
    return Image.fromarray(pic)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of XYXY boxes (``(x2 - x1) * (y2 - y1)``, no +1), as torchvision."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: visit boxes by decreasing score, drop every later box whose IoU with a kept box is
    ``> iou_threshold``. Returns int64 indices of the kept boxes, by decreasing score."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    b = boxes.detach().to(torch.float64).cpu().numpy()
    order = torch.argsort(scores.detach().cpu(), descending=True, stable=True).numpy()
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    suppressed = np.zeros(len(b), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        xx1 = np.maximum(b[i, 0], b[:, 0])
        yy1 = np.maximum(b[i, 1], b[:, 1])
        xx2 = np.minimum(b[i, 2], b[:, 2])
        yy2 = np.minimum(b[i, 3], b[:, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.as_tensor(np.asarray(keep, dtype=np.int64), device=boxes.device)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Per-category NMS via torchvision's coordinate-offset trick: boxes of different categories are
    shifted apart so they never overlap, then one NMS runs over all of them."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


# ----------------------------------------------------------------------------- timm


class DropPath(nn.Module):
    """timm's stochastic depth (per sample), identity in eval mode or with ``drop_prob == 0``."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.drop_prob or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask


def to_2tuple(x: Any) -> tuple:
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
        return tuple(x)
    return tuple(itertools.repeat(x, 2))


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0):
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def register_model(fn):
    return fn


# ----------------------------------------------------------------------------- installation


def _fake_modules() -> dict[str, types.ModuleType]:
    def mod(name: str, **attrs: Any) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        m.__segany_reference_stand_in__ = True
        return m

    mods = {
        "torchvision.transforms.functional": mod(
            "torchvision.transforms.functional", resize=resize, to_pil_image=to_pil_image
        ),
        "torchvision.ops.boxes": mod("torchvision.ops.boxes", batched_nms=batched_nms, box_area=box_area, nms=nms),
        "timm.models.layers": mod(
            "timm.models.layers", DropPath=DropPath, to_2tuple=to_2tuple, trunc_normal_=trunc_normal_
        ),
        "timm.models.registry": mod("timm.models.registry", register_model=register_model),
    }
    mods["torchvision.transforms"] = mod("torchvision.transforms", functional=mods["torchvision.transforms.functional"])
    mods["torchvision.ops"] = mod("torchvision.ops", boxes=mods["torchvision.ops.boxes"])
    mods["torchvision"] = mod("torchvision", transforms=mods["torchvision.transforms"], ops=mods["torchvision.ops"])
    mods["timm.models"] = mod("timm.models", layers=mods["timm.models.layers"], registry=mods["timm.models.registry"])
    mods["timm"] = mod("timm", models=mods["timm.models"])
    return mods


def _import_with_stand_ins(name: str, transforms: dict[str, Any] | None = None) -> types.ModuleType:
    """Import ``name`` while the fakes are in ``sys.modules``; ``transforms``: more names for the fake
    ``torchvision.transforms`` (SAM 2 uses its ``Normalize``, ``Resize`` and ``ToTensor``)."""
    if name in sys.modules:
        return sys.modules[name]
    fakes = _fake_modules()
    fakes["torchvision.transforms"].__dict__.update(transforms or {})
    saved = {k: sys.modules[k] for k in fakes if k in sys.modules}
    sys.modules.update(fakes)
    try:
        return importlib.import_module(name)
    finally:
        for k in fakes:
            if k in saved:
                sys.modules[k] = saved[k]
            else:
                sys.modules.pop(k, None)


def import_reference() -> types.ModuleType:
    """The official ``segment_anything`` package (imported with the torchvision stand-ins)."""
    return _import_with_stand_ins("segment_anything")


def import_mobile_sam() -> types.ModuleType:
    """The MobileSAM ``mobile_sam`` package (imported with the torchvision / timm stand-ins)."""
    return _import_with_stand_ins("mobile_sam")
