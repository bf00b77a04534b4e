"""Prompt simulation for SAM training (paper, section 3 "Training" and appendix A).

Everything here is batched over ``N`` masks and stays on the device (no host synchronisation): random
pixels are drawn as the arg-max of uniform noise over a region, so an empty region is reported by a
``found`` flag instead of a Python branch.

* The first prompt of each mask is, with equal probability, a point drawn uniformly from the mask (not
  from ignore pixels) or the mask's tight box with noise on each coordinate (std ``0.1 x`` the box side,
  clipped to ``+-20`` pixels).
* Each later point is drawn uniformly from the error region of the previous prediction (thresholded
  previous mask XOR ground truth, ignore and padding excluded): positive when it falls in a false
  negative, negative in a false positive. An empty error region yields a padding point (label -1).
* Optionally (``clicker_prob``), a point goes where the standard evaluation clicker puts it instead:
  :func:`clicker_points` (the deepest pixel of the largest error; the object's interior-most pixel for a
  first click): on the CPU the evaluation's own clicker, one mask at a time; on an accelerator a batched
  chessboard-distance approximation of it.
* :func:`iteration_schedule` lays out the iterations: the prompt iteration, 8 point iterations and 2
  mask-only iterations (one at a random place among the point iterations, one at the end) = 11.

Coordinates are ``(x, y)`` pixel indices in the model's input frame (the prompt encoder adds 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from segany.evaluation.clicks import next_click
from segany.utils.masks import batched_mask_to_box

#: Point labels (the prompt encoder's convention).
POSITIVE, NEGATIVE, PAD, BOX_TL, BOX_BR = 1, 0, -1, 2, 3

#: Iteration kinds in a schedule.
PROMPT, POINT, MASK_ONLY = "prompt", "point", "mask_only"


def iteration_schedule(
    num_iterations: int, num_mask_only: int | None = None, generator: torch.Generator | None = None
) -> list[str]:
    """Kinds of the decoder iterations for one batch: ``[PROMPT, POINT | MASK_ONLY, ...]``.

    With ``num_mask_only`` mask-only iterations (default: 2 when ``num_iterations >= 4``, 1 when it is
    3, else 0), one always comes last and the others go at random places among the point iterations
    (the paper: 11 = 1 + 8 + 2). ``generator`` is a CPU generator.
    """
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    if num_mask_only is None:
        num_mask_only = 2 if num_iterations >= 4 else (1 if num_iterations == 3 else 0)
    if not 0 <= num_mask_only <= num_iterations - 1:
        raise ValueError(f"num_mask_only must be in [0, {num_iterations - 1}], got {num_mask_only}")
    n_points = num_iterations - 1 - num_mask_only
    middle = [POINT] * n_points
    for _ in range(max(num_mask_only - 1, 0)):
        # a random slot among the point iterations (after at least one point when there are any)
        lo = 1 if n_points > 0 else 0
        pos = int(torch.randint(lo, len(middle) + 1, (1,), generator=generator))
        middle.insert(pos, MASK_ONLY)
    tail = [MASK_ONLY] if num_mask_only > 0 else []
    return [PROMPT] + middle + tail


def sample_uniform_points(
    regions: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pixel drawn uniformly from each region.

    Args:
        regions: ``N x H x W`` bool.
    Returns:
        ``coords`` ``N x 2`` float ``(x, y)`` (0 where the region is empty) and ``found`` ``N`` bool.
    """
    n, h, w = regions.shape
    flat = regions.reshape(n, h * w)
    # arg-max of iid uniforms over the region is a uniform draw from it
    noise = torch.rand(flat.shape, device=regions.device, generator=generator)
    noise = torch.where(flat, noise + 1.0, noise.new_zeros(()))
    idx = noise.argmax(dim=1)
    found = flat.any(dim=1)
    idx = torch.where(found, idx, torch.zeros_like(idx))
    coords = torch.stack([idx % w, torch.div(idx, w, rounding_mode="floor")], dim=1).to(torch.float32)
    return coords, found


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight ``N x 4`` float XYXY boxes of ``N x H x W`` bool masks, max inclusive; 0 for empty."""
    return batched_mask_to_box(masks).to(torch.float32)


def jitter_boxes(
    boxes: torch.Tensor,
    limits_hw: torch.Tensor,
    noise_std: float = 0.1,
    noise_max: float = 20.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SAM's box noise: each coordinate moves by ``N(0, (noise_std * side)^2)`` clipped to ``+-noise_max``.

    ``side`` is the box width for x coordinates and its height for y. The result is clipped to the image
    content (``limits_hw`` ``N x 2``: height, width) and kept ordered (``x0 <= x1``, ``y0 <= y1``).
    """
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)  # N x 2 (w, h)
    side = torch.cat([wh, wh], dim=1)
    noise = torch.randn(boxes.shape, device=boxes.device, generator=generator) * (noise_std * side)
    noise = noise.clamp(-noise_max, noise_max)
    out = boxes + noise
    hi = torch.stack([limits_hw[:, 1], limits_hw[:, 0]], dim=1).to(out.dtype) - 1  # (w-1, h-1)
    hi = torch.cat([hi, hi], dim=1).clamp(min=0)
    out = torch.minimum(out.clamp(min=0), hi)
    lo_xy = torch.minimum(out[:, :2], out[:, 2:])
    hi_xy = torch.maximum(out[:, :2], out[:, 2:])
    return torch.cat([lo_xy, hi_xy], dim=1)


