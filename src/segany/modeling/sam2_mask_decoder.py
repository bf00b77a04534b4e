"""SAM 2's mask decoder: SAM's two-way transformer and hypernetwork masks, plus high-resolution features
in the upscaling, an object-score token and the stability fallback for single-mask output.

Parameter names are those of ``sam2.modeling.sam.mask_decoder.MaskDecoder`` (loaded from the official
``sam_mask_decoder.*`` keys).
"""

from __future__ import annotations

import torch
from torch import nn

from segany.modeling.low_res import edge_beyond
from segany.modeling.mask_decoder import MLP, MaskDecoder
from segany.modeling.transformer import TwoWayTransformer


class Sam2MaskDecoder(MaskDecoder):
    """SAM's :class:`MaskDecoder` as SAM 2 extends it: ``1 + num_multimask_outputs`` masks, their IoU and an
    object score per prompt set.

    Args:
        use_high_res_features: add projected stride-8 / stride-4 features (``conv_s1`` / ``conv_s0``, applied
            once per image by :meth:`project_high_res`) inside the two upscaling steps.
        high_res_in_chans: channels of the stride-4 and stride-8 maps (SAM 2's neck: ``transformer_dim``
            both; segany's EfficientNet encoder hands over its trunk's own maps).
        iou_prediction_use_sigmoid: IoU head output through a sigmoid.
        pred_obj_scores / pred_obj_scores_mlp: an object-score token read by a linear layer or a 3-layer MLP.
        dynamic_multimask_via_stability: single-mask output falls back to the best multimask output when
            the single mask's stability score (IoU of the masks at logit > delta and > -delta) is below
            ``dynamic_multimask_stability_thresh`` (at inference only, as upstream).
        mask_skip: also add a mask input's logits (``mask_input``, at the mask grid) through a 3 x 3
            convolution (``conv_m0``, no bias: nothing without a mask input) to the stride-4 features, so a
            correction can keep the previous mask's detail (not in SAM 2).
        mask_skip_channels: the maps ``mask_input`` holds: 1 (the mask's logits), or 4 (the dense prompt
            encoder's maps, the clicks and the box beside the mask: ``SamConfig.mask_skip_prompts``).
        high_res_projections: with ``use_high_res_features``, own ``conv_s0`` / ``conv_s1``; False for a decoder
            that takes another decoder's projected features (``SamConfig.correction_decoder``).
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        use_high_res_features: bool = True,
        high_res_in_chans: tuple[int, int] | None = None,
        iou_prediction_use_sigmoid: bool = True,
        pred_obj_scores: bool = True,
        pred_obj_scores_mlp: bool = True,
        dynamic_multimask_via_stability: bool = True,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
        mask_skip: bool = False,
        mask_skip_channels: int = 1,
        high_res_projections: bool = True,
    ) -> None:
        super().__init__(transformer_dim, transformer, num_multimask_outputs, iou_head_depth, iou_head_hidden_dim)
        d = transformer_dim
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, d)
            self.pred_obj_score_head = MLP(d, d, 1, 3) if pred_obj_scores_mlp else nn.Linear(d, 1)
        self.use_high_res_features = use_high_res_features
        if use_high_res_features and high_res_projections:
            c0, c1 = high_res_in_chans or (d, d)
            self.conv_s0 = nn.Conv2d(c0, d // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(c1, d // 4, kernel_size=1)
        if mask_skip and not use_high_res_features:
            raise ValueError("mask_skip needs use_high_res_features")
        self.mask_skip = mask_skip
        if mask_skip:
            self.conv_m0 = nn.Conv2d(mask_skip_channels, d // 8, kernel_size=3, padding=1, bias=False)
        self.iou_prediction_use_sigmoid = iou_prediction_use_sigmoid
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    def project_high_res(self, feat_s0: torch.Tensor, feat_s1: torch.Tensor) -> list[torch.Tensor]:
        """Maps at strides 4 and 8 (``B x C0 x 4h x 4w``, ``B x C1 x 2h x 2w``) -> the projected
        ``B x C/8 x 4h x 4w`` and ``B x C/4 x 2h x 2w`` that :meth:`forward` takes (once per image)."""
        return [self.conv_s0(feat_s0), self.conv_s1(feat_s1)]

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
        """
        Args:
            image_embeddings: ``1 x C x h x w`` (shared by all prompt sets) or ``B x C x h x w``.
            image_pe: ``1 x C x h x w``; sparse: ``B x T x C``; dense: ``B x C x h x w``.
            high_res_features: from :meth:`project_high_res` (required when ``use_high_res_features``).
            mask_input: the mask prompt's logits ``B x 1 x 4h x 4w`` (or ``B x 4 x 4h x 4w``, the four prompt
                maps: ``mask_skip_channels``), for ``mask_skip`` (none: no mask prompt).
            region: ``(rows, cols)`` of image tokens from the top left: the masks there, and beyond them their
                edge (:func:`~segany.modeling.low_res.edge_beyond`; not in SAM 2). The fast decoder decodes
                only the region.
        Returns:
            masks ``B x M x 4h x 4w`` (logits) and IoU predictions ``B x M``, M = 3 or 1.
        """
        masks, iou, _tokens, _obj = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            high_res_features,
            mask_input,
            region,
        )
        if multimask_output:
            return masks[:, 1:], iou[:, 1:]
        if self.dynamic_multimask_via_stability and not self.training:
            return self._dynamic_multimask_via_stability(masks, iou)
        return masks[:, :1], iou[:, :1]

    def predict_masks(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: list[torch.Tensor] | None = None,
        mask_input: torch.Tensor | None = None,
        region: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All masks ``B x M x 4h x 4w`` (``region``: as :meth:`forward`), IoUs ``B x M``, mask tokens ``B x M x C``
        (SAM 2's object pointers are made from them) and object-score logits ``B x 1``."""
        bs = sparse_prompt_embeddings.shape[0]
        heads = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            heads.insert(0, self.obj_score_token.weight)
        s = int(self.pred_obj_scores)
        output_tokens = torch.cat(heads, dim=0).unsqueeze(0).expand(bs, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings.to(output_tokens.dtype)), dim=1)
        src = image_embeddings + dense_prompt_embeddings
        if src.shape[0] != bs:
            src = src.expand(bs, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe.expand(bs, -1, -1, -1), tokens)
        iou_token_out = hs[:, s, :]
        mask_tokens_out = hs[:, s + 1 : s + 1 + self.num_mask_tokens, :]
        if self.use_high_res_features and high_res_features is None:
            raise ValueError("this decoder needs the image's high-resolution features")
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        masks = self.upscale_masks(src, (h, w), hyper_in, high_res_features, mask_input, region)
        iou_pred = self.iou_prediction_head(iou_token_out)
        if self.iou_prediction_use_sigmoid:
            iou_pred = torch.sigmoid(iou_pred)
        if self.pred_obj_scores:
            obj = self.pred_obj_score_head(hs[:, 0, :])
        else:  # "object present" (sigmoid(10) ~ 1), as upstream
            obj = 10.0 * iou_pred.new_ones(iou_pred.shape[0], 1)
        return masks, iou_pred, mask_tokens_out, obj

    def upscale_masks(
        self,
        src: torch.Tensor,
        size: tuple[int, int],
        hyper_in: torch.Tensor,
        high_res_features: list[torch.Tensor] | None = None,
        mask_input: torch.Tensor | None = None,
        region: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The transformer's image tokens ``B x hw x C`` (an ``h x w`` grid, ``size``, row by row) and the
        hypernetworks' outputs ``B x M x C/8`` -> mask logits ``B x M x 4h x 4w``: the upscaling, with the
        high-resolution features (and ``mask_skip``'s mask input) added inside it, then their product
        (``region``: as :meth:`forward`)."""
        b, _n, c = src.shape
        src = src.transpose(1, 2).reshape(b, c, *size)
        if self.use_high_res_features:
            dc1, ln1, act1, dc2, act2 = self.output_upscaling
            feat_s0, feat_s1 = high_res_features
            if self.mask_skip and mask_input is not None:
                feat_s0 = feat_s0 + self.conv_m0(mask_input.to(feat_s0.dtype))
            upscaled = act1(ln1(dc1(src) + feat_s1))
            upscaled = act2(dc2(upscaled) + feat_s0)
        else:
            upscaled = self.output_upscaling(src)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks if region is None else edge_beyond(masks, region)

    def stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """``B x 1 x H x W`` logits -> ``B x 1``: area(> delta) / area(> -delta), 1 where both are empty."""
        flat = mask_logits.flatten(-2)
        delta = self.dynamic_multimask_stability_delta
        inter = (flat > delta).sum(-1).float()
        union = (flat > -delta).sum(-1).float()
        return torch.where(union > 0, inter / union, 1.0)

    def _dynamic_multimask_via_stability(
        self, masks: torch.Tensor, iou: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token 0's mask where it is stable, else the multimask output with the highest IoU."""
        best = torch.argmax(iou[:, 1:], dim=-1)
        rows = torch.arange(iou.shape[0], device=iou.device)
        best_masks = masks[:, 1:][rows, best].unsqueeze(1)
        best_iou = iou[:, 1:][rows, best].unsqueeze(1)
        single, single_iou = masks[:, :1], iou[:, :1]
        stable = self.stability_scores(single) >= self.dynamic_multimask_stability_thresh
        return (
            torch.where(stable[..., None, None].expand_as(single), single, best_masks),
            torch.where(stable.expand_as(single_iou), single_iou, best_iou),
        )
