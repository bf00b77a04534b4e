"""PointRefiner: corrects a mask's upsampled logits near its edge at the image's own resolution (not in SAM).

SAM draws its masks on a grid of stride 4 of its input and upsamples them bilinearly, so on a photo larger than
the input an edge can be off by several pixels. After the upsampling, a small MLP (PointRend-style) takes the
most uncertain pixels of each mask (``|logit| < threshold``, at most ``budget`` of them) and corrects each one's
logit from what lies there: the coarse logit, a 5 x 5 RGB patch of the original image around it, two 5 x 5 patches
of the logits (2 and 6 pixels apart), the model's maps at the pixel (the decoder's stride-4 and stride-8
high-resolution features and the image embedding, bilinearly), and the pixel's colour against the mean colours
inside and outside the mask around it (3- and 7-cell windows of the mask grid, from the low-res logits and the
model's input averaged onto that grid), how much likelier the pixel's colour is inside the mask than outside it
(colour histograms of the whole image and of the mask's surroundings, GrabCut's colour model without its graph),
and where the pixel lies against the prompt (the nearest positive and negative click, the last click, the box).
Its last layer starts at zero, so an untrained refiner changes nothing.
It is trained on a frozen model's masks (:mod:`segany.training.refiner_train`); MODELS.md measures it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segany.modeling.low_res import pad_by_edge

# 5 x 5 patch offsets, row-major
_PATCH = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
RGB_STEPS = (1,)  #: pixels between the samples of each RGB patch
LOGIT_STEPS = (2, 6)  #: pixels between the samples of each logit patch
PIXEL_PAD = 2 * max(RGB_STEPS)  #: the stored pixels' margin (edges replicated): no RGB patch reaches past it
WINDOWS = (3, 7)  #: mask-grid cells on a side of the windows of the inside / outside mean colours
COLOUR_LEVELS = (8, 16)  #: levels per channel of the colour histograms (8^3 and 16^3 bins; each divides the last)
_COLOUR_PRIOR = {8: 0.5, 16: 0.1}  #: the count added to every bin (a finer histogram's bins hold fewer cells)
N_COLOUR = 2 * len(COLOUR_LEVELS)  #: colour features: each level over the whole image and around the mask
N_GEOMETRY = 8  #: prompt features (:func:`_prompt_geometry`)
_NEAR = 8.0  #: the image's longest side over this is the distance at which the click features saturate


@dataclass
class RefinerImage:
    """What the refiner reads of one image besides the masks (:meth:`of`): its pixels in the original frame,
    uint8 RGB planes with a margin of ``PIXEL_PAD`` (edges replicated) ``3 x (H + 2 pad) x (W + 2 pad)``, the
    model's normalised input averaged onto the mask grid ``3 x g x g``, that grid's means over each of
    ``WINDOWS`` (``3 len(WINDOWS) x g x g``), the bin of each of the image's cells (not its padding's) in the
    finest colour histogram (``COLOUR_LEVELS[-1]`` levels a channel; ``h x w``, the top-left part of the grid),
    and that histogram of all of them (the same for every mask of the image)."""

    pixels: torch.Tensor
    grid: torch.Tensor
    grid_means: torch.Tensor
    grid_bins: torch.Tensor
    bin_counts: torch.Tensor

    @classmethod
    def of(
        cls,
        image: torch.Tensor,
        x: torch.Tensor,
        input_size: tuple[int, int],
        pixel_mean: torch.Tensor,
        pixel_std: torch.Tensor,
    ) -> RefinerImage:
        """From the image ``H x W x 3`` uint8 RGB and the model's preprocessed input ``1 x 3 x S x S`` (the resized
        image ``input_size`` at its top left, normalised by ``pixel_mean`` and ``pixel_std``, ``3`` or
        ``3 x 1 x 1`` each)."""
        h, w = image.shape[:2]  # edges replicated by index (F.pad's replicate mode takes floats only)
        rows = torch.arange(-PIXEL_PAD, h + PIXEL_PAD, device=image.device).clamp_(0, h - 1)
        cols = torch.arange(-PIXEL_PAD, w + PIXEL_PAD, device=image.device).clamp_(0, w - 1)
        planes = image.permute(2, 0, 1).index_select(1, rows).index_select(2, cols)
        grid = F.avg_pool2d(x[:1].float(), 4)[0]
        cells = grid[:, : -(-input_size[0] // 4), : -(-input_size[1] // 4)]
        bins = _colour_bin(cells * pixel_std.view(3, 1, 1) + pixel_mean.view(3, 1, 1), COLOUR_LEVELS[-1])
        counts = torch.bincount(bins.flatten(), minlength=COLOUR_LEVELS[-1] ** 3).float()
        return cls(planes, grid, torch.cat(_box_means(grid, WINDOWS)), bins, counts)

    def to(self, device: torch.device) -> RefinerImage:
        return RefinerImage(*(t.to(device) for t in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.pixels, self.grid, self.grid_means, self.grid_bins, self.bin_counts

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())


@dataclass
class RefinerPrompts:
    """The prompts of ``M`` masks in the model's input frame (as ``SamPredictor.predict_torch`` takes them):
    points ``M x N x 2`` with labels ``M x N`` (1 positive, 0 negative, others ignored) and boxes ``M x 4``
    (XYXY), each None when absent."""

    points: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None

    def of_mask(
        self, m: int, original_size: Sequence[int], input_size: Sequence[int]
    ) -> tuple[torch.Tensor | None, ...]:
        """Mask ``m``'s points ``K x 2`` (its positive and negative ones), labels ``K`` and box ``4`` in the
        original frame (``(H, W)``; the resized image's ``(h, w)`` in the model's input is ``input_size``)."""
        scale = (original_size[1] / input_size[1], original_size[0] / input_size[0])
        points = labels = box = None
        if self.points is not None and self.labels is not None:
            keep = (self.labels[m] == 0) | (self.labels[m] == 1)
            points, labels = self.points[m][keep].float() * self.points.new_tensor(scale), self.labels[m][keep]
        if self.boxes is not None:
            box = self.boxes[m].float() * self.boxes.new_tensor(scale * 2)
        return points, labels, box


def _box_means(t: torch.Tensor, windows: Sequence[int]) -> list[torch.Tensor]:
    """Means over ``w x w`` windows of each channel of ``C x H x W`` for each ``w`` of ``windows`` (one integral
    image for all; edges replicated)."""
    h, w_ = t.shape[-2:]
    p = max(windows) // 2
    c = F.pad(F.pad(t[None], (p,) * 4, mode="replicate")[0].cumsum(1).cumsum(2), (1, 0, 1, 0))
    out = []
    for w in windows:
        a, b = p - w // 2, p - w // 2 + w  # the window's first row and the one after it, in the padded frame
        s = c[:, b : b + h, b : b + w_] - c[:, a : a + h, b : b + w_] - c[:, b : b + h, a : a + w_]
        out.append((s + c[:, a : a + h, a : a + w_]) / (w * w))
    return out


def _where_below(a: torch.Tensor, t: float) -> torch.Tensor:
    """The indices of the elements of flat ``a`` below ``t``, ascending (on the CPU by numpy's ``flatnonzero``, the
    faster there: benchmarks/README.md)."""
    if a.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(a.detach().numpy() < t))
    return torch.nonzero(a < t).flatten()


def _window_crop(u: torch.Tensor, v: torch.Tensor, g: int) -> tuple[slice, slice, torch.Tensor]:
    """The part of a ``g x g`` grid whose ``WINDOWS`` means bilinear samples at positions ``(u, v)`` (in cells, centres
    at integers) read: its rows and columns, and the positions as ``grid_sample`` coordinates in it ``1 x 1 x N x 2``.
    Its means are the whole grid's there (each sampled cell's windows stay inside it; its edges that are the grid's
    replicate as before), and positions past the grid's edge still sample zeros."""
    reach = max(WINDOWS) // 2
    r0, c0 = max(math.floor(v.min()) - reach, 0), max(math.floor(u.min()) - reach, 0)
    r1, c1 = min(math.floor(v.max()) + 2 + reach, g), min(math.floor(u.max()) + 2 + reach, g)
    where = torch.stack([(2 * (u - c0) + 1) / (c1 - c0) - 1, (2 * (v - r0) + 1) / (r1 - r0) - 1], 1)
    return slice(r0, r1), slice(c0, c1), where[None, None]


