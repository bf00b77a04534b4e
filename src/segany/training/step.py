"""One SAM training step as a module (so DDP sees a single forward and backward).

A batch of images (:func:`segany.training.loader.collate_for_training`): every image is encoded once (or
its cached embedding is used), all valid masks of all images form one decoder batch, prompts are
simulated for ``num_iterations`` decoder iterations (:mod:`segany.training.prompts`; with ``max_free_clicks``
up to that many corrective clicks are first decoded without gradient, RITM-style) and the loss is
``20 focal + 1 dice + 1 IoU-MSE`` (:mod:`segany.training.losses`) averaged over masks and iterations.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from segany.errors import SegAnyError
from segany.training.config import TrainConfig
from segany.training.distributed import autocast
from segany.training.embeddings_cache import encoder_input
from segany.training.losses import LossConfig, downsample_targets, loss_side, sam_mask_loss
from segany.training.prompts import (
    POINT,
    POSITIVE,
    PromptSet,
    clicker_points,
    error_region_points,
    initial_prompts,
    iteration_schedule,
    upsample_logits,
)


@dataclass
class StepOptions:
    num_iterations: int = 11
    num_mask_only_iterations: int | None = None
    box_prob: float = 0.5
    box_noise_std: float = 0.1
    box_noise_max: float = 20.0
    clicker_prob: float = 0.0
    max_free_clicks: int = 0
    loss_resolution: str = "low_res"
    loss: LossConfig = field(default_factory=LossConfig)
    autocast_dtype: torch.dtype | None = None  # bf16 autocast for encoder + decoder, None = fp32
    channels_last: bool = False
    first_prompt_distill: float = 0.0  # see TrainConfig.first_prompt_distill

    @classmethod
    def from_config(cls, cfg: TrainConfig, autocast_dtype: torch.dtype | None) -> StepOptions:
        return cls(
            num_iterations=cfg.num_iterations,
            num_mask_only_iterations=cfg.num_mask_only_iterations,
            box_prob=cfg.box_prob,
            box_noise_std=cfg.box_noise_std,
            box_noise_max=cfg.box_noise_max,
            clicker_prob=cfg.clicker_prob,
            max_free_clicks=cfg.max_free_clicks,
            loss_resolution=cfg.loss_resolution,
            loss=LossConfig(
                cfg.focal_weight,
                cfg.dice_weight,
                cfg.iou_weight,
                cfg.focal_alpha,
                cfg.focal_gamma,
                cfg.iou_loss_on,
                cfg.iou_rank_weight,
            ),
            autocast_dtype=autocast_dtype,
            channels_last=cfg.channels_last,
            first_prompt_distill=cfg.first_prompt_distill,
        )


def content_masks(valid_hw: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """``B x S x S`` bool: True inside each image's content (top-left ``valid_hw``)."""
    r = torch.arange(size, device=device)
    vh = valid_hw[:, 0].to(device)
    vw = valid_hw[:, 1].to(device)
    return (r[None, :, None] < vh[:, None, None]) & (r[None, None, :] < vw[:, None, None])


