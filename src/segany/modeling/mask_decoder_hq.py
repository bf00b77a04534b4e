"""SAM-HQ's mask decoder (https://arxiv.org/abs/2306.01567): SAM's decoder plus a High-Quality output token
whose mask is read from a fusion of the decoder's upscaled features with early (global-local) ViT features.

Parameter names follow ``segment_anything_hq.modeling.mask_decoder_hq.MaskDecoderHQ``.
"""

from __future__ import annotations

import torch
from torch import nn

from segany.modeling.common import LayerNorm2d
from segany.modeling.mask_decoder import MLP, MaskDecoder
from segany.modeling.transformer import TwoWayTransformer


class MaskDecoderHQ(MaskDecoder):
    """SAM's decoder with an HQ token (``hf_token``, its hypernetwork ``hf_mlp``) after SAM's output tokens.

    Its mask is read from ``embedding_maskfeature(SAM's upscaled features)`` plus the HQ features of the
    image, ``embedding_encoder(embedding) + compress_vit_feat(early ViT features)`` (``C/8 x 4h x 4w``).

    Output (upstream's semantics): one mask per prompt set. ``multimask_output``: SAM's best multimask
    output by predicted IoU, else its single-mask output; plus the HQ mask, or the HQ mask alone with
    ``hq_token_only``. The IoU is that of SAM's chosen mask.

    Args:
        vit_dim: width of the ViT encoder whose early features are fused.
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        vit_dim: int = 1024,
    ) -> None:
        super().__init__(transformer_dim, transformer, num_multimask_outputs, iou_head_depth, iou_head_hidden_dim)
        d = transformer_dim
        self.hf_token = nn.Embedding(1, d)
        self.hf_mlp = MLP(d, d, d // 8, 3)
        self.compress_vit_feat = nn.Sequential(
            nn.ConvTranspose2d(vit_dim, d, kernel_size=2, stride=2),
            LayerNorm2d(d),
            nn.GELU(),
            nn.ConvTranspose2d(d, d // 8, kernel_size=2, stride=2),
        )
        self.embedding_encoder = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2),
            LayerNorm2d(d // 4),
            nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2),
        )
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(d // 8, d // 4, 3, 1, 1),
            LayerNorm2d(d // 4),
            nn.GELU(),
            nn.Conv2d(d // 4, d // 8, 3, 1, 1),
        )

    def hq_features(self, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor) -> torch.Tensor:
        """``1 x C x h x w`` embedding and ``1 x h x w x vit_dim`` early ViT features -> ``1 x C/8 x 4h x 4w``."""
        vit = interm_embeddings.permute(0, 3, 1, 2)
        return self.embedding_encoder(image_embeddings) + self.compress_vit_feat(vit)

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        interm_embeddings: torch.Tensor | None = None,
        hq_token_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embeddings: ``1 x C x h x w``; image_pe: ``1 x C x h x w``; sparse ``B x T x C``;
            dense ``B x C x h x w``.
            interm_embeddings: the ViT's output after its first global-attention block, ``1 x h x w x vit_dim``.
        Returns:
            masks ``B x 1 x 4h x 4w`` (logits) and IoU predictions ``B x 1``.
        """
        if interm_embeddings is None:
            raise ValueError("SAM-HQ's decoder needs the image's early ViT features (interm_embeddings)")
        hq = self.hq_features(image_embeddings, interm_embeddings)
        masks, iou = self.predict_masks_hq(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, hq
        )
        n = self.num_mask_tokens
        if multimask_output:
            iou, best = torch.max(iou[:, 1:n], dim=1)
            iou = iou.unsqueeze(1)
            sam = masks[:, 1:n][torch.arange(masks.shape[0], device=masks.device), best].unsqueeze(1)
        else:
            iou, sam = iou[:, :1], masks[:, :1]
        hq_mask = masks[:, n : n + 1]
        return (hq_mask if hq_token_only else sam + hq_mask), iou

    def predict_masks_hq(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        hq_features: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's masks and the HQ mask ``B x (M + 1) x 4h x 4w`` (HQ last) and SAM's IoUs ``B x M``."""
        bs = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight, self.hf_token.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(bs, -1, -1), sparse_prompt_embeddings), dim=1)
        src = image_embeddings + dense_prompt_embeddings
        if src.shape[0] != bs:
            src = src.expand(bs, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe.expand(bs, -1, -1, -1), tokens)
        n = self.num_mask_tokens
        mask_tokens_out = hs[:, 1 : 2 + n, :]
        upscaled_sam = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        upscaled_hq = self.embedding_maskfeature(upscaled_sam) + hq_features
        hyper = [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)]
        hyper_in = torch.stack(hyper, dim=1)
        hyper_hq = self.hf_mlp(mask_tokens_out[:, n, :]).unsqueeze(1)
        b, c, h, w = upscaled_sam.shape
        masks_sam = (hyper_in @ upscaled_sam.view(b, c, h * w)).view(b, -1, h, w)
        masks_hq = (hyper_hq @ upscaled_hq.view(b, c, h * w)).view(b, -1, h, w)
        return torch.cat([masks_sam, masks_hq], dim=1), self.iou_prediction_head(hs[:, 0, :])