def map_positions(
    ys: torch.Tensor, xs: torch.Tensor, input_size: Sequence[int], hw: Sequence[int], g: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels ``(ys, xs)`` of an ``H x W`` image (``hw``) resized to ``input_size`` in a padded input of side
    ``4 g``: their centres' columns and rows in the input frame, and those as ``grid_sample`` coordinates
    ``1 x 1 x N x 2`` (the same for every map over the padded input)."""
    px = (xs.float() + 0.5) * (input_size[1] / hw[1])
    py = (ys.float() + 0.5) * (input_size[0] / hw[0])
    return px, py, (torch.stack([px, py], 1) / (2 * g) - 1)[None, None]


def _gather(flat: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, offsets: torch.Tensor, hw: tuple[int, int]):
    """``flat[(y + dy) * W + (x + dx)]`` for every offset ``K`` and pixel ``N`` (clamped to the image, i.e. edges
    replicated): ``K x N`` of ``flat`` ``H * W``."""
    h, w = hw
    r = int(offsets.abs().max()) if len(offsets) else 0
    if len(ys) and r <= min(int(ys.min()), int(xs.min())) and int(ys.max()) < h - r and int(xs.max()) < w - r:
        index = (ys * w + xs)[None] + (offsets[:, 0] * w + offsets[:, 1])[:, None]  # no patch leaves the image
    else:
        index = (ys + offsets[:, 0, None]).clamp_(0, h - 1) * w + (xs + offsets[:, 1, None]).clamp_(0, w - 1)
    return flat.index_select(0, index.view(-1)).view(offsets.shape[0], len(ys))


def add_to_cells(
    cells: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    change: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> None:
    """Add the changes of logit ``N`` of pixels ``(ys, xs)`` of the ``H x W`` original frame into the low-res logits
    ``cells`` (``g x g``, contiguous; in place), each into the mask-grid cell (stride 4 of the model's input,
    ``input_size``) its centre falls in, at its share of that cell's area: a cell then holds its logit plus the
    mean change of the upsampled logits over it, the area mean of the changed answer."""
    (big_h, big_w), (h, w), g = original_size, input_size, cells.shape[-1]
    cy = ((ys.float() + 0.5) * (h / (4 * big_h))).long().clamp_(max=g - 1)
    cx = ((xs.float() + 0.5) * (w / (4 * big_w))).long().clamp_(max=g - 1)
    cells.view(-1).index_add_(0, cy * g + cx, change * (h * w / (16 * big_h * big_w)))


def _colour_likelihoods(image: RefinerImage, low_res: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """How much likelier colours ``3 x N`` (0-255) are inside a mask than outside it: ``N_COLOUR x N`` log ratios
    (/4, clipped to +-3) of colour histograms of the image's cells on the mask grid (``image.grid_bins``, the
    top-left part of the grid) weighted by the mask's probability ``sigmoid(low_res)`` and by its complement; per
    level of ``COLOUR_LEVELS``, over the whole image, then over the mask's surroundings (its box on the grid grown
    by its own size on each side; the whole image for an empty mask)."""
    cells = image.grid_bins
    h, w = cells.shape
    p = torch.sigmoid(low_res[:h, :w].float())
    rows, cols = torch.nonzero(p > 0.5, as_tuple=True)
    near = (slice(None), slice(None))
    if len(rows):
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
        dh, dw = r1 - r0 + 1, c1 - c0 + 1
        near = (slice(max(r0 - dh, 0), r1 + dh + 1), slice(max(c0 - dw, 0), c1 + dw + 1))
    finest = COLOUR_LEVELS[-1]
    coarser = {levels: _coarser_bin(levels, finest, colours.device) for levels in COLOUR_LEVELS}
    fine = _colour_bin(colours, finest)
    pixels = {levels: fine if levels == finest else coarser[levels][fine] for levels in COLOUR_LEVELS}
    out = []
    for region in (None, near):
        b, weight = (cells, p) if region is None else (cells[region], p[region])
        b, weight = b.reshape(-1), weight.reshape(-1)
        # one pass at the finest level (inside; all cells: outside = all - inside), the coarser ones summed from it
        fg = torch.bincount(b, weight, finest**3)
        every = image.bin_counts if region is None else torch.bincount(b, minlength=finest**3).to(fg)
        both = torch.stack([fg, every - fg])
        for levels in COLOUR_LEVELS:
            pooled = both if levels == finest else both.new_zeros(2, levels**3).index_add_(1, coarser[levels], both)
            pooled = pooled + _COLOUR_PRIOR[levels]
            ratio = (pooled / pooled.sum(1, keepdim=True)).log_()
            out.append(((ratio[0] - ratio[1])[pixels[levels]] / 4).clamp_(-3, 3))
    return torch.stack(out)


def _colour_bin(colours: torch.Tensor, levels: int) -> torch.Tensor:
    """The histogram bin of each of colours ``3 x N`` (0-255) with ``levels`` levels per channel."""
    q = (colours * (levels / 256)).long().clamp_(0, levels - 1)
    return (q[0] * levels + q[1]) * levels + q[2]


@functools.lru_cache(maxsize=8)
def _coarser_bin(levels: int, finest: int, device: torch.device) -> torch.Tensor:
    """The bin with ``levels`` levels a channel of each bin with ``finest`` levels (:func:`_colour_bin`'s
    layout): ``finest ** 3`` indices."""
    q = torch.arange(finest**3, device=device)
    f = finest // levels
    return ((q // finest**2 // f) * levels + (q // finest % finest) // f) * levels + (q % finest) // f


def _prompt_geometry(
    ys: torch.Tensor,
    xs: torch.Tensor,
    hw: tuple[int, int],
    points: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    box: torch.Tensor | None = None,
) -> torch.Tensor:
    """Where pixels ``(ys, xs)`` of an ``H x W`` image lie against a mask's prompt (points ``K x 2`` with labels
    ``K``, box ``4``, original frame): ``N_GEOMETRY x N`` rows, the distances in units of the image's longest
    side / ``_NEAR``, clipped at 1: the nearest positive click, the nearest negative one (1 where there is none),
    the box's inside (0 / 1), the distance to its nearest edge (signed, + inside, clipped to +-1), the last
    click's distance, its sign (+1 / -1; 0 without clicks), the number of clicks / 5 (at most 1), and the distance
    from the box's centre in units of its half-sides / 4 (at most 1; 0 without a box)."""
    f = torch.zeros(N_GEOMETRY, len(ys), device=ys.device)
    f[:2] = 1
    scale = _NEAR / max(hw)
    at = torch.stack([xs, ys], 1).float()
    if points is not None and len(points):
        d = torch.cdist(at, points.to(at)) * scale
        for row, label in ((0, 1), (1, 0)):
            if (labels == label).any():
                f[row] = d[:, labels == label].amin(1).clamp_(max=1)
        f[4] = d[:, -1].clamp(max=1)
        f[5] = 1.0 if int(labels[-1]) == 1 else -1.0
        f[6] = min(len(points) / 5, 1.0)
    if box is not None:
        x0, y0, x1, y1 = box.tolist()
        x, y = at[:, 0], at[:, 1]
        eps = 1e-3  # a box edge on a pixel stays inside after the round trip through the model's input frame
        f[2] = ((x >= x0 - eps) & (x <= x1 + eps) & (y >= y0 - eps) & (y <= y1 + eps)).float()
        edge = torch.stack([x - x0, x1 - x, y - y0, y1 - y]).amin(0)
        f[3] = (edge * scale).clamp_(-1, 1)
        half_w, half_h = max(x1 - x0, 1) / 2, max(y1 - y0, 1) / 2
        f[7] = (((x - (x0 + x1) / 2) / half_w).square() + ((y - (y0 + y1) / 2) / half_h).square()).sqrt() / 4
        f[7].clamp_(max=1)
    return f


