"""ONNX export: the prompt encoder + mask decoder (the official SAM ONNX interface) and the image encoder.

The decoder takes the official inputs and outputs, so viewers written for the official
``sam_onnx_example`` model run ours unchanged:

=================  =====================  ================================================================
input              shape / dtype          meaning
=================  =====================  ================================================================
image_embeddings   1 x C x h x w float32  the image encoder's output
point_coords       1 x N x 2 float32      (x, y) in the *resized* frame (``ResizeLongestSide``), N dynamic
point_labels       1 x N float32          1 positive, 0 negative, 2 / 3 box corners, -1 padding
mask_input         1 x 1 x 4h x 4w        low-res logits of an earlier call (zeros when none)
has_mask_input     1 float32              1 when ``mask_input`` is used, 0 otherwise
orig_im_size       2 float32              (H, W) of the original image
=================  =====================  ================================================================

Outputs: ``masks`` 1 x M x H x W logits (original frame), ``iou_predictions`` 1 x M, ``low_res_masks``
1 x M x 4h x 4w logits. M = 4 (the single-mask output first, then the 3 multimask outputs), or 1 with
``return_single_mask`` (the single-mask output for more than one point, the best multimask output for a
single point: the official rule). Without a box, callers add one padding point ``(0, 0)`` with label -1,
as SAM was trained (:class:`segany.export.onnx_predictor.OnnxSamPredictor` does).

The image encoder export takes the *preprocessed* input (``Sam.preprocess``: normalized, padded to
``1 x 3 x S x S``) and returns ``image_embeddings``. Model facts a runtime needs (input size, pixel mean /
std, embedding shape) go into the ONNX metadata, so an exported pair is self-describing.

SAM 2 (:mod:`segany.export.onnx_sam2`) and SAM-HQ (:mod:`segany.export.onnx_sam_hq`) decoders take the
same inputs plus the image features their decoders read besides the embedding; :func:`export_decoder`
and :func:`export_encoder` pick the exporter from the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from segany.errors import SegAnyError
from segany.export.onnx_common import (  # re-exported: the names this module has always offered
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    DEFAULT_OPSET,
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    SamOnnxDecoder,
    SamOnnxEncoder,
    _on_cpu,
    _require_onnx,
    _write,
    model_metadata,
    prompt_dynamic_axes,
    prompt_example_inputs,
    quantize_model,
    write_image_encoder,
)
from segany.modeling.sam import Sam

__all__ = [
    "DECODER_INPUTS",
    "DECODER_OUTPUTS",
    "DEFAULT_OPSET",
    "ENCODER_INPUT",
    "ENCODER_OUTPUT",
    "SamOnnxDecoder",
    "SamOnnxEncoder",
    "model_metadata",
    "quantize_model",
    "export_decoder",
    "export_encoder",
    "read_metadata",
]


def export_decoder(
    model: Sam,
    path: str | os.PathLike,
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    opset: int = DEFAULT_OPSET,
    quantize: bool = False,
    hq_token_only: bool = False,
    first_prompt_only: bool = False,
) -> Path:
    """Export the prompt encoder + mask decoder to ``path`` (see the module docstring); returns the path.

    Args:
        quantize: dynamic int8 quantization of the weights (onnxruntime), about 4x smaller.
        hq_token_only: SAM-HQ only: the HQ token's mask alone in every output (upstream's option).
        first_prompt_only: a model with a correction decoder: the first decoder alone, which then answers
            prompts with a mask input too (the web page's hover preview sends none).
    """
    family = _family(model)
    if hq_token_only and family != "sam_hq":
        raise SegAnyError("hq_token_only needs a SAM-HQ model")
    if family in ("sam2", "sam_high_res"):
        if use_stability_score and family == "sam2":
            raise SegAnyError("SAM 2's ONNX decoder returns predicted IoUs only (no use_stability_score)")
        from segany.export.onnx_sam2 import export_sam2_decoder  # SAM 2: two more inputs

        return export_sam2_decoder(model, path, return_single_mask, opset, quantize, use_stability_score,
                                   first_prompt_only)
    if family == "sam_hq":
        from segany.export.onnx_sam_hq import export_sam_hq_decoder  # SAM-HQ: the early ViT features

        return export_sam_hq_decoder(model, path, return_single_mask, use_stability_score, hq_token_only, opset,
                                     quantize)
    if family is None:
        raise SegAnyError(f"the {type(model).__name__} decoder has no ONNX export (SAM, MobileSAM, SAM 2 and "
                          "SAM-HQ do)")
    _require_onnx()
    path = Path(path)
    model = _on_cpu(model)
    e = int(model.prompt_encoder.image_embedding_size[0])
    args = (torch.randn(1, model.prompt_encoder.embed_dim, e, e), *prompt_example_inputs(model))
    dynamic = prompt_dynamic_axes()
    wrapper = SamOnnxDecoder(model, return_single_mask, use_stability_score, first_prompt_only=first_prompt_only)
    meta = model_metadata(model) | {"segany_return_single_mask": str(int(return_single_mask)),
                                    "segany_first_prompt_only": str(int(first_prompt_only))}
    _write(wrapper, args, path, DECODER_INPUTS, DECODER_OUTPUTS, dynamic, opset, meta, quantize)
    return path


def export_encoder(model: Sam, path: str | os.PathLike, opset: int = DEFAULT_OPSET, quantize: bool = False) -> Path:
    """Export the image encoder (input ``image``: preprocessed ``1 x 3 x S x S``); returns the path."""
    family = _family(model)
    if family in ("sam2", "sam_high_res"):
        from segany.export.onnx_sam2 import export_sam2_encoder  # SAM 2: three outputs

        return export_sam2_encoder(model, path, opset, quantize)
    if family == "sam_hq":
        from segany.export.onnx_sam_hq import export_sam_hq_encoder  # SAM-HQ: two outputs

        return export_sam_hq_encoder(model, path, opset, quantize)
    if family is None:
        raise SegAnyError(f"the {type(model).__name__} encoder has no ONNX export (SAM, MobileSAM, SAM 2 and "
                          "SAM-HQ do)")
    model = _on_cpu(model)
    return write_image_encoder(SamOnnxEncoder(model), model, path, [ENCODER_OUTPUT], opset, quantize)


def _family(model: Sam) -> str | None:
    """Which exporter serves ``model``: "sam" (SAM, MobileSAM, segany's models), "sam2", "sam_high_res"
    (segany's models with SAM 2's high-resolution features), "sam_hq", or None for a decoder with image
    inputs no exporter knows."""
    names = tuple(getattr(model, "decoder_input_names", ()))
    if getattr(model, "resize_mode", None) == "stretch":
        return "sam2"
    if names == ("high_res_features",):
        return "sam_high_res"
    if names == ("interm_embeddings",):
        return "sam_hq"
    return None if names else "sam"


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``segany_*`` metadata of an exported file (empty for a foreign model)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


