"""SAM-HQ (``sam_hq_vit_{b,l,h}.pth``): SAM's ViT encoder, prompt encoder and decoder plus the HQ token and
the global-local feature fusion (:class:`~segany.modeling.mask_decoder_hq.MaskDecoderHQ`).

The checkpoint is SAM's layout plus the decoder's HQ tensors (``mask_decoder.hf_token`` ...), so a
:class:`SamHQConfig` is a :class:`SamConfig` marked ``family="sam_hq"`` (the fused ViT width is the
encoder's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from segany.modeling.config import SamConfig, ViTConfig, get_config, register_config
from segany.modeling.image_encoder import ImageEncoderViT
from segany.modeling.mask_decoder_hq import MaskDecoderHQ
from segany.modeling.sam import Sam
from segany.modeling.transformer import TwoWayTransformer


@dataclass
class SamHQConfig(SamConfig):
    """A SAM-HQ model: a ViT SAM whose decoder has the HQ token."""

    family: Literal["sam_hq"] = "sam_hq"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamHQConfig:
        d = dict(d)
        d.pop("family", None)
        base = SamConfig.from_dict(d)
        return cls(**{k: getattr(base, k) for k in base.__dataclass_fields__})


for _size in ("vit_b", "vit_l", "vit_h"):

    def _make(size: str = _size) -> SamHQConfig:
        return SamHQConfig(**vars(get_config(size)))

    register_config(f"sam_hq_{_size}")(_make)


def _early_and_final(encoder: ImageEncoderViT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ViT's embedding and its tokens after the first global-attention block (``B x h x w x C``).

    The blocks run as the encoder runs them (in place on its fast path, so the early tokens are copied)."""
    from segany.modeling.fast import FastImageEncoderViT, active

    if isinstance(encoder, FastImageEncoderViT) and active(encoder):
        from segany.modeling.fast.image_encoder import block_inplace as run
    else:

        def run(block: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
            return block(t)

    x = (encoder.patch_embed(x) + encoder.pos_embed).contiguous()
    early = None
    for block in encoder.blocks:
        x = run(block, x)
        if early is None and block.window_size == 0:
            early = x.clone()
    if early is None:
        raise ValueError("SAM-HQ needs a ViT with a global-attention block")
    return encoder.neck(x.permute(0, 3, 1, 2)), early


class SamHQ(Sam):
    """SAM with the HQ decoder; :meth:`embed_image` also returns the early ViT features it fuses."""

    decoder_input_names = ("interm_embeddings",)

    def embed_image(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Preprocessed ``B x 3 x S x S`` -> the embedding and ``interm_embeddings`` (``B x h x w x vit_dim``)."""
        embedding, early = _early_and_final(self.image_encoder, x)
        return embedding, {"interm_embeddings": early}


def build_sam_hq(cfg: SamHQConfig, image_encoder: ImageEncoderViT, fast: bool = True) -> SamHQ:
    """A randomly initialised :class:`SamHQ` for ``cfg`` around ``image_encoder`` (the ViT that
    :func:`segany.modeling.build.build_sam`, which calls this, builds for ``cfg``)."""
    from segany.modeling.fast import fast_class
    from segany.modeling.prompt_encoder import PromptEncoder

    if not isinstance(cfg.encoder, ViTConfig):
        raise ValueError("SAM-HQ is built on a ViT encoder")
    emb = cfg.embedding_size
    d = cfg.prompt_embed_dim
    return SamHQ(
        image_encoder=image_encoder,
        prompt_encoder=fast_class(PromptEncoder, fast)(
            d, (emb, emb), (cfg.image_size, cfg.image_size), cfg.mask_in_chans
        ),
        mask_decoder=MaskDecoderHQ(
            d,
            TwoWayTransformer(cfg.decoder_depth, d, cfg.decoder_num_heads, cfg.decoder_mlp_dim),
            num_multimask_outputs=cfg.num_multimask_outputs,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
            vit_dim=cfg.encoder.embed_dim,
        ),
        image_size=cfg.image_size,
        pixel_mean=tuple(cfg.pixel_mean),
        pixel_std=tuple(cfg.pixel_std),
        config=cfg,
    )