@dataclass
class PromptSet:
    """The prompts of ``N`` masks, grouped so the prompt encoder sees exactly the inference layout.

    Rows ``[:num_box]`` started from a box, the rest from a point (the caller orders the masks so). The
    point rows send ``first_point`` + ``points`` (and the encoder's padding point); the box rows send
    ``points`` + ``boxes`` - the same tokens a :class:`~segany.predictor.SamPredictor` call would make.
    """

    num_box: int
    boxes: torch.Tensor  # num_box x 4
    first_point: torch.Tensor  # (N - num_box) x 2
    points: torch.Tensor  # N x K x 2 (the corrective points so far; K may be 0)
    labels: torch.Tensor  # N x K

    @property
    def num_masks(self) -> int:
        return self.points.shape[0]

    def add_points(self, coords: torch.Tensor, labels: torch.Tensor) -> PromptSet:
        """A new set with one more point per mask (``N x 2``, ``N``)."""
        return PromptSet(
            self.num_box,
            self.boxes,
            self.first_point,
            torch.cat([self.points, coords[:, None].to(self.points.dtype)], dim=1),
            torch.cat([self.labels, labels[:, None].to(self.labels.dtype)], dim=1),
        )

    def encoder_args(self) -> list[tuple[slice, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]]:
        """``[(rows, points, boxes)]`` for each non-empty group, to call the prompt encoder with."""
        out = []
        nb, n = self.num_box, self.num_masks
        if nb > 0:
            rows = slice(0, nb)
            pts = (self.points[rows], self.labels[rows]) if self.points.shape[1] > 0 else None
            out.append((rows, pts, self.boxes))
        if n > nb:
            rows = slice(nb, n)
            first_lab = self.labels.new_full((n - nb, 1), POSITIVE)
            coords = torch.cat([self.first_point[:, None], self.points[rows]], dim=1)
            labels = torch.cat([first_lab, self.labels[rows]], dim=1)
            out.append((rows, (coords, labels), None))
        return out


def initial_prompts(
    gt: torch.Tensor,
    valid: torch.Tensor,
    content_hw: torch.Tensor,
    num_box: int,
    box_noise_std: float = 0.1,
    box_noise_max: float = 20.0,
    generator: torch.Generator | None = None,
) -> PromptSet:
    """First prompts: boxes for rows ``[:num_box]``, a point inside the mask for the others.

    Args:
        gt: ``N x S x S`` bool ground truth; valid: ``N x S x S`` bool (not ignore, inside the content).
        content_hw: ``N x 2`` content height/width of each mask's image (boxes are clipped to it).
        num_box: how many leading rows start from a box (a host-side int: no synchronisation).
    """
    n = gt.shape[0]
    dev = gt.device
    boxes = gt.new_zeros((0, 4), dtype=torch.float32)
    if num_box > 0:
        boxes = jitter_boxes(
            masks_to_boxes(gt[:num_box]), content_hw[:num_box], box_noise_std, box_noise_max, generator
        )
    first = gt.new_zeros((0, 2), dtype=torch.float32)
    if n > num_box:
        g = gt[num_box:]
        inside, found = sample_uniform_points(g & valid[num_box:], generator)
        # a mask whose every pixel is ignored (should not happen): any pixel of it
        fallback, _ = sample_uniform_points(g, generator)
        first = torch.where(found[:, None], inside, fallback)
    return PromptSet(
        num_box,
        boxes,
        first,
        torch.zeros((n, 0, 2), device=dev),
        torch.zeros((n, 0), device=dev, dtype=torch.int64),
    )


def error_region_points(
    pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next corrective point of each mask: uniform over ``(pred XOR gt) & valid``.

    Returns ``coords`` ``N x 2`` and ``labels`` ``N`` (1 in a false negative, 0 in a false positive,
    -1 = padding point when there is no error left).
    """
    region = (pred != gt) & valid
    coords, found = sample_uniform_points(region, generator)
    n, h, w = gt.shape
    idx = (coords[:, 1].long() * w + coords[:, 0].long()).clamp(0, h * w - 1)
    on_object = gt.reshape(n, -1).gather(1, idx[:, None])[:, 0]
    labels = torch.where(on_object, POSITIVE, NEGATIVE)
    labels = torch.where(found, labels, torch.full_like(labels, PAD))
    coords = torch.where(found[:, None], coords, torch.zeros_like(coords))
    return coords, labels


def _erosion_depth(regions: torch.Tensor, max_depth: int) -> torch.Tensor:
    """``N x H x W`` bool -> float: how many 3x3 erosions each pixel survives (its chessboard distance to
    the nearest pixel outside its region, the image border counting as outside), capped at ``max_depth``."""
    x = regions[:, None].float()
    depth = torch.zeros_like(x)
    for i in range(max_depth):
        depth += x
        # erosion = not (dilation of the complement); the padding of 1 puts the border outside
        x = 1.0 - F.max_pool2d(F.pad(1.0 - x, (1, 1, 1, 1), value=1.0), 3, stride=1)
        if i % 4 == 3 and not bool(x.any()):  # a host sync: every few erosions only
            break
    return depth[:, 0]


def _deepest_points(regions: torch.Tensor, coarse_side: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Each region's approximately deepest pixel ``N x 2`` ``(x, y)`` and its depth ``N`` (0 = empty).

    The depth is found on a ``coarse_side`` grid whose cells lie wholly inside the region (min-pooled), in
    full-resolution pixels; regions at most two cells deep there are measured again at full resolution (the
    grid's rounding, up to a cell, would otherwise decide between a false-negative and a false-positive band
    of similar depth: ``benchmarks/batched_clicker.py`` measured the label agreeing with the exact clicker's
    for 75% of corrections without the second measurement, 100% with it).
    """
    n, h, w = regions.shape
    f = max(1, min(h, w) // coarse_side)
    coarse = -F.max_pool2d(-regions[:, None].float(), f, stride=f)[:, 0] > 0.5 if f > 1 else regions
    depth = _erosion_depth(coarse, (min(coarse.shape[-2:]) + 1) // 2)
    best, idx = depth.flatten(1).max(dim=1)
    cw = depth.shape[-1]
    coords = torch.stack([idx % cw, torch.div(idx, cw, rounding_mode="floor")], dim=1) * f + f // 2
    best = best * f
    thin = (best <= 2 * f) & regions.flatten(1).any(dim=1)
    if f > 1 and bool(thin.any()):
        rows = thin.nonzero()[:, 0]
        fine = _erosion_depth(regions.index_select(0, rows), 4 * f).flatten(1)
        fbest, fidx = fine.max(dim=1)
        best = best.index_copy(0, rows, fbest)
        coords = coords.index_copy(0, rows, torch.stack([fidx % w, torch.div(fidx, w, rounding_mode="floor")], 1))
    return coords.to(torch.float32), best


def clicker_points(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard clicker's next point for each mask (positive at the deepest false-negative pixel when
    the false negatives reach at least as deep as the false positives, else negative at the deepest false
    positive; an all-False ``pred`` asks for first clicks).

    On the CPU this is the evaluation's own :func:`segany.evaluation.clicks.next_click` (an exact
    distance transform, one mask at a time); on an accelerator, where copying every mask to the host
    would cost more than the rest of a training step, :func:`batched_clicker_points` approximates it.

    Args:
        pred, gt, valid: ``N x H x W`` bool.
    Returns:
        ``coords`` ``N x 2`` float ``(x, y)`` and ``labels`` ``N`` as :func:`error_region_points`.
    """
    if gt.device.type != "cpu":
        return batched_clicker_points(pred, gt, valid)
    pred_np, gt_np, ignore_np = pred.numpy(), gt.numpy(), (~valid).numpy()
    coords = torch.zeros((gt.shape[0], 2), dtype=torch.float32)
    labels = torch.full((gt.shape[0],), PAD, dtype=torch.int64)
    for i in range(gt.shape[0]):
        click = next_click(gt_np[i], pred_np[i], ignore_np[i])
        if click is not None:
            coords[i] = torch.tensor([click.x, click.y], dtype=torch.float32)
            labels[i] = POSITIVE if click.is_positive else NEGATIVE
    return coords, labels


def batched_clicker_points(
    pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`clicker_points` for all masks at once on their device: chessboard instead of Euclidean
    depth, measured on a grid of about 128 cells a side (shallow errors at full resolution)."""
    n = gt.shape[0]
    fn = gt & ~pred & valid
    fp = ~gt & pred & valid
    coords, depth = _deepest_points(torch.cat([fn, fp]))
    positive = depth[:n] >= depth[n:]
    coords = torch.where(positive[:, None], coords[:n], coords[n:])
    labels = torch.where(positive, POSITIVE, NEGATIVE)
    found = torch.maximum(depth[:n], depth[n:]) > 0
    labels = torch.where(found, labels, torch.full_like(labels, PAD))
    return torch.where(found[:, None], coords, torch.zeros_like(coords)), labels


def upsample_logits(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """``N x h x w`` low-res logits -> ``N x size x size`` (bilinear, as ``Sam.postprocess_masks``)."""
    return F.interpolate(low_res[:, None].float(), (size, size), mode="bilinear", align_corners=False)[:, 0]