class PointRefiner(nn.Module):
    """A per-pixel MLP ``in_features -> hidden -> hidden -> 1`` that adds a correction to the logits of a mask's
    uncertain pixels. Built by :func:`~segany.modeling.build.build_sam` for ``SamConfig.point_refiner``."""

    def __init__(
        self,
        map_channels: Sequence[int],
        hidden: int = 64,
        threshold: float = 6.0,
        budget: int = 2048,
        max_upscale: float = 2.0,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
    ) -> None:
        super().__init__()
        self.threshold = threshold
        self.budget = budget
        self.max_upscale = max_upscale
        self.map_channels = tuple(map_channels)
        n = len(_PATCH)
        in_features = (
            1 + 3 * n * len(RGB_STEPS) + n * len(LOGIT_STEPS) + sum(map_channels) + 8 * len(WINDOWS) + N_COLOUR
            + N_GEOMETRY
        )
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), False)
        patch = torch.tensor(_PATCH)
        self.register_buffer("rgb_offsets", torch.cat([patch * s for s in RGB_STEPS]), False)
        self.register_buffer("logit_offsets", torch.cat([patch * s for s in LOGIT_STEPS]), False)

    def uncertain_pixels(
        self,
        logits: torch.Tensor,
        low_res: torch.Tensor | None = None,
        input_size: tuple[int, int] | None = None,
        budget: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and columns of the pixels of ``H x W`` logits to refine: ``|logit| < threshold``, the most
        uncertain ``budget`` of them (None: the refiner's own ``budget``; 0: all). With the low-res logits
        ``g x g`` and the resized image's size in the model's input, a lower threshold taken from them (about
        twice the budget: the upsampling is bilinear, so the image's pixels follow the grid's cells) spares a
        top-k over all the uncertain pixels; where it keeps fewer than the budget, all are searched."""
        budget = self.budget if budget is None else budget
        a = logits.abs().view(-1)
        t = self.threshold
        if budget and low_res is not None and input_size is not None:
            cells = low_res[: -(-input_size[0] // 4), : -(-input_size[1] // 4)].abs().flatten()
            k = int(2 * budget * cells.numel() / a.numel())
            if k < cells.numel():
                t = min(t, float(torch.kthvalue(cells.float(), k + 1).values))
        idx = _where_below(a, t)
        if t < self.threshold and len(idx) < budget:  # too low for this mask (a flat one): all of them
            idx = _where_below(a, self.threshold)
        if budget and len(idx) > budget:
            idx = idx[torch.topk(a[idx], budget, largest=False, sorted=False).indices]
        w = logits.shape[-1]
        return idx // w, idx % w

    def point_features(
        self,
        logits: torch.Tensor,
        low_res: torch.Tensor,
        image: RefinerImage,
        maps: Sequence[torch.Tensor],
        input_size: tuple[int, int],
        ys: torch.Tensor,
        xs: torch.Tensor,
        prompt: tuple[torch.Tensor | None, ...] = (None, None, None),
    ) -> torch.Tensor:
        """Features ``N x in_features`` of pixels ``(ys, xs)`` of one mask: its logits ``H x W`` in the original
        frame and low-res logits ``g x g`` (or a top-left part of them), ``maps`` the model's image maps
        ``1 x C x h x w`` over its padded input of side ``4 g`` (the decoder's stride-4 and stride-8
        high-resolution features and the embedding; the first on the g x g grid; with the last ones left out,
        their features are left out: :meth:`map_columns`), ``input_size`` the resized
        image's ``(h, w)`` in it, ``prompt`` its points, labels and box in the original frame
        (:meth:`RefinerPrompts.of_mask`). Their order: the coarse logit, the RGB patches (channel-major, step by
        step), the logit patches, the maps, per window the differences from the mean colours inside and outside
        and their squared norms, the colour likelihood ratios, the prompt's geometry."""
        n, hw, k = len(ys), tuple(logits.shape), len(_PATCH)
        # built feature by feature as rows (each part's natural layout: contiguous copies), returned transposed
        left_out = sum(self.map_channels) - sum(m.shape[1] for m in maps)
        ft = torch.empty(self.mlp[0].in_features - left_out, n, device=logits.device)
        # the RGB patches: one gather from the padded planes, normalised per channel
        wp = image.pixels.shape[-1]
        start = (ys + PIXEL_PAD) * wp + xs + PIXEL_PAD
        idx = (start + self.rgb_offsets[:, 0, None] * wp + self.rgb_offsets[:, 1, None]).view(-1)
        raw = image.pixels.view(3, -1).gather(1, idx[None].expand(3, -1)).float()  # (faster than index_select)
        rgb = torch.addcmul((-self.pixel_mean / self.pixel_std)[:, None], raw, (1 / self.pixel_std)[:, None])
        steps = len(RGB_STEPS)
        ft[0] = logits[ys, xs] / 8.0
        ft[1 : 1 + 3 * steps * k].view(steps, 3, k, n).copy_(rgb.view(3, steps, k, n).transpose(0, 1))
        at = 1 + 3 * steps * k
        patches = _gather(logits.reshape(-1), ys, xs, self.logit_offsets, hw)
        torch.div(patches, 8.0, out=ft[at : at + len(patches)])
        at += len(patches)
        g = maps[0].shape[-1]
        low_res = pad_by_edge(low_res.float(), (g, g))  # the top-left part of the grid (the generator's): the rest
        # pixel centres in the padded input frame, as grid_sample coordinates (the same for every map's grid)
        px, py, where = map_positions(ys, xs, input_size, hw, g)
        prob = torch.sigmoid(low_res.float())[None]

        def sample(m: torch.Tensor) -> torch.Tensor:  # C x h x w -> C x N, bilinear at the pixel centres
            return F.grid_sample(m[None].float(), where, mode="bilinear", align_corners=False)[0, :, 0]

        for m in maps:
            ft[at : at + m.shape[1]] = sample(m[0])
            at += m.shape[1]
        # per window, at each pixel: the means of colour x p and p, p the mask's probability on the grid, and
        # of colour; outside the mask the colour mean is (colour - colour x p) / (1 - p)
        # (computed on the part of the grid the pixels' windows reach: most masks' uncertain pixels are near them)
        rows, cols, where_part = _window_crop(px / 4 - 0.5, py / 4 - 0.5, g)
        part = prob[:, rows, cols]
        means = torch.cat(_box_means(torch.cat([image.grid[:, rows, cols] * part, part]), WINDOWS))
        weighted = F.grid_sample(means[None], where_part, mode="bilinear", align_corners=False)[0, :, 0]
        colour = sample(image.grid_means)
        pix = rgb.view(3, steps * k, n)[:, k // 2]  # the pixel itself: the first patch's centre
        for i in range(len(WINDOWS)):
            cp, p = weighted[4 * i : 4 * i + 3], weighted[4 * i + 3 : 4 * i + 4]
            d_in, d_out = ft[at : at + 3], ft[at + 3 : at + 6]
            torch.sub(pix, cp / p.clamp_min(1e-3), out=d_in)
            torch.sub(pix, (colour[3 * i : 3 * i + 3] - cp) / (1 - p).clamp_min(1e-3), out=d_out)
            torch.sum(d_in.square(), 0, out=ft[at + 6])
            torch.sum(d_out.square(), 0, out=ft[at + 7])
            at += 8
        centre = raw.view(3, steps * k, n)[:, k // 2]
        ft[at : at + N_COLOUR] = _colour_likelihoods(image, low_res, centre)
        at += N_COLOUR
        ft[at : at + N_GEOMETRY] = _prompt_geometry(ys, xs, hw, *prompt)
        return ft.T

    def map_columns(self, i: int) -> slice:
        """The features (columns of the MLP's first layer) of map ``i`` of :meth:`point_features`' ``maps``."""
        start = 1 + 3 * len(_PATCH) * len(RGB_STEPS) + len(_PATCH) * len(LOGIT_STEPS) + sum(self.map_channels[:i])
        return slice(start, start + self.map_channels[i])

    def refines(self, input_size: Sequence[int], original_size: Sequence[int]) -> bool:
        """Whether an image of ``original_size`` resized to ``input_size`` is within ``max_upscale``."""
        return max(input_size) <= self.max_upscale * max(original_size)

    def correct(self, features: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Refined logits ``N`` of pixels with features ``N x in_features`` and coarse logits ``N``."""
        return coarse + self.mlp(features).squeeze(-1)

    def refined(
        self,
        logits: torch.Tensor,
        low_res: torch.Tensor,
        image: RefinerImage,
        maps: Sequence[torch.Tensor],
        input_size: tuple[int, int],
        ys: torch.Tensor,
        xs: torch.Tensor,
        prompt: tuple[torch.Tensor | None, ...] = (None, None, None),
    ) -> torch.Tensor:
        """The refined logits ``N`` of pixels ``(ys, xs)`` of one mask (:meth:`point_features`' arguments)."""
        f = self.point_features(logits, low_res, image, maps, input_size, ys, xs, prompt)
        return self.correct(f, f[:, 0] * 8.0)

    def forward(
        self,
        logits: torch.Tensor,
        low_res: torch.Tensor,
        image: RefinerImage,
        maps: Sequence[torch.Tensor],
        input_size: tuple[int, int],
        prompts: RefinerPrompts | None = None,
        budget: int | None = None,
        answer_low_res: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float32 ``... x H x W`` logits in the original frame (their low-res logits ``... x g x g``, ``prompts``
        one row per mask, in the order of the flattened leading dimensions) with each mask's uncertain pixels
        refined, in place (the upsampled logits are the caller's own fresh tensor); at most ``budget`` of them a
        mask (:meth:`uncertain_pixels`). ``answer_low_res``: float32 low-res logits shaped as ``low_res`` (the
        caller's contiguous copy) into which each refined pixel's change is added (:func:`add_to_cells`), so that
        they stay the low-res logits of the refined answer. An image the model's input enlarges by more than
        ``max_upscale`` (``SamConfig.point_refiner_max_upscale``: zoom-in's crop around a small object, or a
        thumbnail) is left as it is: there the mask grid is already finer than the pixels, and a refiner trained on
        whole pictures only ruined such crops' masks (MODELS.md, "Zoom-in and the point refiner")."""
        if not self.refines(input_size, logits.shape[-2:]):
            return logits
        flat, low = logits.view(-1, *logits.shape[-2:]), low_res.reshape(-1, *low_res.shape[-2:])
        cells = None if answer_low_res is None else answer_low_res.view(-1, *low_res.shape[-2:])
        for m in range(flat.shape[0]):
            ys, xs = self.uncertain_pixels(flat[m], low[m], input_size, budget)
            if len(ys):
                prompt = prompts.of_mask(m, flat.shape[-2:], input_size) if prompts is not None else (None, None, None)
                new = self.refined(flat[m], low[m], image, maps, input_size, ys, xs, prompt)
                if cells is not None:
                    add_to_cells(cells[m], ys, xs, new - flat[m, ys, xs], input_size, tuple(flat.shape[-2:]))
                flat[m, ys, xs] = new
        return logits
