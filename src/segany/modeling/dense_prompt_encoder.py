"""Prompt encoder that also draws the clicks and the box as maps and fuses them with the image embedding.

SAM meets a click only in its decoder, as a token; the image embedding must then already separate every
object the click could mean, which takes a great deal of data. Interactive segmenters that learn from a
few thousand images (RITM, FocalClick, SegNext) instead draw the clicks as disks and the box as a
rectangle and add them to the image features pixel by pixel. This encoder does both: the sparse tokens
are SAM's, and the dense embedding is the mask downscaler applied to four maps at the low-res mask grid
(``4h x 4w``): the previous mask's logits (zeros without one), the positive click disks, the negative
click disks and the box. The decoder adds the dense embedding to every image token, so the image is still
encoded once and each prompt stays cheap.

Boxes come as ``boxes`` or as corner points labelled 2 and 3 (the ONNX decoder's convention).
"""

from __future__ import annotations

import torch
from torch import nn

from segany.modeling.prompt_encoder import PromptEncoder

#: Maps drawn for the downscaler: mask logits, positive clicks, negative clicks, box.
NUM_PROMPT_MAPS = 4
#: which of the four maps (:meth:`DensePromptEncoder.input_maps`) is the mask input's logits
MASK_MAP = 0


class DensePromptEncoder(PromptEncoder):
    """:class:`PromptEncoder` whose dense embedding also carries the clicks and the box (see the module).

    Args (beyond :class:`PromptEncoder`'s):
        click_radius: disk radius of a click, in pixels of the model input.
    """

    dense_prompts = True

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
        click_radius: float = 10.0,
    ) -> None:
        super().__init__(embed_dim, image_embedding_size, input_image_size, mask_in_chans, activation)
        first = self.mask_downscaling[0]
        self.mask_downscaling[0] = nn.Conv2d(NUM_PROMPT_MAPS, first.out_channels, kernel_size=2, stride=2)
        self.click_radius = click_radius

    def prompt_maps(
        self, points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None, bs: int
    ) -> torch.Tensor:
        """Positive clicks, negative clicks and box drawn on the low-res mask grid: ``B x 3 x 4h x 4w``
        (1 inside, 0 outside). ``points``: ``B x N x 2`` coordinates and ``B x N`` labels in the input
        frame; ``boxes``: ``B x 4`` XYXY."""
        h, w = self.mask_input_size
        device = self.no_mask_embed.weight.device
        scale_y = self.input_image_size[0] / h
        scale_x = self.input_image_size[1] / w
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * scale_y
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * scale_x
        maps = torch.zeros((bs, 3, h, w), device=device)
        if points is not None:
            coords, labels = points[0].float(), points[1]
            maps[:, :2] = self.click_disks(coords, labels, ys[None, None], xs[None, None])[:, 0]
            if boxes is None:  # corners labelled 2 and 3, if any (no data-dependent branch: exportable)
                corners = (labels[:, :, None] == torch.tensor([2, 3], device=labels.device)).float()  # B x N x 2
                # the labelled corner of each kind (mean, in case a corner is given twice)
                xy = torch.einsum("bnk,bnc->bkc", corners, coords) / corners.sum(1).clamp(min=1)[..., None]
                has_box = (corners.sum(1) > 0).all(-1).float()
                maps[:, 2] = self._box_map(xy.reshape(bs, 4), ys, xs) * has_box[:, None, None]
        if boxes is not None:
            maps[:, 2] = self._box_map(boxes.float().reshape(bs, 4), ys, xs)
        return maps

    def click_disks(
        self, coords: torch.Tensor, labels: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor
    ) -> torch.Tensor:
        """The positive and the negative click disks (1 inside, 0 outside) on ``K`` windows of pixel centres
        per prompt: ``coords`` ``B x N x 2`` (float), ``labels`` ``B x N``, the windows' rows ``ys``
        ``B x K x h'`` and columns ``xs`` ``B x K x w'`` in the input frame (broadcastable) ->
        ``B x K x 2 x h' x w'``. :meth:`prompt_maps` draws one window, the whole grid; the re-associated
        decoder draws the cells near each click (``modeling/fast/dense_cells.py``)."""
        dy = ys[:, :, None, :, None] - coords[:, None, :, 1, None, None]
        dx = xs[:, :, None, None, :] - coords[:, None, :, 0, None, None]
        inside = (dy * dy + dx * dx) <= self.click_radius**2  # B x K x N x h' x w'
        disks = [(inside & (labels == label)[:, None, :, None, None]).any(dim=2) for label in (1, 0)]
        return torch.stack(disks, dim=2).float()

    @staticmethod
    def _box_map(boxes: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
        inside_y = (ys[None, :, None] >= y0) & (ys[None, :, None] <= y1)
        inside_x = (xs[None, None, :] >= x0) & (xs[None, None, :] <= x1)
        return (inside_y & inside_x).float()

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`PromptEncoder.forward`; the dense embedding is ``B x C x h x w`` for every prompt set."""
        sparse, _ = super().forward(points, boxes, None)
        bs = sparse.shape[0] if masks is None else masks.shape[0]
        return sparse, self.dense_embedding(points, boxes, masks, bs)

    def input_maps(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        bs: int,
    ) -> torch.Tensor:
        """The four maps the downscaler reads, ``B x 4 x 4h x 4w``: the mask input's logits (zeros without
        one), then :meth:`prompt_maps`."""
        maps = self.prompt_maps(points, boxes, bs)
        mask = maps.new_zeros((bs, 1, *self.mask_input_size)) if masks is None else masks.float().expand(bs, -1, -1, -1)
        return torch.cat([mask, maps], dim=1)

    def dense_embedding(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        bs: int,
        has_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``B x C x h x w``: the downscaled maps, plus the no-mask embedding where there is no mask
        (``has_mask``: a ``B`` or scalar 0/1 flag, for exporters that always pass a mask tensor)."""
        if masks is not None and has_mask is None:  # a mask for every prompt set: no no-mask embedding to add
            return self.mask_downscaling(self.input_maps(points, boxes, masks, bs))
        if masks is None:
            has_mask = self.no_mask_embed.weight.new_zeros(())
        else:
            masks = masks.float() * has_mask.reshape(-1, 1, 1, 1)
        dense = self.mask_downscaling(self.input_maps(points, boxes, masks, bs))
        no_mask = self.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return dense + (1 - has_mask.reshape(-1, 1, 1, 1).float()) * no_mask
