"""SAM 2 / 2.1 for images: Hiera encoder + FPN neck, SAM's prompt encoder, SAM 2's mask decoder.

:class:`Sam2` is a :class:`~segany.modeling.sam.Sam` with SAM 2's pre- and post-processing (the image is
stretched to a square, not padded; pixels normalized in [0, 1] units; masks resized straight back) and
an image embedding that comes with high-resolution features. It is what ``SAM2Base`` does for images
(``forward_image`` + the no-memory embedding + ``_forward_sam_heads`` without memory). The video parts
(memory attention, memory encoder, object pointers) belong in their own modules beside this one; their
official tensors are set aside when an image model is loaded (see :mod:`segany.checkpoint_sam2`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.hiera import FpnNeck, Hiera, Sam2ImageEncoder
from segany.modeling.prompt_encoder import PromptEncoder
from segany.modeling.sam import Sam
from segany.modeling.sam2_config import Sam2Config
from segany.modeling.sam2_mask_decoder import Sam2MaskDecoder
from segany.modeling.transformer import TwoWayTransformer


class Sam2PromptEncoder(PromptEncoder):
    """SAM's prompt encoder used as SAM 2 uses it: a box is given as two corner points (labels 2 and 3)
    placed before the clicks, and the point list is then padded like clicks alone (same parameters)."""

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`PromptEncoder.forward` (boxes ``B x 4``, in the model's input frame)."""
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)
            labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device).expand(corners.shape[0], -1)
            if points is not None:
                corners = torch.cat([corners, points[0]], dim=1)
                labels = torch.cat([labels, points[1].to(labels.dtype)], dim=1)
            points = (corners, labels)
        return super().forward(points, None, masks)


class Sam2(Sam):
    """SAM 2 image model. ``image_encoder`` returns the neck's maps at strides 4, 8 and 16; use
    :meth:`embed_image` for the decoder's inputs. In :meth:`Sam.forward`'s batched interface each
    ``image`` is already stretched to ``S x S``."""

    resize_mode = "stretch"
    decoder_input_names = ("high_res_features",)
    #: The low-res logits SAM 2's predictor returns are clamped to this (the masks are made before).
    low_res_logit_bound = 32.0

    def __init__(
        self,
        image_encoder: Sam2ImageEncoder,
        prompt_encoder: Sam2PromptEncoder,
        mask_decoder: Sam2MaskDecoder,
        image_size: int,
        pixel_mean: tuple[float, float, float],
        pixel_std: tuple[float, float, float],
        config: Any = None,
        directly_add_no_mem_embed: bool = True,
    ) -> None:
        super().__init__(
            image_encoder=image_encoder,
            prompt_encoder=prompt_encoder,
            mask_decoder=mask_decoder,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            image_size=image_size,
            config=config,
        )
        # Added to the lowest-resolution map of a frame without memory (every single image).
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, prompt_encoder.embed_dim))
        self.directly_add_no_mem_embed = directly_add_no_mem_embed

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` pixels in [0, 255], already stretched to the model size -> normalized."""
        return (x / 255.0 - self.pixel_mean) / self.pixel_std

    def embed_image(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Preprocessed ``B x 3 x S x S`` -> the embedding ``B x C x S/16 x S/16`` and the decoder's
        ``high_res_features``: the projected ``B x C/8 x S/4 x S/4`` and ``B x C/4 x S/8 x S/8`` maps
        (None without high-resolution features)."""
        feats = self.image_encoder(x)
        high_res = None
        if self.mask_decoder.use_high_res_features:
            high_res = self.mask_decoder.project_high_res(feats[0], feats[1])
        emb = feats[-1]
        if self.directly_add_no_mem_embed:
            emb = emb + self.no_mem_embed.view(1, -1, 1, 1)
        return emb, {"high_res_features": high_res}

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
        threshold: float | None = None,
    ) -> torch.Tensor:
        """Low-res logits ``B x M x h x w`` -> ``B x M x H x W`` in the original frame (one bilinear
        resize: the input was stretched, so there is no padding to crop); booleans with ``threshold``."""
        masks = F.interpolate(masks.float(), tuple(original_size), mode="bilinear", align_corners=False)
        return masks if threshold is None else masks > threshold


def build_sam2(cfg: Sam2Config, classes: Callable[[type], type] | None = None) -> Sam2:
    """A randomly initialised :class:`Sam2` for ``cfg`` (load weights with ``load_state_dict``).

    ``classes``: maps each plain module class to the class to build (``build_sam`` passes
    :func:`segany.modeling.fast.fast_class` for the inference fast paths); None: the plain classes.
    """
    pick = classes or (lambda cls: cls)
    if cfg.image_size % 32:
        raise ValueError(f"a SAM 2 image_size must be a multiple of 32, got {cfg.image_size}")
    enc = cfg.encoder
    d = cfg.prompt_embed_dim
    trunk = pick(Hiera)(
        embed_dim=enc.embed_dim,
        num_heads=enc.num_heads,
        stages=tuple(enc.stages),
        global_att_blocks=tuple(enc.global_att_blocks),
        window_spec=tuple(enc.window_spec),
        window_pos_embed_bkg_spatial_size=tuple(enc.window_pos_embed_bkg_spatial_size),
        mlp_ratio=enc.mlp_ratio,
    )
    neck = FpnNeck(d, trunk.channel_list, tuple(enc.fpn_top_down_levels))
    emb = cfg.embedding_size
    return pick(Sam2)(
        image_encoder=Sam2ImageEncoder(trunk, neck, enc.scalp),
        prompt_encoder=pick(Sam2PromptEncoder)(d, (emb, emb), (cfg.image_size, cfg.image_size), cfg.mask_in_chans),
        mask_decoder=pick(Sam2MaskDecoder)(
            d,
            pick(TwoWayTransformer)(cfg.decoder_depth, d, cfg.decoder_num_heads, cfg.decoder_mlp_dim),
            num_multimask_outputs=cfg.num_multimask_outputs,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
            use_high_res_features=cfg.use_high_res_features,
            iou_prediction_use_sigmoid=cfg.iou_prediction_use_sigmoid,
            pred_obj_scores=cfg.pred_obj_scores,
            pred_obj_scores_mlp=cfg.pred_obj_scores_mlp,
            dynamic_multimask_via_stability=cfg.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=cfg.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=cfg.dynamic_multimask_stability_thresh,
        ),
        image_size=cfg.image_size,
        pixel_mean=tuple(cfg.pixel_mean),
        pixel_std=tuple(cfg.pixel_std),
        config=cfg,
        directly_add_no_mem_embed=cfg.directly_add_no_mem_embed,
    )
