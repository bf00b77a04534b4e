"""SAM 2's mask decoder at inference: prompts without a mask input through the re-associated decoder.

SAM 2's decoder is SAM's two-way transformer and upscaling with three changes, which
:class:`Sam2ReassociatedDecoder` adds to :class:`~segany.modeling.fast.decoder.ReassociatedDecoder`:
an object-score token before the IoU token (one more output token; the IoU head may end in a sigmoid),
the projected stride-8 and stride-4 features added inside the two upscaling steps (before the layer norm
and before the last GELU), and, for a single-mask request, the stability fallback to the best of the
three multimask outputs. The high-resolution features are rearranged once per image into the
upscaling's channels-last pixel order (``token, dy, dx, channel``), so each band of image-token rows adds
a contiguous slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.fast.common import activate_, active, linear_act
from segany.modeling.fast.decoder import (
    ReassociatedDecoder,
    in_pixel_order,
    per_image_decoder,
    upscale_rows,
    upscaling_matrices,
)
from segany.modeling.fast.dense_cells import DenseCells
from segany.modeling.fast.factored import FactoredTokens, TokenProduct
from segany.modeling.fast.mask_decoder import DenseCellsDecoder, FastMaskDecoder
from segany.modeling.low_res import pad_by_edge
from segany.modeling.sam2 import Sam2
from segany.modeling.sam2_mask_decoder import Sam2MaskDecoder


def _pixel_blocks(feat: torch.Tensor, f: int) -> torch.Tensor:
    """``1 x C x f*h x f*w`` -> ``h*w x f*f x C``: for each image token its ``f x f`` pixels in the order of
    the stride-2 upscaling's outputs (``dy, dx`` for ``f = 2``; ``dy, dx, ey, ex`` with pixel offsets
    ``2*dy + ey``, ``2*dx + ex`` for ``f = 4``)."""
    c, fh, fw = feat.shape[1:]
    h, w = fh // f, fw // f
    x = feat[0].permute(1, 2, 0)  # f*h x f*w x C
    if f == 2:
        x = x.reshape(h, 2, w, 2, c).permute(0, 2, 1, 3, 4)
    else:
        x = x.reshape(h, 2, 2, w, 2, 2, c).permute(0, 3, 1, 4, 2, 5, 6)
    return x.reshape(h * w, f * f, c).contiguous()


class Sam2ReassociatedDecoder(ReassociatedDecoder):
    """:class:`ReassociatedDecoder` for :class:`~segany.modeling.sam2_mask_decoder.Sam2MaskDecoder` (see the
    module's notes); :meth:`set_high_res` gives it the image's high-resolution features."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._high_res: tuple | None = None

    def set_high_res(self, high_res: list[torch.Tensor]) -> None:
        """The projected ``1 x C/8 x 4h x 4w`` and ``1 x C/4 x 2h x 2w`` maps of the image, rearranged by the
        mask decoder (:meth:`FastSam2MaskDecoder.high_res_blocks`, once per image for all its paths)."""
        self._high_res = self.md.high_res_blocks(high_res)

    def tokens(self, sparse: torch.Tensor, cells=None) -> tuple[torch.Tensor, torch.Tensor, FactoredTokens]:
        md, tr = self.md, self.tr
        b = sparse.shape[0]
        heads = [md.iou_token.weight, md.mask_tokens.weight]
        if md.pred_obj_scores:
            heads.insert(0, md.obj_score_token.weight)
        s = int(md.pred_obj_scores)
        out_tokens = torch.cat(heads, dim=0)
        qpe = torch.cat([out_tokens[None].expand(b, -1, -1), sparse.to(out_tokens.dtype)], dim=1)
        queries = qpe
        x: FactoredTokens | None = None
        for j, layer in enumerate(tr.layers):
            queries, x = self.block(j, layer, queries, qpe, x, cells if j == 0 else None)
        q = queries + qpe
        queries = tr.norm_final_attn(queries + self._t2i(tr.final_attn_token_to_image, x, q))
        iou = md.iou_prediction_head(queries[:, s])
        if md.iou_prediction_use_sigmoid:
            iou = torch.sigmoid(iou)
        return iou, queries[:, s + 1 : s + 1 + md.num_mask_tokens], x

    def _upscale(self, first: TokenProduct, hyper: torch.Tensor, rows: tuple[int, int], w: int) -> torch.Tensor:
        x1 = first.block(rows[0], rows[1], w)
        return upscale_band(self.md, self._upscaling_weights()[2:], self._high_res[2:], x1, hyper, rows, self.hw[1])


def upscale_band(
    md: Sam2MaskDecoder,
    second: tuple[torch.Tensor, torch.Tensor],
    blocks: tuple[torch.Tensor, torch.Tensor],
    x1: torch.Tensor,
    hyper: torch.Tensor,
    rows: tuple[int, int],
    full_w: int,
    extra_s0: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rest of the upscaling, channels-last, for a band of image-token rows ``rows`` (its first ``w``
    columns) of a grid ``full_w`` tokens wide, then the product with the hypernetwork outputs ``hyper``
    (``K x C/8``) -> logits ``K x 4h x 4w``.

    ``x1``: the first transposed convolution's output for the band, ``h*w x (dy, dx, C/4)``, a fresh tensor
    (added to in place); ``second``: the second one's matrix and bias (:func:`upscaling_matrices`);
    ``blocks``: the image's high-resolution maps as :meth:`FastSam2MaskDecoder.high_res_blocks` rearranges
    them (stride 8, then 4); ``extra_s0``: more stride-4 blocks to add (``mask_skip``'s mask input), laid out
    as the stride-4 ones, ``h' x w' x 16 x C/8`` for the grid's top-left tokens (the band's among them).
    """
    _up1, norm, act1, up2, act2 = md.output_upscaling
    w2, b2 = second
    s1, s0 = blocks
    r0, r1 = rows
    h = r1 - r0
    w = x1.shape[0] // h
    n = h * w
    c1, c2 = up2.in_channels, up2.out_channels
    x1 = x1.view(h, w, 4, c1)
    x1 += s1.view(-1, full_w, 4, c1)[r0:r1, :w]
    x1 = activate_(F.layer_norm(x1.view(n, 4, c1), (c1,), norm.weight, norm.bias, norm.eps), act1)
    x2 = linear_act(x1.view(n * 4, c1), w2, b2, None).view(h, w, 16, c2)
    x2 += s0.view(-1, full_w, 16, c2)[r0:r1, :w]
    if extra_s0 is not None:
        x2 += extra_s0[r0:r1, :w]
    x2 = activate_(x2, act2)
    return in_pixel_order(torch.mm(hyper, x2.view(n * 16, c2).t()), h, w)


class FastSam2MaskDecoder(DenseCellsDecoder, Sam2MaskDecoder):
    """:class:`Sam2MaskDecoder` that decodes prompts without a mask input through
    :class:`Sam2ReassociatedDecoder` at inference (same outputs up to float rounding, a fraction of the
    work), clicks drawn into the dense embedding too (segany's own models with high-resolution features);
    the plain forward everywhere else."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._reassociated_cache: tuple | None = None  # see _reassociated
        self._pe_products: tuple | None = None  # see ReassociatedDecoder.pe_products
        self._high_res_blocks: tuple | None = None  # see high_res_blocks

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reassociated_cache"] = None  # weak references do not pickle; only caches
        state["_pe_products"] = None
        state["_high_res_blocks"] = None
        return state

    def high_res_blocks(self, high_res: list[torch.Tensor]) -> tuple:
        """``(s0, s1, s1 blocks, s0 blocks)``: the projected high-resolution maps ``1 x C/8 x 4h x 4w`` and ``1 x
        C/4 x 2h x 2w`` of one image and the same rearranged by :func:`_pixel_blocks` into the upscaling's
        pixel order; kept while the maps are the same tensors (the re-associated decoder and the upscaling of
        prompts with a mask input share them)."""
        s0, s1 = high_res
        c = self._high_res_blocks
        if c is None or c[0] is not s0 or c[1] is not s1:
            self._high_res_blocks = c = (s0, s1, _pixel_blocks(s1, 2), _pixel_blocks(s0, 4))
        return c

    def upscale_masks(
        self,
        src: torch.Tensor,
        size: tuple[int, int],
        hyper_in: torch.Tensor,
        high_res_features: list[torch.Tensor] | None = None,
        mask_input: torch.Tensor | None = None,
        region: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """:meth:`Sam2MaskDecoder.upscale_masks` for the prompts the re-associated decoder does not take (a
        mask input: every cell of the dense embedding differs) of one image at inference: channels-last as
        there (each transposed convolution one matmul, bands of token rows, the image's high-resolution
        maps rearranged once per image; only the ``region``'s tokens); the plain upscaling elsewhere. Same
        logits up to float rounding."""
        if not (
            active(self)
            and self.use_high_res_features
            and supports(self)
            and high_res_features is not None
            and high_res_features[0].shape[0] == 1
            and src.dtype == hyper_in.dtype == high_res_features[0].dtype
        ):
            return super().upscale_masks(src, size, hyper_in, high_res_features, mask_input, region)
        blocks = self.high_res_blocks(high_res_features)
        w1, b1, w2, b2 = upscaling_matrices(self)
        h, w = size
        rows, cols = region or (h, w)
        extra = None
        if self.mask_skip and mask_input is not None:  # the region's pixels, from the ones the 3 x 3 kernel reads
            part = mask_input[..., : 4 * rows + 1, : 4 * cols + 1].to(src.dtype)
            extra = self.conv_m0(part)[..., : 4 * rows, : 4 * cols]
        out = hyper_in.new_empty(src.shape[0], hyper_in.shape[1], 4 * rows, 4 * cols)
        step = upscale_rows(cols, self.output_upscaling[3].out_channels)
        for i in range(src.shape[0]):
            extra_i = None if extra is None else _pixel_blocks(extra[i : i + 1], 4).view(rows, cols, 16, -1)
            tokens = src[i].reshape(h, w, -1)
            for r0 in range(0, rows, step):
                r1 = min(r0 + step, rows)
                x1 = linear_act(tokens[r0:r1, :cols].reshape((r1 - r0) * cols, -1), w1, b1, None)
                band = upscale_band(self, (w2, b2), blocks[2:], x1, hyper_in[i], (r0, r1), w, extra_i)
                out[i, :, 4 * r0 : 4 * r1] = band
        return pad_by_edge(out, (4 * h, 4 * w))

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: list[torch.Tensor] | None = None,
        mask_input: torch.Tensor | None = None,
        region: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        found = None
        if high_res_features is not None and mask_input is None and supports(self):
            found = self._reassociated(image_embeddings, image_pe, dense_prompt_embeddings)
        if found is None:
            return super().forward(
                image_embeddings,
                image_pe,
                sparse_prompt_embeddings,
                dense_prompt_embeddings,
                multimask_output,
                high_res_features,
                mask_input,
                region,
            )
        dec, cells = found
        dec.set_high_res(high_res_features)
        n = self.num_mask_tokens
        if multimask_output:
            which = list(range(1, n))
        elif self.dynamic_multimask_via_stability:
            which = list(range(n))  # the fallback reads all of them
        else:
            which = [0]
        iou, _kept, low = dec.decode(sparse_prompt_embeddings, which, 0.0, region, cells=cells)
        masks = pad_by_edge(low.view(iou.shape[0], len(which), *low.shape[-2:]), (4 * dec.hw[0], 4 * dec.hw[1]))
        if not multimask_output and self.dynamic_multimask_via_stability:
            return self._dynamic_multimask_via_stability(masks, iou)
        return masks, iou

    def _reassociated(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> tuple[Sam2ReassociatedDecoder, DenseCells | None] | None:
        """The re-associated decoder where it applies: inference, one image embedding, a dense embedding
        that :meth:`~segany.modeling.fast.mask_decoder.DenseCellsDecoder.dense_parts` splits (no mask
        input). Its per-image part is kept for the next call with the same image
        (:func:`~segany.modeling.fast.decoder.per_image_decoder`)."""
        if not active(self) or image_embeddings.shape[0] != 1:
            return None
        parts = self.dense_parts(dense)
        if parts is None:
            return None
        vec, cells = parts

        def make() -> Sam2ReassociatedDecoder:
            return Sam2ReassociatedDecoder(self, image_embeddings, vec, image_pe)

        return per_image_decoder(self, image_embeddings, image_pe, vec, make), cells


def supports(decoder: nn.Module) -> bool:
    """True for a SAM 2 decoder whose layout :class:`Sam2ReassociatedDecoder` computes."""
    return (
        isinstance(decoder, Sam2MaskDecoder) and decoder.use_high_res_features and ReassociatedDecoder.supports(decoder)
    )


def reassociated_class(model: nn.Module) -> type[ReassociatedDecoder] | None:
    """The re-associated decoder class for "one image, many prompts without a mask input" of a model built
    with the fast paths (same results, less work), or None where the model's own decoder must run: SAM's
    layout, and SAM 2's decoder in segany's own models (high-resolution features on a SAM model; SAM 2
    itself keeps its decoder, whose image inputs its model prepares differently)."""
    md = model.mask_decoder
    if not ReassociatedDecoder.supports(model):
        return None
    if isinstance(md, FastMaskDecoder):
        return ReassociatedDecoder
    if isinstance(md, FastSam2MaskDecoder) and supports(md) and not isinstance(model, Sam2):
        return Sam2ReassociatedDecoder
    return None


def reassociated_decoder(model: nn.Module, features: torch.Tensor, decoder_inputs: dict) -> ReassociatedDecoder:
    """The :func:`reassociated_class` decoder of one image: its embedding ``1 x C x h x w`` and its other
    decoder inputs (``SamPredictor.decoder_inputs``: the high-resolution features, where the model has them)."""
    cls = reassociated_class(model)
    if cls is None:
        raise ValueError("this model's decoder has no re-associated form")
    dec = cls.for_model(model, features)
    if isinstance(dec, Sam2ReassociatedDecoder):
        dec.set_high_res(decoder_inputs["high_res_features"])
    return dec
