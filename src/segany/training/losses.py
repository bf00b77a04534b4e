"""SAM's training losses: ``20 x focal + 1 x dice`` on masks plus the MSE of the IoU prediction.

All functions work per mask (``N x ...`` in, ``N`` or ``N x M`` out) with a ``valid`` map: ignore and
padding pixels leave every term (focal mean, dice sums and the IoU target alike). They compute in
float32 whatever the autocast dtype of the logits.

Resolution (``loss_resolution``): the paper computes the loss on the upsampled masks. ``"low_res"``
(default) instead compares the decoder's ``4h x 4w`` logits (256 x 256 for a 1024 model) with the
ground truth downsampled by area averaging and thresholded at 0.5: 16x fewer pixels per mask and
iteration, which is what makes 11 iterations x dozens of masks per image affordable. What it gives up:
the full masks are a bilinear upsampling of these logits, so the logits' magnitudes place a boundary
inside a grid cell, and a loss on thresholded cells teaches only which side of it the cell lies on
(``benchmarks/resolution_ceiling.py`` bounds the default model's DAVIS / COCO IoU at 0.90 / 0.93 with
boundaries placed within cells, 0.87 / 0.87 with cells only inside or outside). ``"full"`` upsamples the
logits to ``S x S`` (bilinear, like ``postprocess_masks``) and uses the full-resolution ground truth, as
in the paper; ``"<k>x"`` (e.g. ``"2x"``) does the same at k times the low-res side, a middle way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def loss_side(resolution: str, low_res_side: int, input_side: int) -> int:
    """The side of the square the mask loss compares at, for ``loss_resolution`` (module docstring)."""
    if resolution == "low_res":
        return low_res_side
    if resolution == "full":
        return input_side
    return min(input_side, low_res_side * int(resolution[:-1]))


def downsample_targets(
    gt: torch.Tensor, valid: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``N x S x S`` bool gt / valid -> ``N x h x w`` bool at ``size`` (area average > 0.5)."""
    if tuple(gt.shape[-2:]) == tuple(size):
        return gt, valid
    g = F.interpolate(gt[:, None].float(), size, mode="area")[:, 0] > 0.5
    v = F.interpolate(valid[:, None].float(), size, mode="area")[:, 0] > 0.5
    return g, v


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``N x H x W`` -> broadcastable against ``N x M x H x W`` (or itself for 3-D ``like``)."""
    return t[:, None] if like.ndim == 4 else t


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Mean focal loss over the valid pixels of each mask.

    Args:
        logits: ``N x H x W`` or ``N x M x H x W``; targets, valid: ``N x H x W`` bool.
        alpha: weight of the positives (``1 - alpha`` for negatives); < 0 disables it.
    Returns:
        ``N`` or ``N x M``.
    """
    x = logits.float()
    t = _expand(targets, x).to(x.dtype)
    v = _expand(valid, x).to(x.dtype)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t.expand_as(x), reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return (loss * v).sum(dim=(-2, -1)) / v.sum(dim=(-2, -1)).clamp(min=1.0)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` over the valid pixels of each mask (soft dice)."""
    x = logits.float()
    t = _expand(targets, x).to(x.dtype)
    v = _expand(valid, x).to(x.dtype)
    p = torch.sigmoid(x) * v
    t = t * v
    num = 2 * (p * t).sum(dim=(-2, -1)) + 1
    den = p.sum(dim=(-2, -1)) + t.sum(dim=(-2, -1)) + 1
    return 1 - num / den


@torch.no_grad()
def mask_iou(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU of ``logits > threshold`` with the targets over the valid pixels (1 when both are empty)."""
    pred = logits > threshold
    t = _expand(targets, pred)
    v = _expand(valid, pred)
    inter = (pred & t & v).sum(dim=(-2, -1)).float()
    union = ((pred | t) & v).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(union))


@dataclass
class LossConfig:
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    iou_loss_on: str = "all"  # multimask: IoU-MSE on "all" masks or only the "best"
    iou_rank_weight: float = 0.0  # multimask: cross-entropy of the predicted IoUs against the truly best mask


#: the predicted IoUs are divided by this before the ranking cross-entropy: a 0.05 lead is one logit
IOU_RANK_TEMPERATURE = 0.05


def sam_mask_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    gt: torch.Tensor,
    valid: torch.Tensor,
    cfg: LossConfig | None = None,
) -> dict[str, torch.Tensor]:
    """Per-mask SAM loss of one decoder iteration.

    Args:
        logits: ``N x M x h x w`` (M = 1, or 3 for a multimask iteration) at the loss resolution.
        iou_pred: ``N x M``; gt, valid: ``N x h x w`` bool.
    Returns:
        ``loss``, ``focal``, ``dice``, ``iou_mse`` (each ``N``, the weighted total in ``loss``), ``best``
        (``N`` index of the output with the lowest ``focal_weight * focal + dice_weight * dice``: with
        several outputs only that one is trained, SAM's answer to ambiguity) and ``iou`` (``N`` actual
        IoU of the best output).
    """
    cfg = cfg or LossConfig()
    focal = sigmoid_focal_loss(logits, gt, valid, cfg.focal_alpha, cfg.focal_gamma)  # N x M
    dice = dice_loss(logits, gt, valid)
    actual = mask_iou(logits, gt, valid)  # N x M, no grad
    mse = (iou_pred.float() - actual) ** 2
    mask_term = cfg.focal_weight * focal + cfg.dice_weight * dice
    best = mask_term.detach().argmin(dim=1)
    pick = best[:, None]
    mask_best = mask_term.gather(1, pick)[:, 0]
    mse_term = mse.mean(dim=1) if cfg.iou_loss_on == "all" else mse.gather(1, pick)[:, 0]
    if cfg.iou_rank_weight > 0 and iou_pred.shape[1] > 1:
        # the choice predict() makes among ambiguous masks (the highest predicted IoU), trained directly
        rank = F.cross_entropy(iou_pred.float() / IOU_RANK_TEMPERATURE, actual.argmax(dim=1), reduction="none")
    else:
        rank = torch.zeros_like(mse_term)
    return {
        "loss": mask_best + cfg.iou_weight * mse_term + cfg.iou_rank_weight * rank,
        "iou_rank": rank,
        "focal": focal.gather(1, pick)[:, 0],
        "dice": dice.gather(1, pick)[:, 0],
        "iou_mse": mse_term,
        "best": best,
        "iou": actual.gather(1, pick)[:, 0],
    }
