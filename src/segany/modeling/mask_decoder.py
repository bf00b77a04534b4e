"""Mask decoder: output tokens + prompt tokens through the two-way transformer, then hypernetwork masks."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.common import LayerNorm2d, eager_inference
from segany.modeling.fast_decoder import ReassociatedDecoder
from segany.modeling.transformer import TwoWayTransformer


class MLP(nn.Module):
    """Plain MLP with ReLU between layers (keys ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Predicts ``1 + num_multimask_outputs`` masks and their IoU for each prompt set.

    Token 0 is the single-mask output (for unambiguous prompts), tokens 1..3 the ambiguity-aware ones.
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)
        # (weak ref to the image embedding, its version, image_pe, dense vector, decoder): see _reassociated.
        self._reassociated_cache: tuple | None = None
        # (weak ref to the positional encoding, {key: product}): see ReassociatedDecoder.pe_products.
        self._pe_products: tuple | None = None

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embeddings: ``1 x C x h x w`` (shared by all prompt sets) or ``B x C x h x w``.
            image_pe: ``1 x C x h x w``.
            sparse_prompt_embeddings: ``B x T x C``; dense_prompt_embeddings: ``B x C x h x w``.
            multimask_output: return the 3 ambiguity masks (True) or the single one (False).
        Returns:
            masks ``B x M x 4h x 4w`` (logits) and IoU predictions ``B x M``, M = 3 or 1.
        """
        dec = self._reassociated(image_embeddings, image_pe, dense_prompt_embeddings)
        if dec is not None:
            which = list(range(1, self.num_mask_tokens)) if multimask_output else [0]
            iou, _kept, low = dec.decode(sparse_prompt_embeddings, which, 0.0)
            return low.view(iou.shape[0], len(which), *low.shape[-2:]), iou
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reassociated_cache"] = None  # a weak reference does not pickle; it is only a cache
        state["_pe_products"] = None
        return state

    def _reassociated(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> ReassociatedDecoder | None:
        """The re-associated decoder (same outputs, a fraction of the work; see
        :mod:`segany.modeling.fast_decoder`) when it applies: inference, one image embedding, and one
        dense embedding for every pixel and prompt (no mask input). Its per-image part is kept for the
        next call with the same embedding tensor (unchanged since: same version; inference-mode tensors
        have no version counter, and the predictor never writes into its embedding) and positional encoding.
        """
        if not eager_inference(self):
            return None
        if image_embeddings.shape[0] != 1 or dense.ndim != 4 or dense.stride(-1) or dense.stride(-2):
            return None
        if dense.shape[0] > 1 and dense.stride(0):
            return None  # a different dense embedding per prompt
        if not ReassociatedDecoder.supports(self):
            return None
        vec = dense[0, :, 0, 0]
        version = None if image_embeddings.is_inference() else image_embeddings._version
        c = self._reassociated_cache
        if (
            c is not None
            and c[0]() is image_embeddings
            and c[1] == version
            and (c[2] is image_pe or torch.equal(c[2], image_pe))
            and torch.equal(c[3], vec)
        ):
            return c[4]
        dec = ReassociatedDecoder(self, image_embeddings, vec, image_pe)
        self._reassociated_cache = (weakref.ref(image_embeddings), version, image_pe, vec, dec)
        return dec

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        upscaled_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``1 + num_multimask_outputs`` masks ``B x M x 4h x 4w`` and IoUs ``B x M``.

        ``upscaled_bias`` (``1 or B x C/8 x 4h x 4w``, optional) is added to the upscaled image features the
        masks are read from (the text head's pixel path).
        """
        bs = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(bs, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings.to(output_tokens.dtype)), dim=1)
        # Broadcasting (rather than copying) the image embedding for each prompt set.
        src = image_embeddings + dense_prompt_embeddings
        if src.shape[0] != bs:
            src = src.expand(bs, -1, -1, -1)
        pos_src = image_pe.expand(bs, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        if upscaled_bias is not None:
            upscaled = upscaled + upscaled_bias
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)
