"""Clicks drawn into the dense embedding, as one per-image vector plus a few per-prompt cells.

:class:`~segany.modeling.dense_prompt_encoder.DensePromptEncoder` draws the clicks as disks on the
low-res mask grid (``4h x 4w``) and passes the maps (with the mask channel, zero without a mask input)
through the mask downscaler. The downscaler's convolutions have kernel = stride (2, 2 and 1) and the rest
of it works pixel by pixel, so each cell of the dense embedding depends only on its own ``4 x 4`` patch of
the maps. Where a patch is all zeros the cell is one fixed vector: the downscaled zero patch plus the
no-mask embedding. A click disk (radius 10 input pixels) touches a handful of cells (at most 3 x 3 for the
default model), so the dense embedding of a point prompt is that vector everywhere plus a difference on a
few cells: the re-associated decoder folds the vector into its per-image side and takes the differences
as a few extra per-prompt rows (:class:`DenseCells`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.common import LayerNorm2d
from segany.modeling.fast.common import layer_tensors, weights_key

# Layers of a downscaler that work pixel by pixel.
_POINTWISE = (LayerNorm2d, nn.GELU, nn.ReLU, nn.SiLU, nn.Identity)


@dataclass
class DenseCells:
    """The cells of ``B`` prompts' dense embeddings that differ from the per-image vector: ``index`` ``B x k``
    (image tokens, row-major) and ``delta`` ``B x k x C`` (the difference). Prompts with fewer than ``k``
    cells are padded with zero rows (at token 0), which change nothing."""

    index: torch.Tensor
    delta: torch.Tensor

    def __getitem__(self, rows: slice) -> DenseCells:
        return DenseCells(self.index[rows], self.delta[rows])


def cell_size(prompt_encoder: nn.Module) -> int | None:
    """Map pixels per embedding cell (each axis) when every cell of ``prompt_encoder``'s dense embedding
    depends only on its own patch of the maps (see the module); None otherwise."""
    down = getattr(prompt_encoder, "mask_downscaling", None)
    if not isinstance(down, nn.Sequential) or not hasattr(prompt_encoder, "prompt_maps"):
        return None
    stride = 1
    for layer in down:
        if isinstance(layer, nn.Conv2d):
            k, s = layer.kernel_size, layer.stride
            if k != s or k[0] != k[1] or layer.padding != (0, 0) or layer.dilation != (1, 1):
                return None
            stride *= s[0]
        elif not isinstance(layer, _POINTWISE):
            return None
    (h, w), (mh, mw) = prompt_encoder.image_embedding_size, prompt_encoder.mask_input_size
    return stride if (mh, mw) == (stride * h, stride * w) else None


def _downscaled(prompt_encoder: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """``K x 3 x s x s`` patches of the prompt maps, with no mask input -> ``K x C`` (the downscaler's cells).

    Run channels-last, each convolution (kernel = stride, see :func:`cell_size`) as one matrix product over
    its blocks of pixels: on a few 4 x 4 patches the convolutions' own kernels cost several times more."""
    mask = patches.new_zeros((patches.shape[0], 1, *patches.shape[2:]))
    x = torch.cat([mask, patches], dim=1).permute(0, 2, 3, 1)  # K x s x s x C
    for layer in prompt_encoder.mask_downscaling:
        if isinstance(layer, nn.Conv2d):
            k, (n, h, w, c) = layer.kernel_size[0], x.shape
            x = x.reshape(n, h // k, k, w // k, k, c).transpose(2, 3).reshape(n, h // k, w // k, k * k * c)
            x = F.linear(x, layer.weight.permute(0, 2, 3, 1).reshape(layer.out_channels, -1), layer.bias)
        elif isinstance(layer, LayerNorm2d):
            x = F.layer_norm(x, x.shape[-1:], layer.weight, layer.bias, layer.eps)
        else:  # pointwise (_POINTWISE)
            x = layer(x)
    return x.reshape(x.shape[0], -1)


# Per prompt encoder: its downscaled zero patch and the constant cell (see _zero_cells), with the weights they
# were computed from.
_ZERO_CELLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _zero_cells(prompt_encoder: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``C`` each: the downscaler's output for an all-zero patch (no click, no mask input), and that plus the
    no-mask embedding (:func:`constant_dense`). The same for every prompt: kept while the weights are the same
    tensors, unchanged (:func:`~segany.modeling.fast.common.weights_key`)."""
    weights = layer_tensors(*prompt_encoder.mask_downscaling) + [prompt_encoder.no_mask_embed.weight]
    key = weights_key(*weights)
    hit = _ZERO_CELLS.get(prompt_encoder)
    if hit is None or hit[0] != key:
        s = cell_size(prompt_encoder)
        zero = _downscaled(prompt_encoder, weights[-1].new_zeros((1, 3, s, s)))[0]
        hit = _ZERO_CELLS[prompt_encoder] = (key, zero, zero + weights[-1][0])
    return hit[1], hit[2]


def constant_dense(prompt_encoder: nn.Module) -> torch.Tensor:
    """``C``: the dense embedding of every cell that no click touches (no mask input)."""
    return _zero_cells(prompt_encoder)[1]


def click_cells(prompt_encoder: nn.Module, points: tuple[torch.Tensor, torch.Tensor]) -> DenseCells:
    """The cells that the clicks ``points`` (``B x N x 2`` coordinates in the input frame, ``B x N`` labels
    1 or 0, -1 for padding) change in ``prompt_encoder``'s dense embedding, with no box and no mask input.

    Only the cells near each click are drawn (by the encoder's own :meth:`click_disks`), not the whole
    ``4h x 4w`` maps: the cells whose patch holds a pixel centre within the click radius of a click."""
    coords, labels = points[0].float(), points[1]
    if bool((labels > 1).any()):
        raise ValueError("dense cells are for clicks (labels 1, 0 and -1), not box corners")
    s = cell_size(prompt_encoder)
    h, w = prompt_encoder.image_embedding_size
    (mh, mw), (ih, iw) = prompt_encoder.mask_input_size, prompt_encoder.input_image_size
    scale_y, scale_x = ih / mh, iw / mw  # input pixels per map pixel, as the encoder's maps
    b, n = labels.shape
    radius = prompt_encoder.click_radius
    # Candidate cells per click: a range that holds every cell with a pixel centre within the radius
    # (one cell of margin on each side; the drawing below decides).
    m = [math.ceil(2 * radius / (sc * s)) + 2 for sc in (scale_y, scale_x)]
    first = [torch.floor((coords[..., i] - radius) / (sc * s)).long() - 1 for i, sc in ((1, scale_y), (0, scale_x))]
    cy = (first[0][:, :, None] + torch.arange(m[0], device=coords.device)).clamp(0, h - 1)  # B x N x my
    cx = (first[1][:, :, None] + torch.arange(m[1], device=coords.device)).clamp(0, w - 1)  # B x N x mx
    ids = (cy[:, :, :, None] * w + cx[:, :, None, :]).view(b, -1)
    ids = torch.sort(ids, dim=1)[0]  # B x K, each cell once (the repeats dropped below)
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    # Each candidate cell's pixel centres, computed as the encoder's maps compute them.
    within = torch.arange(s, device=coords.device)
    ys = ((ids // w)[..., None] * s + within).float().add_(0.5).mul_(scale_y)  # B x K x s
    xs = ((ids % w)[..., None] * s + within).float().add_(0.5).mul_(scale_x)
    disks = prompt_encoder.click_disks(coords, labels, ys, xs)  # B x K x 2 x s x s
    touched = (disks.flatten(2).amax(-1) > 0) & ~repeat
    counts = touched.sum(1)
    k = int(counts.max()) if b else 0
    order = torch.sort(touched.to(torch.uint8), dim=1, descending=True, stable=True)[1][:, :k]
    valid = torch.arange(k, device=ids.device)[None] < counts[:, None]
    index = ids.gather(1, order) * valid  # padding at token 0
    zero = _zero_cells(prompt_encoder)[0]
    delta = coords.new_zeros((b, k, zero.shape[0]))
    picked = disks.gather(1, order[:, :, None, None, None].expand(-1, -1, *disks.shape[2:]))[valid]  # k' x 2 x s x s
    box = picked.new_zeros((picked.shape[0], 1, s, s))  # no box
    delta[valid] = _downscaled(prompt_encoder, torch.cat([picked, box], dim=1)) - zero
    return DenseCells(index, delta)
