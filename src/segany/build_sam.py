"""Official module path ``segment_anything.build_sam``: ``sam_model_registry`` and the
``build_sam_vit_h/l/b(checkpoint=None)`` builders, with the official architectures and behaviour (a
model in eval mode; with ``checkpoint``, its weights loaded strictly).

Two differences, both deliberate: checkpoints are read as :func:`segany.load_model` reads them (never
unpickling code: ``torch.load(weights_only=True)``; ``.safetensors`` too), and a checkpoint that does not
fit the architecture is a :class:`SegAnyError` naming the keys or shapes that differ. MobileSAM's
``build_sam_vit_t`` / ``"vit_t"`` are here too.

``build_sam`` serves both APIs under one name, chosen by its argument: the official
``build_sam(checkpoint=None)`` (ViT-H, as the official alias) and segany's ``build_sam(config)`` (a
randomly initialised model for a :class:`SamConfig`, :func:`segany.modeling.build_sam`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from segany.checkpoint import load_weights
from segany.modeling import build as _build
from segany.modeling.config import SamConfig, get_config
from segany.modeling.sam import Sam

__all__ = [
    "build_sam", "build_sam_vit_b", "build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_t", "sam_model_registry"
]

Checkpoint = str | os.PathLike | None


def _build_named(config_name: str, checkpoint: Checkpoint) -> Sam:
    sam = _build.build_sam(get_config(config_name))
    sam.eval()
    if checkpoint is not None:
        load_weights(sam, checkpoint)
    return sam


def build_sam_vit_h(checkpoint: Checkpoint = None) -> Sam:
    """SAM ViT-H (``sam_vit_h_4b8939.pth``)."""
    return _build_named("vit_h", checkpoint)


def build_sam_vit_l(checkpoint: Checkpoint = None) -> Sam:
    """SAM ViT-L (``sam_vit_l_0b3195.pth``)."""
    return _build_named("vit_l", checkpoint)


def build_sam_vit_b(checkpoint: Checkpoint = None) -> Sam:
    """SAM ViT-B (``sam_vit_b_01ec64.pth``)."""
    return _build_named("vit_b", checkpoint)


def build_sam_vit_t(checkpoint: Checkpoint = None) -> Sam:
    """MobileSAM's TinyViT model (``mobile_sam.pt``)."""
    return _build_named("vit_t", checkpoint)


def build_sam(
    config_or_checkpoint: SamConfig | Checkpoint = None, *, checkpoint: Checkpoint = None, fast: bool = True
) -> Sam:
    """``build_sam(config, fast=True)``: segany's builder (random init, in training mode, as any new module;
    see :func:`segany.modeling.build_sam`). ``build_sam(checkpoint=None)`` /
    ``build_sam("sam_vit_h_4b8939.pth")``: the official alias of :func:`build_sam_vit_h`."""
    if isinstance(config_or_checkpoint, SamConfig):
        if checkpoint is not None:
            raise TypeError("build_sam(config) takes no checkpoint; use segany.load_model or load_weights")
        return _build.build_sam(config_or_checkpoint, fast=fast)
    if config_or_checkpoint is not None and checkpoint is not None:
        raise TypeError("build_sam got the checkpoint twice")
    return build_sam_vit_h(config_or_checkpoint if checkpoint is None else checkpoint)


sam_model_registry: dict[str, Callable[..., Sam]] = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_t": build_sam_vit_t,
}
