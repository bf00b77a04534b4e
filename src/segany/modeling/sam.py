"""The Segment Anything model: image encoder + prompt encoder + mask decoder, with SAM's
pre-processing (normalize, pad to a square) and post-processing (upsample, crop, resize back)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.low_res import decoded_region
from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.prompt_encoder import PromptEncoder


def _one_image(value: Any, i: int) -> Any:
    """Image ``i`` of a batched decoder input (a tensor, a list of tensors, or None)."""
    if isinstance(value, list):
        return [v[i : i + 1] for v in value]
    return None if value is None else value[i : i + 1]


def interpolate_masks(
    masks: torch.Tensor, upsampled_size: tuple[int, int], input_size: tuple[int, ...], original_size: tuple[int, ...]
) -> torch.Tensor:
    """SAM's post-processing by interpolation: ``B x M x h x w`` logits upsampled (bilinear) to
    ``upsampled_size`` (the padded input frame, or the top-left part of it that the masks cover), the
    padding cropped to ``input_size``, then resized (bilinear) to ``original_size``."""
    masks = F.interpolate(masks, tuple(upsampled_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)


def model_weights(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The model's own state dict: without an attached text head's, which has its own file
    (:mod:`segany.checkpoint_text`). ``keep_vars``: the parameters themselves (to share them)."""
    return {k: v for k, v in model.state_dict(keep_vars=keep_vars).items() if not k.startswith("text_head.")}