def first_prompt_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model``'s mask decoder as it is now (a run's start, before any resume), for
    :class:`SamTrainStep`'s ``teacher``. It stays in training mode, as the student: a mask decoder has no
    dropout or batch norm, and the inference-only fast paths, which do not follow autocast, stay off."""
    teacher = copy.deepcopy(model.mask_decoder).train()
    teacher.requires_grad_(False)
    return teacher


class SamTrainStep(nn.Module):
    """``forward(batch) -> {"loss", "focal", "dice", "iou_mse", "iou_first", "iou_last"}`` (scalars; and
    ``"distill"`` with a ``teacher``).

    ``batch`` is :func:`~segany.training.loader.collate_for_training`'s output on the device.
    Randomness comes from torch's default generators (the trainer reseeds them per step from
    ``(seed, rank, step)``); the host-side draws (which masks start from a box, the iteration schedule)
    use the CPU generator, so a step needs no device -> host copy.

    ``teacher``: a frozen mask decoder (the start's, :func:`first_prompt_teacher`) whose answers to the
    first prompt are that prompt's targets, with weight ``options.first_prompt_distill``, instead of the
    ground truth.
    """

    def __init__(
        self,
        model: nn.Module,
        options: StepOptions,
        freeze_image_encoder: bool = False,
        teacher: nn.Module | None = None,
    ):
        super().__init__()
        self.model = model
        self.opt = options
        self.freeze_image_encoder = freeze_image_encoder
        self._touch = [p for p in model.prompt_encoder.parameters() if p.requires_grad]
        if (teacher is None) != (options.first_prompt_distill <= 0):
            raise ValueError("a teacher goes with first_prompt_distill > 0, and only with it")
        self._teacher = [teacher] if teacher is not None else []  # a list: not a submodule, never trained

    def train(self, mode: bool = True) -> SamTrainStep:
        super().train(mode)
        if self.freeze_image_encoder:
            self.model.image_encoder.eval()  # frozen: no BN statistics updates, no drop path
        return self

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        return autocast(device, self.opt.autocast_dtype)

    def _clicker_rows(self, n: int, device: torch.device) -> torch.Tensor:
        """Indices of the rows whose next click the standard clicker places (drawn on the host)."""
        if self.opt.clicker_prob <= 0:
            return torch.zeros(0, dtype=torch.int64, device=device)
        return (torch.rand(n) < self.opt.clicker_prob).nonzero()[:, 0].to(device)

    def embed_images(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The images' embeddings ``B x C x h x w`` and the decoder's high-resolution features (the
        projected stride-4 / stride-8 maps; an empty list for a decoder without them)."""
        model = self.model
        if "embedding" in batch:
            if model.decoder_input_names:
                raise SegAnyError("cached embeddings hold no high-resolution features: train without the cache")
            return batch["embedding"].float(), []
        x = encoder_input(model, batch["image"], batch["valid_hw"])
        if self.opt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.is_grad_enabled() and not self.freeze_image_encoder
        with torch.set_grad_enabled(grad), self._autocast(x.device):
            out = model.image_encoder(x)
        with self._autocast(x.device):  # the projections are the decoder's: trained with it
            emb, inputs = model.split_encoder_output(out)
        return emb.float(), [f.float() for f in inputs.get("high_res_features") or []]

    def _encode_prompts(
        self, prompts: PromptSet, mask_input: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Sparse and dense prompt embeddings of every mask, and the decoder's other per-prompt inputs
        (:meth:`~segany.modeling.sam.Sam.prompt_inputs`); ``encoder_args``' row groups keep the masks' order."""
        pe = self.model.prompt_encoder
        sparse, dense, extra = [], [], []
        # fp32: the Fourier features of coordinates lose their precision in bf16
        with torch.autocast(device_type=prompts.points.device.type, enabled=False):
            for rows, pts, boxes in prompts.encoder_args():
                masks = mask_input[rows] if mask_input is not None else None
                s, d = pe(points=pts, boxes=boxes, masks=masks)
                sparse.append(s)
                dense.append(d)
                extra.append(self.model.prompt_inputs(masks, pts, boxes))
        if len(sparse) == 1:
            return sparse[0], dense[0], extra[0]
        return torch.cat(sparse), torch.cat(dense), {k: torch.cat([e[k] for e in extra]) for k in extra[0]}

    def _distill(
        self, low_res: torch.Tensor, iou_pred: torch.Tensor, inputs: tuple, high_m: dict
    ) -> torch.Tensor:
        """Per mask: the KL divergence of every first-prompt mask's pixel probabilities (logits ``low_res``,
        ``N x M x h x w``) from the teacher's, plus the squared error of the IoUs ``iou_pred`` against the
        teacher's (no mask input at the first prompt): 0 while the student answers as the teacher."""
        with torch.no_grad(), self._autocast(low_res.device):
            t_low, t_iou = self._teacher[0].predict_masks(*inputs, **high_m)[:2]
        t_low = t_low.float()
        target = torch.sigmoid(t_low)
        bce = F.binary_cross_entropy_with_logits(low_res.float(), target, reduction="none")
        entropy = F.binary_cross_entropy_with_logits(t_low, target, reduction="none")  # the KL's constant part
        return (bce - entropy).flatten(1).mean(1) + (iou_pred.float() - t_iou.float()).pow(2).mean(1)

    def _next_points(
        self, prompts: PromptSet, pred_full: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor
    ) -> PromptSet:
        """``prompts`` plus one corrective click per mask in the error of ``pred_full`` (``N x S x S`` bool)."""
        coords, labels = error_region_points(pred_full, gt, valid)
        rows = self._clicker_rows(gt.shape[0], gt.device)
        if len(rows):
            c, lab = clicker_points(pred_full[rows], gt[rows], valid[rows])
            coords, labels = coords.index_copy(0, rows, c), labels.index_copy(0, rows, lab)
        return prompts.add_points(coords, labels)

    @torch.no_grad()
    def _free_clicks(
        self,
        prompts: PromptSet,
        mask_input: torch.Tensor,
        emb: torch.Tensor,
        image_pe: torch.Tensor,
        gt: torch.Tensor,
        valid: torch.Tensor,
        high_res: dict[str, list[torch.Tensor]],
    ) -> tuple[PromptSet, torch.Tensor]:
        """A random ``0..max_free_clicks`` corrective clicks decoded with no gradient (RITM's trick)."""
        count = int(torch.randint(0, self.opt.max_free_clicks + 1, (1,)))
        for _ in range(count):
            pred_full = upsample_logits(mask_input[:, 0], gt.shape[-1]) > 0
            prompts = self._next_points(prompts, pred_full, gt, valid)
            sparse, dense, extra = self._encode_prompts(prompts, mask_input)
            with self._autocast(gt.device):
                low_res, _ = self.model.decoder_for(True)(
                    emb, image_pe, sparse, dense, multimask_output=False, **high_res, **extra
                )
            mask_input = low_res.float()
        return prompts, mask_input

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        opt = self.opt
        model = self.model
        gt_all = batch["gt_masks"]
        dev = gt_all.device
        n = gt_all.shape[0]
        size = gt_all.shape[-1]

        # host-side draws: which masks start from a box, and the iteration schedule
        perm = torch.randperm(n)
        num_box = int((torch.rand(n) < opt.box_prob).sum())
        schedule = iteration_schedule(opt.num_iterations, opt.num_mask_only_iterations)
        perm_d = perm.to(dev, non_blocking=True)
        gt = gt_all.index_select(0, perm_d)
        img_idx = batch["mask_image"].index_select(0, perm_d)
        weight = batch["mask_weight"].index_select(0, perm_d).float()

        emb, high_res = self.embed_images(batch)  # B x C x h x w, [B x C/8 x 4h x 4w, B x C/4 x 2h x 2w]
        content = content_masks(batch["valid_hw"], size, dev)
        valid = (content & ~batch["ignore"]).index_select(0, img_idx)  # N x S x S
        content_hw = batch["valid_hw"].to(dev).index_select(0, img_idx)
        emb_m = emb.index_select(0, img_idx)
        # the decoder's keyword for the high-resolution features, per mask (none without them)
        high_m = {"high_res_features": [f.index_select(0, img_idx) for f in high_res]} if high_res else {}
        image_pe = model.prompt_encoder.get_dense_pe()
        side = loss_side(opt.loss_resolution, 4 * emb.shape[-1], size)
        gt_l, valid_l = downsample_targets(gt, valid, (side, side))  # gt and valid themselves when full

        prompts = initial_prompts(gt, valid, content_hw, num_box, opt.box_noise_std, opt.box_noise_max)
        if opt.clicker_prob > 0 and n > num_box:
            rows = self._clicker_rows(n - num_box, dev)
            if len(rows):
                g = gt[num_box:].index_select(0, rows)
                coords, labels = clicker_points(torch.zeros_like(g), g, valid[num_box:].index_select(0, rows))
                coords = torch.where((labels == POSITIVE)[:, None], coords, prompts.first_point.index_select(0, rows))
                prompts.first_point.index_copy_(0, rows, coords)
        mask_input: torch.Tensor | None = None
        pred_full: torch.Tensor | None = None
        keys = ("loss", "focal", "dice", "iou_mse") + (("distill",) if self._teacher else ())
        keys += ("iou_rank",) if opt.loss.iou_rank_weight > 0 else ()
        sums = {k: torch.zeros((), device=dev) for k in keys}
        ious = []
        for k, kind in enumerate(schedule):
            if kind == POINT:
                assert pred_full is not None
                prompts = self._next_points(prompts, pred_full, gt, valid)
            sparse, dense, extra = self._encode_prompts(prompts, mask_input)
            with self._autocast(dev):
                if k == 0:
                    # A lone point is ambiguous: 3 masks, loss on the best. A box is not: it trains the
                    # single-output token, which is what predict(box=..., multimask_output=False) uses.
                    low_res, iou_pred = model.mask_decoder.predict_masks(
                        emb_m, image_pe, sparse, dense, **high_m, **extra
                    )[:2]
                    if self._teacher:
                        distill = self._distill(low_res, iou_pred, (emb_m, image_pe, sparse, dense), high_m)
                    single, multi = low_res[:, :1], low_res[:, 1:]
                    is_box = (torch.arange(n, device=dev) < prompts.num_box)[:, None]
                    low_res = torch.where(is_box[:, :, None, None], single.expand_as(multi), multi)
                    iou_pred = torch.where(is_box, iou_pred[:, :1].expand_as(iou_pred[:, 1:]), iou_pred[:, 1:])
                else:
                    low_res, iou_pred = model.decoder_for(True)(
                        emb_m, image_pe, sparse, dense, multimask_output=False, **high_m, **extra
                    )
            logits = (
                low_res
                if side == low_res.shape[-1]
                else upsample_logits(low_res.flatten(0, 1), side).view(*low_res.shape[:2], side, side)
            )
            out = sam_mask_loss(logits, iou_pred, gt_l, valid_l, opt.loss)
            if k == 0 and self._teacher:  # the first prompt learns the teacher's answer
                out = {**out, "loss": opt.first_prompt_distill * distill, "distill": distill}
            elif self._teacher:
                out = {**out, "distill": torch.zeros_like(out["loss"])}
            for key in sums:
                sums[key] = sums[key] + (out[key] * weight).sum()
            ious.append(out["iou"])
            chosen = low_res.gather(1, out["best"][:, None, None, None].expand(-1, 1, *low_res.shape[-2:]))
            mask_input = chosen.detach().float()  # N x 1 x h x w, fed back as the mask prompt
            if k == 0 and opt.max_free_clicks > 0 and len(schedule) > 1:
                high_free = {name: [f.detach() for f in v] for name, v in high_m.items()}
                prompts, mask_input = self._free_clicks(
                    prompts, mask_input, emb_m.detach(), image_pe, gt, valid, high_free
                )
            if k + 1 < len(schedule) and schedule[k + 1] == POINT:
                with torch.no_grad():
                    pred_full = upsample_logits(mask_input[:, 0], size) > 0
        denom = weight.sum().clamp(min=1.0) * len(schedule)
        res = {key: v / denom for key, v in sums.items()}
        # every prompt-encoder parameter takes part in every step (DDP needs that; no-op numerically)
        if self._touch:
            res["loss"] = res["loss"] + 0.0 * sum(p.reshape(-1)[0] for p in self._touch)
        wsum = weight.sum().clamp(min=1.0)
        res["iou_first"] = (ious[0] * weight).sum() / wsum
        res["iou_last"] = (ious[-1] * weight).sum() / wsum
        return res
