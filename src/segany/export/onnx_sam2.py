"""ONNX export of SAM 2 / 2.1 image models: the decoder and the encoder with the high-resolution features.
The same interface serves segany's SAM models with SAM 2's high-resolution features (``high_res_features``:
SAM's prompts, padding and post-processing; ``segany_family`` ``sam_high_res``).

The decoder has SAM's ONNX interface (:mod:`segany.export.onnx`) plus two inputs, the image's projected
high-resolution features:

=================  =========================  ==========================================================
input              shape / dtype              meaning
=================  =========================  ==========================================================
image_embeddings   1 x C x h x w float32      the encoder's ``image_embeddings``
high_res_feats_0   1 x C/8 x 4h x 4w float32  the encoder's ``high_res_feats_0`` (stride 4)
high_res_feats_1   1 x C/4 x 2h x 2w float32  the encoder's ``high_res_feats_1`` (stride 8)
point_coords ...   as SAM's                   in the *stretched* ``S x S`` frame (``ResizeSquare``)
=================  =========================  ==========================================================

Masks are resized straight to ``orig_im_size`` (SAM 2 stretches the image: no padding to crop). As SAM's
ONNX decoder, it returns all four outputs (or the official single-mask rule with ``return_single_mask``);
SAM 2's stability fallback for single-mask output and the clamp of returned low-res logits are the
predictor's, not part of the graph. A box is two points with labels 2 and 3, placed first, then the clicks,
then one padding point (label -1), as SAM 2 encodes boxes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segany.export.onnx_common import (
    DECODER_OUTPUTS,
    DEFAULT_OPSET,
    SamOnnxDecoder,
    _on_cpu,
    _require_onnx,
    _write,
    model_metadata,
    prompt_dynamic_axes,
    prompt_example_inputs,
    write_image_encoder,
)
from segany.modeling.sam import Sam
from segany.modeling.sam2 import Sam2

SAM2_DECODER_INPUTS = [
    "image_embeddings",
    "high_res_feats_0",
    "high_res_feats_1",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
]
SAM2_ENCODER_OUTPUTS = ["image_embeddings", "high_res_feats_0", "high_res_feats_1"]


class HighResOnnxDecoder(SamOnnxDecoder):
    """:class:`SamOnnxDecoder` with the image's two projected high-resolution maps as inputs (segany's
    ``high_res_features`` models as they are: SAM's prompts, padding and post-processing)."""

    @torch.no_grad()
    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        high_res = {"high_res_features": [high_res_feats_0, high_res_feats_1]}
        prompts = (point_coords, point_labels, mask_input, has_mask_input, orig_im_size)
        return self._decode(image_embeddings, high_res, prompts)


class Sam2OnnxDecoder(HighResOnnxDecoder):
    """:class:`HighResOnnxDecoder` for a :class:`Sam2`: one resize out (the image was stretched). Its
    prompt encoder embeds points as SAM's (it only rewrites boxes as points, which the caller does)."""

    def _postprocess(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        orig = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(orig[0], orig[1]), mode="bilinear", align_corners=False)


class Sam2OnnxEncoder(nn.Module):
    """``1 x 3 x S x S`` preprocessed input -> ``image_embeddings``, ``high_res_feats_0``, ``high_res_feats_1``."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding, inputs = self.model.embed_image(image)
        high_0, high_1 = inputs["high_res_features"]
        return embedding, high_0, high_1


def _family(model: Sam) -> str:
    return "sam2" if isinstance(model, Sam2) else "sam_high_res"


def export_sam2_decoder(
    model: Sam,
    path: str | os.PathLike,
    return_single_mask: bool = False,
    opset: int = DEFAULT_OPSET,
    quantize: bool = False,
    use_stability_score: bool = False,
    first_prompt_only: bool = False,
) -> Path:
    """Export the prompt encoder + mask decoder of a SAM 2 model, or of a SAM with high-resolution
    features (``use_stability_score`` and ``first_prompt_only``, :func:`segany.export.onnx.export_decoder`'s:
    that one only), to ``path``; returns the path."""
    _require_onnx()
    path = Path(path)
    model = _on_cpu(model)
    e = int(model.prompt_encoder.image_embedding_size[0])
    c = model.prompt_encoder.embed_dim
    high_res = (torch.randn(1, c // 8, 4 * e, 4 * e), torch.randn(1, c // 4, 2 * e, 2 * e))
    args = (torch.randn(1, c, e, e), *high_res, *prompt_example_inputs(model))
    dynamic = prompt_dynamic_axes()
    family = _family(model)
    meta = model_metadata(model) | {"segany_return_single_mask": str(int(return_single_mask)), "segany_family": family,
                                    "segany_first_prompt_only": str(int(first_prompt_only))}
    if family == "sam2":
        wrapper: SamOnnxDecoder = Sam2OnnxDecoder(model, return_single_mask)
    else:
        wrapper = HighResOnnxDecoder(model, return_single_mask, use_stability_score,
                                     first_prompt_only=first_prompt_only)
    _write(wrapper, args, path, SAM2_DECODER_INPUTS, DECODER_OUTPUTS, dynamic, opset, meta, quantize)
    return path


def export_sam2_encoder(
    model: Sam, path: str | os.PathLike, opset: int = DEFAULT_OPSET, quantize: bool = False
) -> Path:
    """Export the image encoder of a SAM 2 model or of a SAM with high-resolution features (input
    ``image``: preprocessed ``1 x 3 x S x S``; outputs the embedding and the two projected maps)."""
    model = _on_cpu(model)
    meta = {"segany_family": _family(model)}
    return write_image_encoder(Sam2OnnxEncoder(model), model, path, SAM2_ENCODER_OUTPUTS, opset, quantize, meta)