class Sam(nn.Module):
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        image_size: int | None = None,
        config: Any = None,
        correction_decoder: MaskDecoder | None = None,
        point_refiner: nn.Module | None = None,
        crop_refiner: nn.Module | None = None,
        second_refiner: nn.Module | None = None,
    ) -> None:
        """The official signature (``Sam(image_encoder, prompt_encoder, mask_decoder, pixel_mean,
        pixel_std)``), plus ``image_size`` (the square input side) for encoders that do not fix it
        themselves, ``config`` (the :class:`SamConfig` it was built from, saved with the weights) and
        ``correction_decoder`` (the decoder of prompts with a mask input: ``SamConfig.correction_decoder``) and
        ``point_refiner`` (corrects the upsampled masks at the image's resolution: ``SamConfig.point_refiner``;
        applied by the predictor, which has the image's pixels) and ``crop_refiner`` (the same for zoom-in's crops
        and the images the point refiner leaves: ``SamConfig.crop_refiner``) and ``second_refiner`` (the point
        refiner's answers to prompts with a mask input refined again: ``SamConfig.second_refiner``).

        ``image_encoder.img_size`` is the input size on every model, as official code (the predictor,
        the ONNX export) reads it: taken from the encoder when it has one, recorded on it otherwise.
        """
        super().__init__()
        enc_size = getattr(image_encoder, "img_size", None)
        if image_size is None:
            if enc_size is None:
                raise ValueError(f"{type(image_encoder).__name__} has no img_size: pass image_size")
            image_size = int(enc_size)
        elif enc_size is None:
            image_encoder.img_size = image_size
        elif enc_size != image_size:
            raise ValueError(f"image_size {image_size} differs from the encoder's img_size {enc_size}")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.correction_decoder = correction_decoder
        self.point_refiner = point_refiner
        self.crop_refiner = crop_refiner
        self.second_refiner = second_refiner
        self.image_size = image_size
        self.config = config
        # Optional text prompt head (segany.modeling.text_prompt.TextHead), attached by load_model when
        # the model file has a ``<stem>_text.safetensors`` beside it; kept out of the model's own file.
        self.text_head: nn.Module | None = None
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def decoder_input_names(self) -> tuple[str, ...]:
        """Names of the mask decoder's image inputs besides the embedding (see :meth:`embed_image`)."""
        return ("high_res_features",) if getattr(self.mask_decoder, "use_high_res_features", False) else ()

    def decoder_for(self, with_mask_input: bool) -> MaskDecoder:
        """The mask decoder that answers prompts with a mask input (the correction decoder where the model
        has one) or without."""
        if with_mask_input and self.correction_decoder is not None:
            return self.correction_decoder
        return self.mask_decoder

    def decoder_region(self, input_size: tuple[int, int]) -> tuple[int, int] | None:
        """For a model that does not decode the input's padding (``SamConfig.decode_padding`` False): the image
        tokens, ``(rows, cols)`` from the top left, that an ``input_size`` input's masks need (the decoders'
        ``region``; :func:`~segany.modeling.low_res.decoded_region`). None: the whole grid, as SAM."""
        if getattr(self.config, "decode_padding", True):
            return None
        grid = tuple(self.prompt_encoder.image_embedding_size)
        return decoded_region(input_size, grid, self.image_size)

    def prompt_inputs(
        self,
        masks: torch.Tensor | None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The mask decoder's per-prompt inputs besides the prompt embeddings, as keyword arguments: for a
        decoder with ``mask_skip``, the mask prompt ``B x 1 x 4h x 4w`` itself, or with ``mask_skip_prompts``
        the prompt encoder's four maps (:meth:`~segany.modeling.dense_prompt_encoder.DensePromptEncoder.input_maps`
        of the mask and of ``points`` / ``boxes`` as the prompt encoder takes them); none without a mask prompt.
        They are for the decoder :meth:`decoder_for` gives."""
        decoder = self.decoder_for(masks is not None)
        if masks is None or not getattr(decoder, "mask_skip", False):
            return {}
        if decoder.conv_m0.in_channels == 1:
            return {"mask_input": masks}
        sizes = [masks.shape[0]] + [x.shape[0] for x in (points[0] if points else None, boxes) if x is not None]
        bs = max(sizes)
        return {"mask_input": self.prompt_encoder.input_maps(points, boxes, masks, bs)}

    def embed_image(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Preprocessed ``B x 3 x S x S`` -> the embedding ``B x C x h x w`` and the mask decoder's other
        image inputs as keyword arguments (none for SAM; the projected stride-4 / stride-8 maps for a
        decoder with high-resolution features, as SAM 2's; SAM-HQ's early ViT features)."""
        return self.split_encoder_output(self.image_encoder(x))

    def split_encoder_output(self, out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The image encoder's output -> :meth:`embed_image`'s (apart, so that training can run a frozen
        encoder without gradient and the decoder's projections with it)."""
        if not self.decoder_input_names:
            return out, {}
        feat_s0, feat_s1, emb = out
        return emb, {"high_res_features": self.mask_decoder.project_high_res(feat_s0, feat_s1)}

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize pixel values and pad bottom/right to ``image_size`` (``B x 3 x h x w``)."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
        threshold: float | None = None,
    ) -> torch.Tensor:
        """Low-res logits ``B x M x 4h x 4w`` -> ``B x M x H x W`` logits in the original frame, or with
        ``threshold`` the boolean masks ``logits > threshold``.

        Upsample to the padded input size, drop the padding, then resize to the original size.
        """
        masks = interpolate_masks(masks, (self.image_size, self.image_size), input_size, original_size)
        return masks if threshold is None else masks > threshold

    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, torch.Tensor]]:
        """The official batched interface: a list of per-image dicts with ``image`` (3xHxW, already
        resized so the longest side is ``image_size``), ``original_size`` and optional
        ``point_coords``/``point_labels``/``boxes``/``mask_inputs`` (in the resized frame)."""
        images = torch.stack([self.preprocess(x["image"]) for x in batched_input], dim=0)
        embeddings, inputs = self.embed_image(images)
        outputs = []
        for i, record in enumerate(batched_input):
            points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
            sparse, dense = self.prompt_encoder(points, record.get("boxes"), record.get("mask_inputs"))
            region = self.decoder_region(tuple(record["image"].shape[-2:]))
            low_res, iou = self.decoder_for(record.get("mask_inputs") is not None)(
                embeddings[i : i + 1],
                self.prompt_encoder.get_dense_pe(),
                sparse,
                dense,
                multimask_output,
                **{name: _one_image(value, i) for name, value in inputs.items()},
                **self.prompt_inputs(record.get("mask_inputs"), points, record.get("boxes")),
                **({} if region is None else {"region": region}),
            )
            masks = self.postprocess_masks(
                low_res, record["image"].shape[-2:], record["original_size"], threshold=self.mask_threshold
            )
            outputs.append({"masks": masks, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs
