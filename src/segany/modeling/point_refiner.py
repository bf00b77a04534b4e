"""PointRefiner: corrects a mask's upsampled logits near its edge at the image's own resolution (not in SAM).

SAM draws its masks on a grid of stride 4 of its input and upsamples them bilinearly, so on a photo larger than
the input an edge can be off by several pixels. After the upsampling, a small MLP (PointRend-style) takes the
most uncertain pixels of each mask (``|logit| < threshold``, at most ``budget`` of them) and corrects each one's
logit from what lies there: the coarse logit, a 5 x 5 RGB patch of the original image around it, two 5 x 5 patches
of the logits (2 and 6 pixels apart), the model's maps at the pixel (the decoder's stride-4 and stride-8
high-resolution features and the image embedding, bilinearly), and the pixel's colour against the mean colours
inside and outside the mask around it (3- and 7-cell windows of the mask grid, from the low-res logits and the
model's input averaged onto that grid). Its last layer starts at zero, so an untrained refiner changes nothing.
It is trained on a frozen model's masks (:mod:`segany.training.refiner_train`); MODELS.md measures it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# 5 x 5 patch offsets, row-major
_PATCH = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
RGB_STEPS = (1,)  #: pixels between the samples of each RGB patch
LOGIT_STEPS = (2, 6)  #: pixels between the samples of each logit patch
PIXEL_PAD = 2 * max(RGB_STEPS)  #: the stored pixels' margin (edges replicated): no RGB patch reaches past it
WINDOWS = (3, 7)  #: mask-grid cells on a side of the windows of the inside / outside mean colours


@dataclass
class RefinerImage:
    """What the refiner reads of one image besides the masks (:meth:`of`): its pixels in the original frame,
    uint8 RGB planes with a margin of ``PIXEL_PAD`` (edges replicated) ``3 x (H + 2 pad) x (W + 2 pad)``, the
    model's normalised input averaged onto the mask grid ``3 x g x g``, and that grid's means over each of
    ``WINDOWS`` (``3 len(WINDOWS) x g x g``)."""

    pixels: torch.Tensor
    grid: torch.Tensor
    grid_means: torch.Tensor

    @classmethod
    def of(cls, image: torch.Tensor, x: torch.Tensor) -> RefinerImage:
        """From the image ``H x W x 3`` uint8 RGB and the model's preprocessed input ``1 x 3 x S x S``."""
        h, w = image.shape[:2]  # edges replicated by index (F.pad's replicate mode takes floats only)
        rows = torch.arange(-PIXEL_PAD, h + PIXEL_PAD, device=image.device).clamp_(0, h - 1)
        cols = torch.arange(-PIXEL_PAD, w + PIXEL_PAD, device=image.device).clamp_(0, w - 1)
        planes = image.permute(2, 0, 1).index_select(1, rows).index_select(2, cols)
        grid = F.avg_pool2d(x[:1].float(), 4)[0]
        return cls(planes, grid, torch.cat(_box_means(grid, WINDOWS)))

    def to(self, device: torch.device) -> RefinerImage:
        return RefinerImage(self.pixels.to(device), self.grid.to(device), self.grid_means.to(device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pixels, self.grid, self.grid_means))


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


def _gather(flat: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, offsets: torch.Tensor, hw: tuple[int, int]):
    """``flat[(y + dy) * W + (x + dx)]`` for every offset ``K`` and pixel ``N`` (clamped to the image, i.e. edges
    replicated): ``K x N`` of ``flat`` ``H * W``."""
    h, w = hw
    yy = (ys + offsets[:, 0, None]).clamp_(0, h - 1)
    xx = (xs + offsets[:, 1, None]).clamp_(0, w - 1)
    return flat.index_select(0, (yy * w + xx).view(-1)).view(offsets.shape[0], len(ys))


class PointRefiner(nn.Module):
    """A per-pixel MLP ``in_features -> hidden -> hidden -> 1`` that adds a correction to the logits of a mask's
    uncertain pixels. Built by :func:`~segany.modeling.build.build_sam` for ``SamConfig.point_refiner``."""

    def __init__(
        self,
        map_channels: Sequence[int],
        hidden: int = 64,
        threshold: float = 6.0,
        budget: int = 2048,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
    ) -> None:
        super().__init__()
        self.threshold = threshold
        self.budget = budget
        n = len(_PATCH)
        in_features = 1 + 3 * n * len(RGB_STEPS) + n * len(LOGIT_STEPS) + sum(map_channels) + 8 * len(WINDOWS)
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
        self, logits: torch.Tensor, low_res: torch.Tensor | None = None, input_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and columns of the pixels of ``H x W`` logits to refine: ``|logit| < threshold``, the most
        uncertain ``budget`` of them (0: all). With the low-res logits ``g x g`` and the resized image's size in
        the model's input, a lower threshold taken from them (about twice the budget: the upsampling is bilinear,
        so the image's pixels follow the grid's cells) spares a top-k over all the uncertain pixels; where it
        keeps fewer than the budget, all are searched."""
        a = logits.abs().view(-1)
        t = self.threshold
        if self.budget and low_res is not None and input_size is not None:
            cells = low_res[: -(-input_size[0] // 4), : -(-input_size[1] // 4)].abs().flatten()
            k = int(2 * self.budget * cells.numel() / a.numel())
            if k < cells.numel():
                t = min(t, float(torch.kthvalue(cells.float(), k + 1).values))
        idx = torch.nonzero(a < t).flatten()
        if t < self.threshold and len(idx) < self.budget:  # too low for this mask (a flat one): all of them
            idx = torch.nonzero(a < self.threshold).flatten()
        if self.budget and len(idx) > self.budget:
            idx = idx[torch.topk(a[idx], self.budget, largest=False, sorted=False).indices]
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
    ) -> torch.Tensor:
        """Features ``N x in_features`` of pixels ``(ys, xs)`` of one mask: its logits ``H x W`` in the original
        frame and low-res logits ``g x g`` (or a top-left part of them), ``maps`` the model's image maps
        ``1 x C x h x w`` over its padded input of side ``4 g`` (the decoder's stride-4 and stride-8
        high-resolution features and the embedding; the first on the g x g grid), ``input_size`` the resized
        image's ``(h, w)`` in it. Their order: the coarse logit, the RGB patches (channel-major, step by step),
        the logit patches, the maps, and per window the differences from the mean colours inside and outside
        and their squared norms."""
        n, hw, k = len(ys), tuple(logits.shape), len(_PATCH)
        # built feature by feature as rows (each part's natural layout: contiguous copies), returned transposed
        ft = torch.empty(self.mlp[0].in_features, n, device=logits.device)
        # the RGB patches: one gather from the padded planes, normalised per channel
        wp = image.pixels.shape[-1]
        start = (ys + PIXEL_PAD) * wp + xs + PIXEL_PAD
        idx = (start + self.rgb_offsets[:, 0, None] * wp + self.rgb_offsets[:, 1, None]).view(-1)
        rgb = image.pixels.view(3, -1).gather(1, idx[None].expand(3, -1)).float()  # (faster than index_select)
        rgb = torch.addcmul((-self.pixel_mean / self.pixel_std)[:, None], rgb, (1 / self.pixel_std)[:, None])
        steps = len(RGB_STEPS)
        ft[0] = logits[ys, xs] / 8.0
        ft[1 : 1 + 3 * steps * k].view(steps, 3, k, n).copy_(rgb.view(3, steps, k, n).transpose(0, 1))
        at = 1 + 3 * steps * k
        patches = _gather(logits.reshape(-1), ys, xs, self.logit_offsets, hw)
        torch.div(patches, 8.0, out=ft[at : at + len(patches)])
        at += len(patches)
        # pixel centres in the padded input frame, as grid_sample coordinates (the same for every map's grid)
        g = maps[0].shape[-1]
        if tuple(low_res.shape[-2:]) != (g, g):  # a fast decoder's top-left part of the grid: the rest as its edge
            pad = (0, g - low_res.shape[-1], 0, g - low_res.shape[-2])
            low_res = F.pad(low_res[None, None].float(), pad, mode="replicate")[0, 0]
        px = (xs.float() + 0.5) * (input_size[1] / hw[1])
        py = (ys.float() + 0.5) * (input_size[0] / hw[0])
        where = (torch.stack([px, py], 1) / (2 * g) - 1)[None, None]
        prob = torch.sigmoid(low_res.float())[None]

        def sample(m: torch.Tensor) -> torch.Tensor:  # C x h x w -> C x N, bilinear at the pixel centres
            return F.grid_sample(m[None].float(), where, mode="bilinear", align_corners=False)[0, :, 0]

        for m in maps:
            ft[at : at + m.shape[1]] = sample(m[0])
            at += m.shape[1]
        # per window, at each pixel: the means of colour x p and p, p the mask's probability on the grid, and
        # of colour; outside the mask the colour mean is (colour - colour x p) / (1 - p)
        weighted = sample(torch.cat(_box_means(torch.cat([image.grid * prob, prob]), WINDOWS)))
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
        return ft.T

    def correct(self, features: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Refined logits ``N`` of pixels with features ``N x in_features`` and coarse logits ``N``."""
        return coarse + self.mlp(features).squeeze(-1)

    def forward(
        self,
        logits: torch.Tensor,
        low_res: torch.Tensor,
        image: RefinerImage,
        maps: Sequence[torch.Tensor],
        input_size: tuple[int, int],
    ) -> torch.Tensor:
        """Float32 ``... x H x W`` logits in the original frame (their low-res logits ``... x g x g``) with each
        mask's uncertain pixels refined, in place (the upsampled logits are the caller's own fresh tensor)."""
        flat, low = logits.view(-1, *logits.shape[-2:]), low_res.reshape(-1, *low_res.shape[-2:])
        for m in range(flat.shape[0]):
            ys, xs = self.uncertain_pixels(flat[m], low[m], input_size)
            if len(ys):
                f = self.point_features(flat[m], low[m], image, maps, input_size, ys, xs)
                flat[m, ys, xs] = self.correct(f, f[:, 0] * 8.0)
        return logits
