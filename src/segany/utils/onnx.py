"""Official module path ``segment_anything.utils.onnx``: :class:`SamOnnxModel`, the official ONNX
wrapper's name and arguments over segany's traceable decoder (:class:`segany.export.onnx.SamOnnxDecoder`).

Inputs and outputs are the official ones (see :mod:`segany.export.onnx`); ``segany export-onnx`` and
:func:`segany.export.onnx.export_decoder` export it with the project's settings.
"""

from __future__ import annotations

from segany.export.onnx import SamOnnxDecoder
from segany.modeling.sam import Sam

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
        super().__init__(model, return_single_mask, use_stability_score, return_extra_metrics)
        self.img_size = model.image_encoder.img_size
