"""Which low-res logits the post-processing reads: the part of the mask grid over the resized image.

SAM pads its input at the bottom and the right and decodes masks over the whole padded square; the
post-processing (upsample to the padded input, crop the padding, resize to the photo) reads only the
top-left rows and columns over the image. A model built with ``SamConfig.decode_padding = False`` decodes
only those (:func:`decoded_region`) and gives its low-res logits beyond them as their edge
(:func:`edge_beyond`), so that a mask fed back as the next prompt's mask input still covers the grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def low_res_rows(input_len: int, low_len: int, image_size: int) -> int:
    """Rows (or columns) of low-res logits that the official post-processing reads for an input of
    ``input_len`` pixels: upsampling by ``f = image_size / low_len`` (bilinear, half-pixel centres) and
    cropping to ``input_len`` uses source rows up to ``floor((input_len - 0.5) / f - 0.5) + 1``."""
    f = image_size / low_len
    return min(low_len, math.floor((input_len - 0.5) / f - 0.5) + 2)


def decoded_region(input_size: tuple[int, int], grid: tuple[int, int], image_size: int) -> tuple[int, int]:
    """The image tokens (``(rows, cols)`` from the top left of an ``h x w`` ``grid`` over a padded input of side
    ``image_size``) whose upscaled logits the post-processing of an ``input_size`` input reads: 4 low-res
    pixels a token."""
    rows = low_res_rows(input_size[0], 4 * grid[0], image_size)
    cols = low_res_rows(input_size[1], 4 * grid[1], image_size)
    return -(-rows // 4), -(-cols // 4)


def edge_beyond(logits: torch.Tensor, region: tuple[int, int]) -> torch.Tensor:
    """Low-res logits ``... x 4h x 4w`` with every row and column beyond the ``region`` of image tokens
    (``(rows, cols)``, :func:`decoded_region`) replaced by the region's last one (edges replicated)."""
    return pad_by_edge(logits[..., : 4 * region[0], : 4 * region[1]], tuple(logits.shape[-2:]))


def pad_by_edge(part: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits ``... x r x c`` (the top-left part of a mask grid) padded at the bottom and the right to ``size``
    by repeating their last row and column."""
    (rows, cols), (h, w) = part.shape[-2:], size
    if (rows, cols) == (h, w):
        return part
    out = F.pad(part.reshape(-1, 1, rows, cols), (0, w - cols, 0, h - rows), mode="replicate")
    return out.view(*part.shape[:-2], h, w)
