"""Inference-only fast paths: the same functions as the plain networks, computed with less work and memory
traffic on a CPU.

The plain modules (``segany.modeling.*``) keep the official shape: they are what training, tracing,
export and the parity tests read. Each fast class here is a subclass of one of them with the same
weights and state-dict keys, whose forward takes its fast path only where :func:`active` holds (no
autograd, eval mode, not traced, compiled or exported) and the plain forward everywhere else:

* :class:`FastImageEncoderViT` (``image_encoder.py``): blocks computed in place, in pieces that stay in
  the caches; global attention by blocks of query rows.
* :class:`FastTinyViT` (``tiny_vit.py``): folded batch norms, channels-last convolutions, in-place GELU.
* :class:`FastEfficientNetLite` (``efficientnet.py``): channels-last convolutions.
* :class:`FastPromptEncoder`, :class:`FastDensePromptEncoder` (``prompt_encoder.py``): the positional
  encoding kept between calls; the default's clicks drawn cell by cell (``dense_cells.py``).
* :class:`FastMaskDecoder` (``mask_decoder.py``): prompts without a mask input through the re-associated
  decoder (``decoder.py``, its image tokens in factored form: ``factored.py``).
* :class:`FastTwoWayTransformer` (``transformer.py``): the image side by bands of tokens, for prompts the
  re-associated decoder does not take (a mask input).
* :class:`FastPointRefiner` (``point_refiner.py``): the embedding's share of its first layer made once per image,
  its MLP in bf16 where the hardware has it.
* :class:`FastSam` (``sam.py``): mask post-processing by OpenCV's resizes (``postprocess.py``).
* SAM 2: :class:`FastHiera` (``hiera.py``): blocks in place, by bands of rows of windows;
  :class:`FastSam2` (``sam2.py``): the neck folded into the decoder's high-resolution projections, OpenCV's
  post-processing; :class:`FastSam2PromptEncoder`; :class:`FastSam2MaskDecoder` (``sam2_decoder.py``):
  prompts without a mask input through the re-associated decoder with SAM 2's tokens and upscaling.

Independent pieces of work run on one-core worker threads (``workers.py``). The choice is made once,
by the builder: ``build_sam(config)`` builds the fast classes, ``build_sam(config, fast=False)`` the
plain ones (:func:`fast_class` maps one to the other).
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from segany.modeling.dense_prompt_encoder import DensePromptEncoder
from segany.modeling.efficientnet import EfficientNetLiteEncoder
from segany.modeling.fast.common import active
from segany.modeling.fast.efficientnet import FastEfficientNetLite
from segany.modeling.fast.hiera import FastHiera
from segany.modeling.fast.image_encoder import FastImageEncoderViT
from segany.modeling.fast.mask_decoder import FastMaskDecoder
from segany.modeling.fast.point_refiner import FastPointRefiner
from segany.modeling.fast.prompt_encoder import FastDensePromptEncoder, FastPromptEncoder
from segany.modeling.fast.sam import FastSam
from segany.modeling.fast.sam2 import FastSam2, FastSam2PromptEncoder
from segany.modeling.fast.sam2_decoder import FastSam2MaskDecoder
from segany.modeling.fast.tiny_vit import FastTinyViT
from segany.modeling.fast.transformer import FastTwoWayTransformer
from segany.modeling.hiera import Hiera
from segany.modeling.image_encoder import ImageEncoderViT
from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.point_refiner import PointRefiner
from segany.modeling.prompt_encoder import PromptEncoder
from segany.modeling.sam import Sam
from segany.modeling.sam2 import Sam2, Sam2PromptEncoder
from segany.modeling.sam2_mask_decoder import Sam2MaskDecoder
from segany.modeling.tiny_vit import TinyViT
from segany.modeling.transformer import TwoWayTransformer

M = TypeVar("M", bound=nn.Module)

FAST_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    ImageEncoderViT: FastImageEncoderViT,
    TinyViT: FastTinyViT,
    EfficientNetLiteEncoder: FastEfficientNetLite,
    PromptEncoder: FastPromptEncoder,
    DensePromptEncoder: FastDensePromptEncoder,
    MaskDecoder: FastMaskDecoder,
    Sam: FastSam,
    Hiera: FastHiera,
    Sam2: FastSam2,
    Sam2PromptEncoder: FastSam2PromptEncoder,
    Sam2MaskDecoder: FastSam2MaskDecoder,
    TwoWayTransformer: FastTwoWayTransformer,
    PointRefiner: FastPointRefiner,
}


def fast_class(cls: type[M], fast: bool = True) -> type[M]:
    """The class to build for the plain module class ``cls``: its fast subclass (``fast``, where it has
    one), else ``cls`` itself."""
    return FAST_CLASSES.get(cls, cls) if fast else cls  # type: ignore[return-value]


__all__ = [
    "FAST_CLASSES",
    "FastEfficientNetLite",
    "FastImageEncoderViT",
    "FastMaskDecoder",
    "FastPointRefiner",
    "FastHiera",
    "FastDensePromptEncoder",
    "FastPromptEncoder",
    "FastSam",
    "FastSam2",
    "FastSam2MaskDecoder",
    "FastSam2PromptEncoder",
    "FastTinyViT",
    "FastTwoWayTransformer",
    "active",
    "fast_class",
]
