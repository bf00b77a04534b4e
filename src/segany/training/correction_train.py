"""Training a model's correction decoder (``SamConfig.correction_decoder``) on its own clicks, the rest frozen.

    segany train-correction --config configs/correction_decoder.yaml

The correction decoder answers every prompt with a mask input (the clicks after the first). ``segany train``
taught it on the decoder's own coarse low-res masks as mask inputs, while the product sends it the refined
answer the user saw (the point refiners' changes in its low-res logits, ``SamPredictor.predict``). Here each
training image is clicked through the whole product (:class:`~segany.predictor.SamPredictor` with its refiners,
the standard clicker of :func:`~segany.evaluation.protocols.click_object`, ``min_clicks`` to ``max_clicks``
clicks on up to ``masks_per_image`` objects), and every answer to a click after the first becomes a training
prompt: the clicks and the mask input exactly as the product made them, the object as the target (SAM's focal,
dice and IoU losses on the low-res grid). The decoder being trained makes the clicks, so the prompts follow it
as it learns. Every ``images_per_step`` images the decoder takes one AdamW step (linear warm-up, then the rate
falls along half a cosine to 0 at ``images``). The result is the model's file with the new correction decoder,
written every ``save_every`` images and at the end; ``out_dir/last.pt`` (decoder, optimizer, images seen) lets a
rerun resume. With ``zoom_fraction`` that share of the objects is clicked through zoom-in
(:class:`~segany.zoom_in.ZoomInPredictor`, the web tool's default), each answer with a mask input (the first
click's answer again on its crop, and every later click) trained on the crop it was answered on, as it was asked;
with ``keep_first_answers`` that first prompt's target is the base model's own answer to it, not the object.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segany.checkpoint import load_model, save_model
from segany.errors import SegAnyError
from segany.evaluation.protocols import click_object
from segany.predictor import SamPredictor
from segany.training.config import Options
from segany.training.label_folders import ImageDraws, check_train_data
from segany.training.losses import LossConfig, sam_mask_loss
from segany.training.optim import warmup_cosine_factor
from segany.training.refiner_train import ClickRecorder
from segany.training.run_files import resume_part_state, save_part_state
from segany.training.trainer import hold_skip_mask_at_zero
from segany.zoom_in import ZoomInPredictor


@dataclass
class CorrectionTrainConfig(Options):
    """The correction decoder's training options (``configs/correction_decoder.yaml``)."""

    out_dir: str = "runs/correction"  #: ``model.safetensors`` (the model with the new decoder) and ``last.pt``
    base_model: str = "default"  #: the model whose correction decoder is trained (everything else frozen)
    #: label-map folders: ``{root, split, weight}`` (weight: how often its images are drawn, relative)
    train_data: list[dict] = field(default_factory=list)
    images: int = 1600  #: images to train on
    masks_per_image: int = 3
    min_clicks: int = 2  #: each object gets this many clicks at least (the first is not trained: no mask input)
    max_clicks: int = 10  #: and at most this many
    images_per_step: int = 2  #: images whose prompts make one optimizer step
    lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    focal_weight: float = 2.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    #: keep the skip's weights on the previous mask at zero (the shipped decoder's: its skip reads the clicks and
    #: the box only, MODELS.md "Correction decoders with the first prompt kept harder"); for a base model whose
    #: correction decoder has ``mask_skip_prompts``
    skip_without_mask: bool = True
    #: objects clicked through zoom-in, their prompts with a mask input trained on the crops they were answered on
    zoom_fraction: float = 0.0
    #: zoom-in's first click answered again on its crop learns the base model's correction decoder's answer to it
    #: rather than the object: the first answers stay as they were while the later clicks learn
    keep_first_answers: bool = False
    bf16: bool = True  #: the decoder's forward under bf16 autocast (the loss in float32)
    min_object_area: int = 100
    seed: int = 0
    half: bool = True  #: the model file in fp16, as the shipped one (``last.pt`` keeps the decoder in fp32)
    num_threads: int | None = None
    log_every: int = 50  #: images between progress lines
    save_every: int = 200  #: images between the model file's writes

    def validate(self) -> None:
        check_train_data(self.train_data)
        for name in ("images", "masks_per_image", "images_per_step", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise SegAnyError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.min_clicks < 2:
            raise SegAnyError(f"min_clicks must be at least 2 (a first click has no mask input), got {self.min_clicks}")
        if self.max_clicks < self.min_clicks:
            raise SegAnyError(f"max_clicks must be at least min_clicks ({self.min_clicks}), got {self.max_clicks}")
        if self.save_every % self.images_per_step:
            raise SegAnyError(f"save_every must be a multiple of images_per_step ({self.images_per_step})")
        if not self.lr > 0:
            raise SegAnyError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.zoom_fraction <= 1.0:
            raise SegAnyError(f"zoom_fraction must be in [0, 1], got {self.zoom_fraction}")
        if self.keep_first_answers and not self.zoom_fraction:
            raise SegAnyError("keep_first_answers keeps zoom-in's first answers: it needs zoom_fraction above 0")


def low_res_targets(
    predictor: SamPredictor, gts: np.ndarray, ignores: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Objects ``N x H x W`` (bool, the image set on ``predictor``) and their ignore maps -> the targets and the
    pixels that count, ``N x s x s`` bool on the model's low-res grid (resized into the input frame, padded, area
    means over 0.5; the padding never counts)."""
    size, (h, w) = predictor.model.image_size, predictor.input_size
    side = predictor.model.prompt_encoder.mask_input_size[0]

    def grid(maps: np.ndarray) -> torch.Tensor:
        x = F.interpolate(torch.from_numpy(maps).float()[:, None], (h, w), mode="bilinear", align_corners=False)
        return F.interpolate(F.pad(x, (0, size - w, 0, size - h)), (side, side), mode="area")[:, 0] > 0.5

    return grid(gts), grid(~ignores)


def correction_loss(
    predictor: SamPredictor,
    prompts: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]],
    gt: torch.Tensor,
    valid: torch.Tensor,
    loss: LossConfig,
    bf16: bool = True,
    teacher: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """The summed loss of the correction decoder's answers to ``prompts`` (clicks, labels, mask input and the
    row of ``gt`` / ``valid``, the low-res targets, of the object) on the image set on ``predictor``, with
    gradient to the decoder alone; and each answer's low-res IoU. Prompts with as many clicks go as one batch.
    ``teacher``: a decoder whose answers (above 0) are the targets instead of ``gt``."""
    model = predictor.model  # the model at this image's grid (the given model's weights)
    decoder = model.correction_decoder
    emb = predictor.features.clone()  # out of inference mode: autograd may save them
    inputs = {k: [t.clone() for t in v] for k, v in predictor.decoder_inputs.items()}
    pe = model.prompt_encoder.get_dense_pe().clone()
    region = model.decoder_region(predictor.input_size)
    if region is not None:
        inputs["region"] = region
    groups: dict[int, list] = {}
    for p in prompts:
        groups.setdefault(len(p[1]), []).append(p)
    total, ious = torch.zeros(()), []
    decoder.train()  # the plain modules (the fast paths are inference-only)
    try:
        for group in groups.values():
            coords = np.stack([predictor.transform.apply_coords(p[0], predictor.original_size) for p in group])
            points = (torch.as_tensor(coords).float(), torch.as_tensor(np.stack([p[1] for p in group])).int())
            masks = torch.as_tensor(np.stack([p[2] for p in group])).float()
            rows = torch.as_tensor([p[3] for p in group])
            with torch.no_grad():
                sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=masks)
                extra = model.prompt_inputs(masks, points, None)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                low, iou = decoder(emb, pe, sparse, dense, multimask_output=False, **inputs, **extra)
            target = gt[rows]
            if teacher is not None:
                with torch.no_grad():  # in eval mode: the fast path inference answers with, in float32
                    target = teacher(emb, pe, sparse, dense, multimask_output=False, **inputs, **extra)[0][:, 0] > 0
            out = sam_mask_loss(low.float(), iou.float(), target, valid[rows], loss)
            total = total + out["loss"].sum()
            ious += out["iou"].tolist()
    finally:
        decoder.eval()
    return total, ious


class PromptTap(SamPredictor):
    """A predictor that keeps the prompt of its last answer: zoom-in's wrapped predictor, whose prompts are in the
    frame of the crop it holds."""

    last_prompt: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None] = (None, None, None)

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.last_prompt = (point_coords, point_labels, mask_input)
        return super().predict(point_coords, point_labels, box, mask_input, *args, **kwargs)


class ZoomCorrections(ClickRecorder):
    """A predictor for :func:`click_object` that clicks the object ``gt`` (``H x W`` bool, ``ignore`` its pixels
    that do not count) through ``zoom`` (around a :class:`PromptTap`) and takes the correction decoder's loss on
    each answer given with a mask input, on the crop it was answered on (with gradient to the decoder); the first
    clicks' (zoom-in's first answer asked again on its crop) against ``first_teacher``'s answer, if given."""

    def __init__(
        self, zoom: ZoomInPredictor, gt: np.ndarray, ignore: np.ndarray, loss: LossConfig, bf16: bool = True,
        first_teacher: torch.nn.Module | None = None,
    ) -> None:
        super().__init__(zoom)
        self.gt, self.ignore, self.loss, self.bf16, self.first_teacher = gt, ignore, loss, bf16, first_teacher
        self.losses: list[torch.Tensor] = []
        self.ious: list[float] = []

    def predict(self, **kwargs: Any):
        out = super().predict(**kwargs)
        tap = self.predictor.predictor
        coords, labels, mask = tap.last_prompt
        if mask is not None:
            x0, y0, x1, y1 = self.predictor.last_crop
            gt, valid = low_res_targets(tap, self.gt[None, y0:y1, x0:x1], self.ignore[None, y0:y1, x0:x1])
            teacher = self.first_teacher if len(labels) <= self.predictor.skip_clicks else None
            with torch.enable_grad():
                loss, ious = correction_loss(tap, [(coords, labels, mask, 0)], gt, valid, self.loss, self.bf16, teacher)
            self.losses.append(loss)
            self.ious += ious
        return out


def train_correction_decoder(cfg: CorrectionTrainConfig, progress: bool = True) -> Path:
    """Train the correction decoder of ``cfg.base_model``; returns the written model file
    (``out_dir/model.safetensors``)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.base_model, text_head=None)
    decoder = getattr(model, "correction_decoder", None)
    if decoder is None:
        raise SegAnyError(f"{cfg.base_model}: no correction decoder to train (SamConfig.correction_decoder)")
    model.requires_grad_(False)
    teacher = copy.deepcopy(decoder).eval() if cfg.keep_first_answers else None  # the base model's, frozen
    decoder.requires_grad_(True)
    if cfg.skip_without_mask:
        hold_skip_mask_at_zero(decoder)
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    last, out = out_dir / "last.pt", out_dir / "model.safetensors"
    images, steps = resume_part_state(last, "decoder", decoder, opt, progress)
    random.seed(cfg.seed + images)  # a resumed run goes on with other draws, not the first ones again
    torch.manual_seed(cfg.seed + images)
    draws = ImageDraws(cfg.train_data, cfg.min_object_area)
    predictor = SamPredictor(model)
    zoom = ZoomInPredictor(PromptTap(model))  # its own predictor: the whole image's stays set for the others
    loss_cfg = LossConfig(cfg.focal_weight, cfg.dice_weight, cfg.iou_weight)
    start, hist = time.time(), []
    opt.zero_grad()
    while images < cfg.images:
        sample, objects = draws.draw()
        chosen = random.sample(objects, min(cfg.masks_per_image, len(objects)))
        prompts, zoomed = [], []
        with torch.no_grad():
            predictor.set_image(sample.image)
            for row, (_, gt, ignore, _) in enumerate(chosen):
                clicks = random.randint(cfg.min_clicks, cfg.max_clicks)
                if cfg.zoom_fraction and random.random() < cfg.zoom_fraction:  # from the whole image, as a user
                    zoom.set_embedding(
                        predictor.get_image_embedding(), predictor.original_size, sample.image, predictor.input_size,
                        predictor.get_decoder_inputs(), predictor.get_refiner_image(),
                    )
                    zoomed.append(ZoomCorrections(zoom, gt, ignore, loss_cfg, cfg.bf16, teacher))
                    click_object(zoomed[-1], gt, ignore, clicks)
                    continue
                recorder = ClickRecorder(predictor)
                click_object(recorder, gt, ignore, clicks)
                prompts += [(*p, row) for p in recorder.corrections()]
        images += 1
        losses = [loss for z in zoomed for loss in z.losses]
        ious = [iou for z in zoomed for iou in z.ious]
        if prompts:
            gt, valid = low_res_targets(predictor, np.stack([o[1] for o in chosen]), np.stack([o[2] for o in chosen]))
            loss, plain = correction_loss(predictor, prompts, gt, valid, loss_cfg, cfg.bf16)
            losses.append(loss)
            ious += plain
        if ious:  # none where the first clicks left no error to click
            loss = torch.stack(losses).sum()
            (loss / len(ious)).backward()  # a step's gradient: the sum of its images' mean losses
            hist.append((loss.item() / len(ious), float(np.mean(ious))))
        if images % cfg.images_per_step == 0 or images >= cfg.images:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * warmup_cosine_factor(steps, cfg.images // cfg.images_per_step, cfg.warmup_steps)
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad()
            steps += 1
            if images % cfg.save_every == 0 or images >= cfg.images:
                save_model(model, out, half=cfg.half)
                save_part_state(last, "decoder", decoder, opt, images, steps)
        if progress and hist and images % cfg.log_every == 0:
            h = np.array(hist[-cfg.log_every :]).mean(0)
            print(f"{time.time() - start:6.0f}s images {images}/{cfg.images} steps {steps} loss {h[0]:.4f} "
                  f"low-res IoU {h[1]:.4f}", flush=True)
    if not out.is_file():  # a run resumed at its end
        save_model(model, out, half=cfg.half)
    return out
