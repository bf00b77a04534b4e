"""Text prompts: a learned projection from a frozen sentence vector to prompt tokens, and the head that
holds it together with the mask decoder fine-tuned to read them.

The projection makes ``num_tokens`` sparse tokens that the mask decoder reads beside point and box
tokens (SAM paper, section 7.5, where CLIP vectors played this role), plus an optional bias added to the
dense prompt embedding, i.e. to every image token: "which pixels are about this text" is then visible to
the image side of the two-way attention from the first layer on.

A SAM image embedding is trained to separate objects, not to name them: a linear probe of the default
model's embedding recovers almost none of the colour of the pixels under it (R^2 about 0.05). The head
therefore has an optional *pixel path* (:class:`PixelEncoder`): a small U-Net on the model's normalised
input whose outputs are added to the image embedding and to the decoder's upscaled mask features, and
read by a text-conditioned per-pixel classifier (:class:`TextReadout`) whose logits are added to the
decoder's (all zero-initialised, so a fresh head starts as the plain decoder). Points and boxes without
text never use it.
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
    pixel_width: int = 16  #: channels of the pixel path's first layer; 0 turns the path off

    def to_dict(self) -> dict:
        return asdict(self)


class TextPromptEncoder(nn.Module):
    """``B x text_dim`` unit vectors -> sparse tokens ``B x T x C`` and a dense bias ``B x C x 1 x 1``."""

    def __init__(self, cfg: TextHeadConfig, embed_dim: int) -> None:
        super().__init__()
        self.num_tokens = cfg.num_tokens
        self.embed_dim = embed_dim
        self.proj = nn.Sequential(
            nn.LayerNorm(cfg.text_dim),  # see TextReadout: unit sentence vectors are too small for a Linear
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


def content_coordinates(x: torch.Tensor) -> torch.Tensor:
    """``B x 2 x S x S`` coordinates (x, y in -1..1 across the image's content, 0 in the padding) of a
    normalised, zero-padded model input ``B x 3 x S x S``.

    The content is where any channel is non-zero: SAM's pixel means (123.675, 116.28, 103.53) are not
    whole numbers, so no 8-bit pixel normalises to exactly zero and the padding is the only zero area.
    Coordinates relative to the content (not the padded square) make "on the left" mean the same in a
    wide and in a tall image.
    """
    inside = (x != 0).any(dim=1)  # B x S x S
    b, s, _ = inside.shape
    rows = inside.any(dim=2).float()
    cols = inside.any(dim=1).float()
    # content extent = one past the last non-zero row / column (content starts at the top-left corner)
    idx = torch.arange(1, s + 1, device=x.device, dtype=x.dtype)
    vh = (rows * idx).amax(dim=1).clamp(min=1)
    vw = (cols * idx).amax(dim=1).clamp(min=1)
    centres = torch.arange(s, device=x.device, dtype=x.dtype) + 0.5
    ys = (2 * centres[None] / vh[:, None] - 1)[:, :, None].expand(b, s, s)
    xs = (2 * centres[None] / vw[:, None] - 1)[:, None, :].expand(b, s, s)
    return torch.stack([xs, ys], dim=1) * inside[:, None].to(x.dtype)


def _conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    # He init: with PyTorch's default (variance 1/(3 fan_in)) the activations of this norm-free U-Net
    # shrink about threefold per layer and the text read-out starts from near-zero features.
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GELU())


class PixelEncoder(nn.Module):
    """A small U-Net on the normalised, padded model input ``B x 3 x S x S`` plus content coordinates.

    Returns three feature maps of the image (independent of the text, so computed once per image):

    * an addition to the image embedding ``B x C x S/16 x S/16``,
    * an addition to the decoder's upscaled mask features ``B x C/8 x S/4 x S/4``,
    * read-out features ``B x 2w x S/4 x S/4`` for :class:`TextReadout`.

    Why a U-Net: colour is a per-pixel property, but shape ("the star") and position ("on the left", of
    the shape's centroid) are properties of the whole object, so each output pixel must see the object
    around it: the encoder goes down to S/32 (the whole 256-pixel input), the decoder brings that
    context back to the mask resolution beside the fine, skip-connected features.
    """

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        w = width
        self.e1 = _conv(5, w, 2)  # S/2
        self.e2 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))  # S/4
        self.e3 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w))  # S/8
        self.e4 = nn.Sequential(_conv(4 * w, 8 * w, 2), _conv(8 * w, 8 * w))  # S/16
        self.e5 = nn.Sequential(_conv(8 * w, 8 * w, 2), _conv(8 * w, 8 * w))  # S/32
        self.d4 = nn.Sequential(_conv(16 * w, 8 * w, k=1), _conv(8 * w, 8 * w))
        self.d3 = nn.Sequential(_conv(12 * w, 4 * w, k=1), _conv(4 * w, 4 * w))
        self.d2 = nn.Sequential(_conv(6 * w, 2 * w, k=1), _conv(2 * w, 2 * w))
        self.to_embedding = nn.Conv2d(8 * w, embed_dim, 1)
        self.to_mask = nn.Conv2d(2 * w, embed_dim // 8, 1)
        self.out_dim = 2 * w
        for conv in (self.to_embedding, self.to_mask):  # a fresh head starts as the plain decoder
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @staticmethod
    def _up(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f1 = self.e1(torch.cat([x, content_coordinates(x)], dim=1))
        f2 = self.e2(f1)
        f3 = self.e3(f2)
        f4 = self.e4(f3)
        f5 = self.e5(f4)
        g4 = self.d4(self._up(f5, f4))
        g3 = self.d3(self._up(g4, f3))
        g2 = self.d2(self._up(g3, f2))
        return self.to_embedding(g4), self.to_mask(g2), g2


class TextReadout(nn.Module):
    """Text-conditioned per-pixel classifier on the pixel path's read-out features, added to the mask
    logits: ``h = GELU(f * (1 + gamma(t)) + beta(t))``, ``logit = w(t) . h + b(t)``.

    The hidden layer lets one text ask for a conjunction ("red" and "star" and "on the left") of what the
    features say separately; a linear read-out could only add the evidence up.
    """

    def __init__(self, text_dim: int, feat_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        # Sentence vectors are unit vectors (components about 0.05) and differ little between phrases; a
        # Linear's default init then gives nearly the same output for every text and the text-dependent
        # part learns very slowly. The LayerNorm brings the components to unit scale first.
        self.mlp = nn.Sequential(
            nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 3 * feat_dim + 1)
        )
        nn.init.zeros_(self.mlp[-1].weight)  # starts as "no read-out": the decoder's logits alone
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, text: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``B x text_dim`` and ``1 or B x F x h x w`` -> logits ``B x 1 x h x w``."""
        f = self.feat_dim
        gamma, beta, w, b = self.mlp(text).split([f, f, f, 1], dim=1)
        h = nn.functional.gelu(features * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])
        return (torch.einsum("bc,bchw->bhw", w, h) + b[:, :, None])[:, None]


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
        # A direct, text-conditioned read-out of the pixel features, added to the mask logits: "red" is then
        # learned in the pixel features, without a detour through the two-way attention (which learns such
        # selections slowly from a frozen embedding).
        self.readout = (
            TextReadout(cfg.text_dim, self.pixels.out_dim, cfg.hidden_dim) if self.pixels is not None else None
        )
        self.mask_decoder = mask_decoder

    def image_features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The pixel path's features of the normalised model input ``B x 3 x S x S`` (None without it)."""
        return None if self.pixels is None else self.pixels(x)

    def decode(
        self,
        text: torch.Tensor,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        pixel_features: tuple[torch.Tensor, ...] | None = None,
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
            masks = masks + self.readout(text, pixel_features[2].expand(b, -1, -1, -1))
        return masks, iou[:, :1]
