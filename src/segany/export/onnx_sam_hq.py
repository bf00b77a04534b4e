"""ONNX export of SAM-HQ: the decoder with the early ViT features as an extra input, and the encoder.

The decoder has SAM's ONNX interface (:mod:`segany.export.onnx`) plus one input, as upstream's
``segment_anything_hq.utils.onnx.SamOnnxModel``:

=================  ===============================  ====================================================
input              shape / dtype                    meaning
=================  ===============================  ====================================================
image_embeddings   1 x C x h x w float32            the encoder's ``image_embeddings``
interm_embeddings  L x 1 x h x w x vit_dim float32  the ViT's tokens after its global-attention blocks;
                                                    only the first (``L`` >= 1) is used, so upstream's
                                                    stack of all of them works as our encoder's one
point_coords ...   as SAM's                         in the resized frame (``ResizeLongestSide``)
=================  ===============================  ====================================================

With ``hq_features_input`` the second input is ``hq_features`` (``1 x C/8 x 4h x 4w``:
``mask_decoder.hq_features(image_embeddings, interm_embeddings)``, the same for every prompt) instead:
the fusion's transposed convolutions (about 3 GMAC for ViT-B, most of the decoder's work) run once per
image instead of once per prompt, and the download is smaller. The web server serves this variant.

Outputs as SAM's, four masks: output ``k`` is SAM's mask ``k`` plus the HQ token's mask (the HQ mask alone
with ``hq_token_only``), with SAM's predicted IoU ``k``. Upstream's single-mask result is output 0, its
``multimask_output`` result the best of outputs 1-3 by IoU (what the predictor returns for each), so a
viewer written for SAM's decoder runs this one unchanged; ``return_single_mask`` applies SAM's official
rule.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
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
from segany.modeling.sam_hq import SamHQ
from segany.utils.masks import calculate_stability_score

SAM_HQ_DECODER_INPUTS = [
    "image_embeddings",
    "interm_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
]
SAM_HQ_ENCODER_OUTPUTS = ["image_embeddings", "interm_embeddings"]


class SamHQOnnxDecoder(SamOnnxDecoder):
    """:class:`SamOnnxDecoder` for a :class:`SamHQ`: early ViT features in, the HQ mask added to each output."""

    def __init__(
        self,
        model: SamHQ,
        return_single_mask: bool = False,
        use_stability_score: bool = False,
        hq_token_only: bool = False,
        hq_features_input: bool = False,
    ) -> None:
        super().__init__(model, return_single_mask, use_stability_score)
        self.hq_token_only = hq_token_only
        self.hq_features_input = hq_features_input

    @torch.no_grad()
    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_features: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        pe = self.model.prompt_encoder
        decoder = self.model.mask_decoder
        sparse = pe._embed_points(point_coords, point_labels.to(torch.int64), pad=False)
        dense = self._embed_masks(mask_input, has_mask_input)
        # image_features: interm_embeddings (the first layer is fused here) or the fused hq_features
        hq = image_features if self.hq_features_input else decoder.hq_features(image_embeddings, image_features[0])
        masks, iou = decoder.predict_masks_hq(image_embeddings, pe.get_dense_pe(), sparse, dense, hq)
        n = decoder.num_mask_tokens
        sam, hq_mask = masks[:, :n], masks[:, n : n + 1]
        if self.use_stability_score:  # upstream: the stability of SAM's masks stands in for their IoUs
            iou = calculate_stability_score(sam, self.model.mask_threshold, self.stability_score_offset)
        low_res = hq_mask.expand_as(sam) if self.hq_token_only else sam + hq_mask
        if self.return_single_mask:
            low_res, iou = self._select_single(low_res, iou, point_coords.shape[1])
        return self._postprocess(low_res, orig_im_size), iou, low_res


class SamHQOnnxEncoder(nn.Module):
    """``1 x 3 x S x S`` preprocessed input -> ``image_embeddings`` and ``interm_embeddings`` (``1 x 1 x h x w x
    vit_dim``: the first global-attention block's tokens, the one layer the decoder reads)."""

    def __init__(self, model: SamHQ) -> None:
        super().__init__()
        self.model = model

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, inputs = self.model.embed_image(image)
        return embedding, inputs["interm_embeddings"].unsqueeze(0)


def export_sam_hq_decoder(
    model: SamHQ,
    path: str | os.PathLike,
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    hq_token_only: bool = False,
    opset: int = DEFAULT_OPSET,
    quantize: bool = False,
    hq_features_input: bool = False,
) -> Path:
    """Export a SAM-HQ model's prompt encoder + mask decoder to ``path``; returns the path.

    Args:
        hq_features_input: take ``hq_features`` instead of ``interm_embeddings`` (see the module docstring).
    """
    _require_onnx()
    path = Path(path)
    model = _on_cpu(model)
    e = int(model.prompt_encoder.image_embedding_size[0])
    c = model.prompt_encoder.embed_dim
    vit_dim = int(model.mask_decoder.compress_vit_feat[0].in_channels)
    features = torch.randn(1, c // 8, 4 * e, 4 * e) if hq_features_input else torch.randn(1, 1, e, e, vit_dim)
    args = (torch.randn(1, c, e, e), features, *prompt_example_inputs(model))
    dynamic = prompt_dynamic_axes()
    inputs = list(SAM_HQ_DECODER_INPUTS)
    if hq_features_input:
        inputs[1] = "hq_features"
    else:
        dynamic["interm_embeddings"] = {0: "num_layers"}
    meta = model_metadata(model) | {
        "segany_return_single_mask": str(int(return_single_mask)),
        "segany_family": "sam_hq",
        "segany_hq_token_only": str(int(hq_token_only)),
    }
    wrapper = SamHQOnnxDecoder(model, return_single_mask, use_stability_score, hq_token_only, hq_features_input)
    _write(wrapper, args, path, inputs, DECODER_OUTPUTS, dynamic, opset, meta, quantize)
    return path


def export_sam_hq_encoder(
    model: SamHQ, path: str | os.PathLike, opset: int = DEFAULT_OPSET, quantize: bool = False
) -> Path:
    """Export a SAM-HQ model's image encoder (input ``image``: preprocessed ``1 x 3 x S x S``)."""
    model = _on_cpu(model)
    meta = {"segany_family": "sam_hq"}
    return write_image_encoder(SamHQOnnxEncoder(model), model, path, SAM_HQ_ENCODER_OUTPUTS, opset, quantize, meta)
