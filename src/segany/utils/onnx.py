"""Official module path ``segment_anything.utils.onnx``: :class:`SamOnnxModel`, the official ONNX
wrapper's name and arguments over segany's traceable decoder (:class:`segany.export.onnx.SamOnnxDecoder`).

Inputs and outputs are the official ones (see :mod:`segany.export.onnx`); ``segany export-onnx`` and
:func:`segany.export.onnx.export_decoder` export it with the project's settings.
"""

from __future__ import annotations

import torch

from segany.export.onnx import SamOnnxDecoder
from segany.modeling.sam import Sam
from segany.utils.masks import calculate_stability_score

__all__ = ["SamOnnxModel"]


class SamOnnxModel(SamOnnxDecoder):
    """Prompt encoder + mask decoder + mask post-processing of ``model``, written for tracing.

    Args (the official ones):
        return_single_mask: one mask per call (the official choice by the number of points).
        use_stability_score: report stability scores instead of predicted IoUs.
        return_extra_metrics: also return the upscaled masks' stability scores and areas.
    """

    def __init__(
        self,
        model: Sam,
        return_single_mask: bool,
        use_stability_score: bool = False,
        return_extra_metrics: bool = False,
    ) -> None:
        super().__init__(model, return_single_mask=return_single_mask, use_stability_score=use_stability_score)
        self.img_size = model.image_encoder.img_size
        self.return_extra_metrics = return_extra_metrics

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """``(masks, scores, low_res_masks)``; with ``return_extra_metrics``
        ``(masks, scores, stability_scores, areas, low_res_masks)``."""
        masks, scores, low_res = super().forward(
            image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size
        )
        if not self.return_extra_metrics:
            return masks, scores, low_res
        threshold = self.model.mask_threshold
        stability = calculate_stability_score(masks, threshold, self.stability_score_offset)
        areas = (masks > threshold).sum(-1).sum(-1)
        return masks, scores, stability, areas, low_res
