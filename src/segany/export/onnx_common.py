"""What the ONNX exporters share: the traceable decoder and encoder wrappers of SAM's interface, the
model metadata, and the export / quantize / atomic-write steps. :mod:`segany.export.onnx` exports SAM
(and dispatches SAM 2 and SAM-HQ to :mod:`segany.export.onnx_sam2` / :mod:`~segany.export.onnx_sam_hq`);
all build on this module, which imports none of them.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segany.errors import SegAnyError
from segany.modeling.sam import Sam
from segany.utils.masks import calculate_stability_score

DECODER_INPUTS = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
DECODER_OUTPUTS = ["masks", "iou_predictions", "low_res_masks"]
ENCODER_INPUT = "image"
ENCODER_OUTPUT = "image_embeddings"
#: Opset 17 has LayerNormalization; every onnxruntime (and onnxruntime-web) since 1.14 runs it.
DEFAULT_OPSET = 17


class SamOnnxDecoder(nn.Module):
    """Prompt encoder + mask decoder + mask post-processing of a :class:`Sam`, written for tracing.

    Control flow that depends on the prompts (is there a mask? how many points?) is replaced by
    arithmetic, so one graph serves every prompt. The embeddings themselves come from the model's own
    modules (``PromptEncoder._embed_points`` handles labels -1..3), so there is one implementation.
    """

    def __init__(
        self,
        model: Sam,
        return_single_mask: bool = False,
        use_stability_score: bool = False,
        return_extra_metrics: bool = False,
        first_prompt_only: bool = False,
    ) -> None:
        """``return_extra_metrics``: also return the full-size masks' stability scores and areas (the
        official option; not for the exported decoder, whose outputs are the three above).
        ``first_prompt_only``: leave a correction decoder (``SamConfig.correction_decoder``) out of the
        graph, so the first decoder answers every prompt: half the graph for a caller that never sends a
        mask input (the web page's hover preview)."""
        super().__init__()
        self.model = model
        self.first_prompt_only = first_prompt_only
        self.image_size = int(model.image_size)
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.return_extra_metrics = return_extra_metrics
        self.stability_score_offset = 1.0

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """``1 x 1 x 4h x 4w`` logits, ``1`` flag -> ``1 x C x h x w`` dense embedding."""
        pe = self.model.prompt_encoder
        with_mask = has_mask_input * pe.mask_downscaling(mask_input)
        return with_mask + (1 - has_mask_input) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def _mask_skip_inputs(
        self, mask_input: torch.Tensor, has_mask_input: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """:meth:`~segany.modeling.sam.Sam.prompt_inputs` for the exported prompt: the mask (and, with
        ``mask_skip_prompts``, the clicks and the box) times ``has_mask_input``, so none without a mask
        input, as in PyTorch."""
        extra = self.model.prompt_inputs(mask_input, (coords, labels.to(torch.int64)), None)
        return {k: v * has_mask_input for k, v in extra.items()}

    def _resized_size(self, orig_im_size: torch.Tensor) -> torch.Tensor:
        """``(H, W)`` -> ``(h, w)`` int64, exactly as ``transforms.get_preprocess_shape`` (float64 math)."""
        size = orig_im_size.to(torch.float64)
        scale = self.image_size / torch.max(size)
        return torch.floor(size * scale + 0.5).clamp(min=1).to(torch.int64)

    def _postprocess(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """``1 x M x 4h x 4w`` -> ``1 x M x H x W`` logits, as ``Sam.postprocess_masks`` with tensor sizes."""
        s = self.image_size
        masks = F.interpolate(masks, size=(s, s), mode="bilinear", align_corners=False)
        resized = self._resized_size(orig_im_size)
        masks = masks[..., : resized[0], : resized[1]]
        orig = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(orig[0], orig[1]), mode="bilinear", align_corners=False)

    def _select_single(
        self, masks: torch.Tensor, iou: torch.Tensor, num_points: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The official rule without control flow: more than 2 tokens (points + padding / corners)
        -> output 0, otherwise the best of the multimask outputs (output 0 is pushed down by 1000)."""
        m = iou.shape[1]
        reweight = torch.tensor([[1000.0] + [0.0] * (m - 1)], device=iou.device)
        best = torch.argmax(iou + (num_points - 2.5) * reweight, dim=1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        return masks[rows, best].unsqueeze(1), iou[rows, best].unsqueeze(1)

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
        """See the module docstring for shapes; returns ``(masks, iou_predictions, low_res_masks)``, with
        ``return_extra_metrics`` ``(masks, iou_predictions, stability_scores, areas, low_res_masks)``."""
        prompts = (point_coords, point_labels, mask_input, has_mask_input, orig_im_size)
        return self._decode(image_embeddings, {}, prompts)

    def _decode(
        self, image_embeddings: torch.Tensor, image_inputs: dict[str, list[torch.Tensor]], prompts: tuple
    ) -> tuple[torch.Tensor, ...]:
        """:meth:`forward` with the decoder's other image inputs (``high_res_features``) as keywords and
        the five prompt inputs as one tuple (``point_coords`` ... ``orig_im_size``)."""
        point_coords, point_labels, mask_input, has_mask_input, orig_im_size = prompts
        pe = self.model.prompt_encoder
        sparse = pe._embed_points(point_coords, point_labels.to(torch.int64), pad=False)
        if getattr(pe, "dense_prompts", False):  # clicks and box drawn into the dense embedding
            dense = pe.dense_embedding((point_coords, point_labels), None, mask_input, 1, has_mask_input)
        else:
            dense = self._embed_masks(mask_input, has_mask_input)
        args = dict(
            image_embeddings=image_embeddings,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            **image_inputs,
        )
        # a mask_skip convolution has no bias: zeros (no mask input) add nothing, as in PyTorch. The skip
        # inputs are the correction decoder's where the model has one (the first decoder then has no skip)
        prompt = (mask_input, has_mask_input, point_coords, point_labels)
        first_skip = self._mask_skip_inputs(*prompt) if self.model.correction_decoder is None else {}
        low_res, iou = self.model.mask_decoder.predict_masks(**args, **first_skip)[:2]
        correction = None if self.first_prompt_only else self.model.correction_decoder
        if correction is not None:  # one graph for every prompt: both decoders run, the flag picks
            c_low, c_iou = correction.predict_masks(**args, **self._mask_skip_inputs(*prompt))[:2]
            low_res = torch.where(has_mask_input > 0, c_low, low_res)
            iou = torch.where(has_mask_input > 0, c_iou, iou)
        if self.use_stability_score:
            iou = calculate_stability_score(low_res, self.model.mask_threshold, self.stability_score_offset)
        if self.return_single_mask:
            low_res, iou = self._select_single(low_res, iou, point_coords.shape[1])
        masks = self._postprocess(low_res, orig_im_size)
        if not self.return_extra_metrics:
            return masks, iou, low_res
        threshold = self.model.mask_threshold
        stability = calculate_stability_score(masks, threshold, self.stability_score_offset)
        areas = (masks > threshold).sum(-1).sum(-1)
        return masks, iou, stability, areas, low_res


class SamOnnxEncoder(nn.Module):
    """The image encoder alone: ``1 x 3 x S x S`` preprocessed input -> ``1 x C x h x w`` embedding."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


def model_metadata(model: Sam) -> dict[str, str]:
    """Facts a runtime needs, stored as ONNX metadata (string values)."""
    e = int(model.prompt_encoder.image_embedding_size[0])
    return {
        "segany_image_size": str(int(model.image_size)),
        "segany_embedding_shape": json.dumps([1, int(model.prompt_encoder.embed_dim), e, e]),
        "segany_pixel_mean": json.dumps([float(v) for v in model.pixel_mean.flatten()]),
        "segany_pixel_std": json.dumps([float(v) for v in model.pixel_std.flatten()]),
        "segany_mask_threshold": str(float(model.mask_threshold)),
        "segany_num_mask_tokens": str(int(model.mask_decoder.num_mask_tokens)),
    }


def _export(
    module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict, opset: int
) -> None:
    # The legacy TorchScript exporter: no onnxscript needed, and its traced graphs keep `orig_im_size`
    # dynamic (output sizes follow the input tensor, not the example values).
    # eval() first: the exporter restores the wrapper's own mode afterwards, recursively, and a fresh
    # wrapper is in training mode; that would leave the wrapped model's batch norms training.
    module.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _stamp_metadata(src: Path, meta: dict[str, str], dst: Path) -> None:
    """Write ``src`` with ``meta`` added to its ``metadata_props`` to ``dst``, atomically."""
    import onnx

    from segany.io.atomic import atomic_write_bytes

    m = onnx.load(str(src))
    for k, v in meta.items():
        prop = m.metadata_props.add()
        prop.key, prop.value = k, v
    atomic_write_bytes(dst, m.SerializeToString())


def _tmp_path(path: Path, tag: str = "") -> Path:
    """A temporary file beside ``path`` that :func:`remove_stray_temp_files` recognises."""
    return path.with_name(f".{path.name}.{os.getpid()}{tag}.tmp")


def _write(
    module: nn.Module,
    args: tuple,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: dict,
    opset: int,
    meta: dict[str, str],
    quantize: bool,
) -> None:
    """Export to a temporary file, optionally quantize, then write it with its metadata to ``path``
    (atomically: temporary file, fsync, rename)."""
    from segany.io.atomic import remove_stray_temp_files

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stray_temp_files(path.parent, [path.name])  # what an export killed mid-way left behind
    tmp = _tmp_path(path)
    try:
        _export(module, args, tmp, inputs, outputs, dynamic, opset)
        if quantize:
            qtmp = _tmp_path(path, "q")
            try:
                quantize_model(tmp, qtmp)
                os.replace(qtmp, tmp)
            finally:
                qtmp.unlink(missing_ok=True)
            meta = meta | {"segany_quantized": "dynamic_uint8"}
        _stamp_metadata(tmp, meta, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_image_encoder(
    wrapper: nn.Module,
    model: Sam,
    path: str | os.PathLike,
    outputs: list[str],
    opset: int,
    quantize: bool,
    meta: dict[str, str] | None = None,
) -> Path:
    """Export ``wrapper`` (an image encoder of ``model`` whose outputs are ``outputs``) from the
    preprocessed ``1 x 3 x S x S`` input ``image``, with ``model``'s metadata and ``meta``."""
    _require_onnx()
    path = Path(path)
    args = (torch.randn(1, 3, model.image_size, model.image_size),)
    _write(wrapper, args, path, [ENCODER_INPUT], outputs, {}, opset, model_metadata(model) | (meta or {}), quantize)
    return path


def prompt_example_inputs(model: Sam) -> tuple[torch.Tensor, ...]:
    """Example prompt inputs to trace a decoder with: ``point_coords`` (5 points), ``point_labels`` (each
    label kind), ``mask_input``, ``has_mask_input``, ``orig_im_size``."""
    e = int(model.prompt_encoder.image_embedding_size[0])
    return (
        torch.randint(0, model.image_size, (1, 5, 2), dtype=torch.float32),
        torch.tensor([[1, 0, 2, 3, -1]], dtype=torch.float32),
        torch.randn(1, 1, 4 * e, 4 * e),
        torch.tensor([1.0]),
        torch.tensor([1500.0, 2250.0]),
    )


def prompt_dynamic_axes() -> dict[str, dict[int, str]]:
    """The decoder inputs' dynamic axes: the number of points (a new dict, for the caller to extend)."""
    return {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Dynamic (weights-only) uint8 quantization with onnxruntime, as the official export script."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise SegAnyError(f"--quantize needs onnxruntime: pip install 'segany[onnx]' ({e})") from None
    quantize_dynamic(
        model_input=str(src),
        model_output=str(dst),
        per_channel=False,
        reduce_range=False,
        weight_type=QuantType.QUInt8,
    )


def _on_cpu(model: Sam) -> Sam:
    """The model in eval mode on the CPU; a copy when it lives elsewhere (a server keeps using it there)."""
    model = model.eval()
    return model if model.device.type == "cpu" else copy.deepcopy(model).cpu()


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise SegAnyError("ONNX export needs the onnx package: pip install 'segany[onnx]'") from None
