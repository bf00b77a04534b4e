"""SAM 2 for images at inference: the image embedding with the FPN neck and the decoder's high-resolution
projections folded together, the prompt encoder's positional encoding kept, the post-processing by OpenCV's
resize.

Same function as :class:`~segany.modeling.sam2.Sam2` up to float rounding:

* The neck's 1x1 lateral convolutions are matrix products on the trunk's token-major outputs (no
  channels-first copies, no convolution kernel), and its top-down nearest 2x upsampling is a broadcast add.
* The stride-4 and stride-8 levels get no top-down path in the official layouts, so the decoder's 1x1
  ``conv_s0`` / ``conv_s1`` after the neck's lateral convolutions is one linear map of the trunk's tokens:
  their product is applied once (96 -> 32 channels at stride 4 for Hiera-T), and the neck's 256-channel
  256 x 256 map (64 MB) is never made.
* Post-processing: SAM 2 resizes the low-res logits straight to the image size, one bilinear resize, which
  is :func:`segany.modeling.fast.postprocess.postprocess_masks` with an identity first resize (model size
  = low-res size).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from segany.modeling.fast import postprocess
from segany.modeling.fast.common import active
from segany.modeling.fast.hiera import FastHiera
from segany.modeling.fast.prompt_encoder import FastPromptEncoder
from segany.modeling.sam2 import Sam2, Sam2PromptEncoder


class FastSam2PromptEncoder(Sam2PromptEncoder, FastPromptEncoder):
    """:class:`Sam2PromptEncoder` with :class:`FastPromptEncoder`'s kept positional encoding."""


def _lateral(conv: torch.nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution on token-major ``B x H x W x C`` tokens: ``B x H x W x C_out``."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


def _folded(conv: torch.nn.Conv2d, lateral: torch.nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """``conv(lateral(x))`` for two 1x1 convolutions as one product (``B x H x W x C`` tokens -> ``B x C_out x
    H x W``, contiguous)."""
    w2, w1 = conv.weight.flatten(1), lateral.weight.flatten(1)
    out = F.linear(tokens, w2 @ w1, torch.addmv(conv.bias, w2, lateral.bias))
    return out.permute(0, 3, 1, 2).contiguous()


class FastSam2(Sam2):
    """:class:`Sam2` with the folded neck in :meth:`embed_image` and OpenCV's post-processing at inference (see
    the module's notes); the plain methods everywhere else."""

    def _folds_neck(self) -> bool:
        """True for the official image-encoder layout the fast embedding computes: a fast trunk with four
        levels, one dropped (``scalp``), nearest top-down, none into the two finest levels, and the
        decoder's high-resolution projections."""
        enc = self.image_encoder
        neck = enc.neck
        return (
            active(self)
            and isinstance(enc.trunk, FastHiera)
            and enc.scalp == 1
            and len(neck.convs) == 4
            and neck.fpn_interp_model == "nearest"
            and not {0, 1} & set(neck.fpn_top_down_levels)
            and self.mask_decoder.use_high_res_features
        )

    def embed_image(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        if not self._folds_neck():
            return super().embed_image(x)
        enc, md = self.image_encoder, self.mask_decoder
        convs = [level.conv for level in enc.neck.convs]  # coarsest first
        tokens = [t.permute(0, 2, 3, 1) for t in enc.trunk(x)]  # finest first, B x H x W x C (contiguous)
        emb = _lateral(convs[1], tokens[2])
        if 2 in enc.neck.fpn_top_down_levels:  # nearest 2x upsampling of the coarsest level, added
            b, h, w, c = emb.shape
            emb.view(b, h // 2, 2, w // 2, 2, c).add_(_lateral(convs[0], tokens[3])[:, :, None, :, None])
        if self.directly_add_no_mem_embed:
            emb += self.no_mem_embed.view(-1)
        high_res = [_folded(md.conv_s0, convs[3], tokens[0]), _folded(md.conv_s1, convs[2], tokens[1])]
        return emb.permute(0, 3, 1, 2).contiguous(), {"high_res_features": high_res}

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
        threshold: float | None = None,
    ) -> torch.Tensor:
        low = int(masks.shape[-1])
        if masks.shape[-2] == low and postprocess.use_fast_path(masks):
            # Model size = low-res size: the first resize of SAM's post-processing is the identity.
            return postprocess.postprocess_masks(masks, low, (low, low), original_size, threshold=threshold)
        out = super().postprocess_masks(masks, input_size, original_size)
        return out if threshold is None else postprocess.greater(out, threshold)
