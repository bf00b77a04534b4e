"""Text prompts: a learned projection from a frozen sentence vector to prompt tokens, and the head that
holds it together with the mask decoder fine-tuned to read them.

The projection makes ``num_tokens`` sparse tokens that the mask decoder reads beside point and box
tokens (SAM paper, section 7.5, where CLIP vectors played this role), plus an optional bias added to the
dense prompt embedding, i.e. to every image token: "which pixels are about this text" is then visible to
the image side of the two-way attention from the first layer on.

A SAM image embedding is trained to separate objects, not to name them: a linear probe of the default
model's embedding recovers almost none of the colour of the pixels under it (R^2 about 0.05). The head
therefore has an optional *pixel path* (:class:`PixelEncoder`): a small CNN on the model's normalised
input whose output is added to the image embedding and to the decoder's upscaled mask features (both
zero-initialised, so a fresh head starts as the plain decoder). Points and boxes without text never use it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.text_encoder import DEFAULT_SENTENCE_ENCODER


@dataclass
class TextHeadConfig:
    sentence_encoder: str = DEFAULT_SENTENCE_ENCODER
    text_dim: int = 384
    num_tokens: int = 4
    hidden_dim: int = 256
    dense_bias: bool = True
    pixel_width: int = 32  #: channels of the pixel path's first layer; 0 turns the path off

    def to_dict(self) -> dict:
        return asdict(self)


class TextPromptEncoder(nn.Module):
    """``B x text_dim`` unit vectors -> sparse tokens ``B x T x C`` and a dense bias ``B x C x 1 x 1``."""

    def __init__(self, cfg: TextHeadConfig, embed_dim: int) -> None:
        super().__init__()
        self.num_tokens = cfg.num_tokens
        self.embed_dim = embed_dim
        self.proj = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.hidden_dim),
            nn.GELU(),
            nn.Linear(cfg.hidden_dim, cfg.num_tokens * embed_dim),
        )
        self.dense = nn.Linear(cfg.text_dim, embed_dim) if cfg.dense_bias else None
        if self.dense is not None:  # start as "no text bias": the pretrained decoder's input is unchanged
            nn.init.zeros_(self.dense.weight)
            nn.init.zeros_(self.dense.bias)

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.proj(text).view(text.shape[0], self.num_tokens, self.embed_dim)
        dense = self.dense(text)[:, :, None, None] if self.dense is not None else None
        return tokens, dense


class PixelEncoder(nn.Module):
    """Normalised, padded model input ``B x 3 x S x S`` -> additions to the embedding ``B x C x S/16 x S/16``
    and to the decoder's upscaled mask features ``B x C/8 x S/4 x S/4``."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
        )
        self.down = nn.Sequential(
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(4 * w, embed_dim, 3, stride=2, padding=1),
        )
        self.to_mask = nn.Conv2d(2 * w, embed_dim // 8, 1)
        for conv in (self.down[-1], self.to_mask):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.stem(x)
        return self.down(f), self.to_mask(f)


class TextHead(nn.Module):
    """The text prompt encoder plus the mask decoder that was fine-tuned with it.

    The decoder is a copy of the base model's (same architecture), so point and box prompts without text
    keep the base decoder's behaviour exactly.
    """

    def __init__(self, cfg: TextHeadConfig, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.config = cfg
        self.prompt = TextPromptEncoder(cfg, mask_decoder.transformer_dim)
        self.pixels = PixelEncoder(cfg.pixel_width, mask_decoder.transformer_dim) if cfg.pixel_width else None
        # A direct, text-conditioned linear read-out of the pixel features, added to the mask logits: "red"
        # is then one learned direction in the pixel features, without a detour through the two-way
        # attention (which learns such selections slowly from a frozen embedding).
        self.readout = nn.Linear(cfg.text_dim, mask_decoder.transformer_dim // 8 + 1) if cfg.pixel_width else None
        self.mask_decoder = mask_decoder

    def image_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pixel path's features of the normalised model input ``B x 3 x S x S`` (None without it)."""
        return None if self.pixels is None else self.pixels(x)

    def decode(
        self,
        text: torch.Tensor,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        pixel_features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-mask decoding of ``B`` text prompts (with optional point/box tokens).

        Args:
            text: ``B x text_dim``; image_embeddings: ``1 or B x C x h x w``; image_pe: ``1 x C x h x w``;
            sparse: ``1 or B x N x C`` point/box tokens (N may be 0); dense: ``1 or B x C x h x w``;
            pixel_features: :meth:`image_features` of the same image(s) (``1 or B`` leading), required
                when the head has a pixel path.
        Returns:
            logits ``B x 1 x 4h x 4w`` and IoU predictions ``B x 1``.
        """
        b = text.shape[0]
        if self.pixels is not None:
            if pixel_features is None:
                raise ValueError("this text head needs the image's pixel features (image_features)")
            image_embeddings = image_embeddings + pixel_features[0]
        tokens, bias = self.prompt(text)
        if sparse.shape[0] != b:
            sparse = sparse.expand(b, -1, -1)
        if dense.shape[0] != b:
            dense = dense.expand(b, -1, -1, -1)
        if bias is not None:
            dense = dense + bias
        # Text is not ambiguous the way a single click is: the single-mask output token answers it.
        masks, iou = self.mask_decoder.predict_masks(
            image_embeddings, image_pe, torch.cat([sparse, tokens], dim=1), dense,
            upscaled_bias=None if self.pixels is None else pixel_features[1],
        )
        masks = masks[:, :1]
        if self.readout is not None:
            r = self.readout(text)
            fine = pixel_features[1].expand(b, -1, -1, -1)
            masks = masks + (torch.einsum("bc,bchw->bhw", r[:, :-1], fine) + r[:, -1:, None])[:, None]
        return masks, iou[:, :1]
