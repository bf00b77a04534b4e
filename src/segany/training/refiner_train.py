"""Training a model's point refiner (:class:`~segany.modeling.point_refiner.PointRefiner`) on its own masks, the
model frozen.

    segany train-refiner --config configs/point_refiner.yaml

Each image of the training folders (at its own resolution: the refiner's job is the detail the model's grid misses)
gets up to ``masks_per_image`` objects, each prompted as a user would: its box (``box_fraction`` of them) or
``min_clicks`` to ``max_clicks`` clicks (1-5 by default) of the standard clicker
(:func:`~segany.evaluation.protocols.click_object`), the kept mask being the one the clicker keeps;
``zoom_fraction`` of them are prompted through zoom-in (:class:`~segany.zoom_in.ZoomInPredictor`) and taken on the
crop they were answered on (a crop refiner's training: ``configs/point_refiner_zoom.yaml``). Of each mask,
``points_per_mask`` of its uncertain pixels and ``random_points`` anywhere become training points (features, coarse
logit, ground truth); every ``buffer_points`` points the refiner takes ``epochs_per_buffer`` passes of binary
cross-entropy over them in batches of ``batch_points``, its learning rate falling over the run (``lr_schedule``).
The result is the model's file with the refiner in it (``SamConfig.point_refiner``), written after every buffer;
``out_dir/last.pt`` (refiner, optimizer, images seen) lets a rerun resume. With ``second`` the refiner trained is
the model's second refiner (``SamConfig.second_refiner``), on its point refiner's answers
(``configs/second_refiner.yaml``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segany.checkpoint import load_model, save_model
from segany.errors import SegAnyError
from segany.evaluation.protocols import click_object
from segany.modeling.build import with_point_refiner, with_second_refiner
from segany.modeling.point_refiner import PointRefiner, RefinerImage, RefinerPrompts
from segany.predictor import SamPredictor
from segany.training.config import Options
from segany.training.label_folders import ImageDraws, check_train_data
from segany.training.run_files import resume_part_state, save_part_state
from segany.zoom_in import ZoomInPredictor


@dataclass
class RefinerTrainConfig(Options):
    """The point refiner's training options (``configs/point_refiner.yaml``)."""

    out_dir: str = "runs/refiner"  #: ``model.safetensors`` (the model with its refiner) and ``last.pt``
    base_model: str = "default"  #: the frozen model whose masks are refined (a refiner it has is replaced)
    hidden: int | None = None  #: the refiner MLP's width (None: as the base model's config says, 64 by default)
    #: the written model's ``point_refiner_max_upscale`` (None: as the base model's config says, 2 by default;
    #: ``.inf`` for a refiner trained on zoom-in's crops, which refines them however enlarged)
    max_upscale: float | None = None
    #: label-map folders: ``{root, split, weight}`` (weight: how often its images are drawn, relative)
    train_data: list[dict] = field(default_factory=list)
    images: int = 7000  #: images to train on
    masks_per_image: int = 3
    box_fraction: float = 0.3  #: masks prompted by the object's box rather than clicks
    #: masks prompted through zoom-in (the web tool's default), their points taken on the crop they were answered
    #: on, at its own resolution
    zoom_fraction: float = 0.0
    min_clicks: int = 1  #: clicked masks get this many clicks at least
    max_clicks: int = 5  #: and at most this many
    #: train the base model's second refiner (``SamConfig.second_refiner``) rather than its point refiner: the masks
    #: to refine are the base model's refined answers (its point refiner kept), the written file is the base model
    #: with the new second refiner (``configs/second_refiner.yaml``: answers to clicks 2-5, as it is applied)
    second: bool = False
    points_per_mask: int = 768  #: uncertain pixels drawn from each mask
    random_points: int = 128  #: pixels drawn anywhere in the image for each mask
    buffer_points: int = 262144
    batch_points: int = 4096
    epochs_per_buffer: int = 2
    lr: float = 1e-3
    #: ``cosine``: the learning rate falls from ``lr`` to 0 over the run's images (half a cosine), so the last
    #: buffers do not leave their own noise in the weights; ``constant``: ``lr`` throughout (the refiners shipped
    #: before the eighteenth session of 2026-12-06, with 16,384-point buffers)
    lr_schedule: str = "cosine"
    weight_decay: float = 1e-4
    min_object_area: int = 100
    seed: int = 0
    half: bool = True  #: the model file in fp16, as the shipped one (``last.pt`` keeps the refiner in fp32)
    num_threads: int | None = None
    log_every: int = 50  #: images between progress lines

    def validate(self) -> None:
        check_train_data(self.train_data)
        for name in ("images", "masks_per_image", "min_clicks", "points_per_mask", "buffer_points", "batch_points"):
            if getattr(self, name) < 1:
                raise SegAnyError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_clicks < self.min_clicks:
            raise SegAnyError(f"max_clicks must be at least min_clicks ({self.min_clicks}), got {self.max_clicks}")
        if self.second and (self.hidden is not None or self.max_upscale is not None or self.zoom_fraction):
            raise SegAnyError("second: a second refiner is the point refiner's width and limit, on whole images: "
                              "leave out hidden, max_upscale and zoom_fraction")
        if self.hidden is not None and self.hidden < 1:
            raise SegAnyError(f"hidden must be at least 1, got {self.hidden}")
        if self.max_upscale is not None and not self.max_upscale >= 1:
            raise SegAnyError(f"max_upscale must be at least 1 (.inf: no limit), got {self.max_upscale}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise SegAnyError(f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        for name in ("box_fraction", "zoom_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SegAnyError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class ClickRecorder:
    """A predictor for :func:`click_object` that keeps the logits and the clicks of every answer it gives; the masks
    it gives the clicker are cut where the predictor cuts them (a refined first answer at
    ``SamConfig.first_prompt_threshold``), so the next click lands where it would for a user."""

    def __init__(self, predictor: SamPredictor | ZoomInPredictor) -> None:
        self.predictor, self.answers = predictor, []

    def predict(self, **kwargs: Any):
        logits, scores, low_res = self.predictor.predict(return_logits=True, **kwargs)
        mask_input = kwargs.get("mask_input")
        self.answers.append((logits, scores, low_res, kwargs["point_coords"], kwargs["point_labels"], mask_input))
        # zoom-in's wrapped predictor holds the picture the answer was refined on
        held = self.predictor.predictor if isinstance(self.predictor, ZoomInPredictor) else self.predictor
        return logits > held.answer_threshold(first_prompt=mask_input is None), scores, low_res

    def kept(self, click: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The logits and low-res logits of the mask kept after ``click`` clicks (the last answer if the clicker
        stopped earlier: click 1's highest-scored candidate, later clicks' only one) and its clicks' coordinates
        ``K x 2`` and labels ``K``."""
        logits, scores, low_res, coords, labels, _ = self.answers[min(click, len(self.answers)) - 1]
        i = int(np.argmax(scores)) if click == 1 else 0
        return logits[i], low_res[i], coords, labels

    def corrections(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The prompt of every answer given with a mask input (the clicks after the first), as the clicker sent it:
        the clicks ``K x 2`` (pixels), their labels ``K`` and the mask input ``1 x s x s``."""
        return [(coords, labels, mask) for *_, coords, labels, mask in self.answers if mask is not None]


def _prompt_object(
    predictor: SamPredictor | ZoomInPredictor, gt: np.ndarray, ignore: np.ndarray | None, box_fraction: float,
    max_clicks: int, min_clicks: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The object ``gt`` prompted by its box or by ``min_clicks`` to ``max_clicks`` clicks of the standard clicker:
    the kept mask's logits ``H x W`` and low-res logits, and its clicks ``K x 2``, labels ``K`` or box ``4``
    (pixels)."""
    if random.random() < box_fraction:
        ys, xs = np.nonzero(gt)
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)
        m, _, low = predictor.predict(box=box, multimask_output=False, return_logits=True)
        return m[0], low[0], None, None, box
    recorder = ClickRecorder(predictor)
    clicks = random.randint(min_clicks, max_clicks)
    click_object(recorder, gt, ignore, clicks)
    logits, low, coords, labels = recorder.kept(clicks)
    return logits, low, coords, labels, None


def _input_prompts(
    predictor: SamPredictor, coords: np.ndarray | None, labels: np.ndarray | None, box: np.ndarray | None
) -> RefinerPrompts:
    """Clicks or a box (pixels of the image set on ``predictor``) in the model's input frame."""
    size = predictor.original_size
    if box is not None:
        return RefinerPrompts(boxes=torch.as_tensor(predictor.transform.apply_boxes(box[None], size)).float())
    points = torch.as_tensor(predictor.transform.apply_coords(coords, size)).float()[None]
    return RefinerPrompts(points, torch.as_tensor(labels)[None])


def prompted_mask(
    predictor: SamPredictor, gt: np.ndarray, ignore: np.ndarray | None, box_fraction: float, max_clicks: int,
    min_clicks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, RefinerPrompts]:
    """One training mask of the image set on ``predictor``: logits ``H x W``, low-res logits and its prompt (in
    the model's input frame), for the object ``gt`` prompted by its box or by ``min_clicks`` to ``max_clicks``
    clicks of the standard clicker."""
    logits, low, coords, labels, box = _prompt_object(predictor, gt, ignore, box_fraction, max_clicks, min_clicks)
    prompts = _input_prompts(predictor, coords, labels, box)
    return torch.from_numpy(logits).float(), torch.from_numpy(low).float(), prompts


def zoomed_mask(
    zoom: ZoomInPredictor, gt: np.ndarray, ignore: np.ndarray | None, box_fraction: float, max_clicks: int,
    min_clicks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, RefinerPrompts, tuple[slice, slice]]:
    """As :func:`prompted_mask`, through zoom-in (the web tool's default): the kept mask on the crop it was
    predicted on (which ``zoom``'s predictor then holds), and that crop's rows and columns of the image."""
    logits, low, coords, labels, box = _prompt_object(zoom, gt, ignore, box_fraction, max_clicks, min_clicks)
    x0, y0, x1, y1 = zoom.last_crop
    shift = np.array([x0, y0], np.float32)
    coords = None if coords is None else coords - shift
    box = None if box is None else box - np.tile(shift, 2)
    prompts = _input_prompts(zoom.predictor, coords, labels, box)
    crop_logits = torch.from_numpy(np.ascontiguousarray(logits[y0:y1, x0:x1])).float()
    return crop_logits, torch.from_numpy(low).float(), prompts, (slice(y0, y1), slice(x0, x1))


def _image_inputs(predictor: SamPredictor, image: np.ndarray) -> tuple[RefinerImage, list[torch.Tensor]]:
    """What the refiner reads of the image set on ``predictor`` (a model without a refiner): the pixels and
    the input on the mask grid, and the model's maps (high-resolution features, embedding)."""
    x = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)[None].float()
    model = predictor.model
    pixels = torch.from_numpy(np.array(image))
    mean, std = model.pixel_mean, model.pixel_std
    refiner_image = RefinerImage.of(pixels, model.preprocess(x), predictor.input_size, mean, std)
    return refiner_image, [*predictor.decoder_inputs["high_res_features"], predictor.features]


def _sample_points(logits: torch.Tensor, refiner: PointRefiner, cfg: RefinerTrainConfig, rng: np.random.Generator):
    """Training pixels of one mask: ``points_per_mask`` of its uncertain ones and ``random_points`` anywhere."""
    ys, xs = torch.nonzero(logits.abs() < refiner.threshold, as_tuple=True)
    if len(ys) > cfg.points_per_mask:
        sel = torch.from_numpy(rng.choice(len(ys), cfg.points_per_mask, replace=False))
        ys, xs = ys[sel], xs[sel]
    h, w = logits.shape
    ys = torch.cat([ys, torch.from_numpy(rng.integers(0, h, cfg.random_points))])
    xs = torch.cat([xs, torch.from_numpy(rng.integers(0, w, cfg.random_points))])
    return ys, xs


def fit_points(
    correct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    coarse: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch: int,
    lr_at: Callable[[float], float] | None = None,
) -> list[tuple[float, float, float, float]]:
    """``epochs`` passes of binary cross-entropy over points (features ``N x F``, coarse logits ``N``, targets
    ``N`` in {0, 1}) in shuffled batches, ``correct(features, coarse)`` giving the refined logits; per step the
    loss, the unrefined loss, and the refined and unrefined pixel accuracy. ``lr_at``: the learning rate of each
    step from the fraction of these passes done before it (None: the optimizer's own)."""
    stats = []
    starts = range(0, max(1, len(y) - batch + 1), batch)
    for epoch in range(epochs):
        perm = torch.randperm(len(y))
        for k, j in enumerate(starts):
            if lr_at is not None:
                for group in opt.param_groups:
                    group["lr"] = lr_at((epoch * len(starts) + k) / (epochs * len(starts)))
            i = perm[j : j + batch]
            z = correct(x[i], coarse[i])
            loss = F.binary_cross_entropy_with_logits(z, y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            before = F.binary_cross_entropy_with_logits(coarse[i], y[i]).item()
            accuracy = [((logits > 0).float() == y[i]).float().mean().item() for logits in (z, coarse[i])]
            stats.append((loss.item(), before, *accuracy))
    return stats


def _learning_rate(cfg: RefinerTrainConfig, images: float) -> float:
    """The learning rate after ``images`` of the run's images (a fraction: part of a buffer's passes)."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(images, cfg.images) / cfg.images))


def _buffer_schedule(cfg: RefinerTrainConfig, before: int, after: int) -> Callable[[float], float]:
    """The learning rate through the passes over a buffer of the points of images ``before`` to ``after``:
    the run's schedule between them."""
    return lambda done: _learning_rate(cfg, before + (after - before) * done)


def train_point_refiner(cfg: RefinerTrainConfig, progress: bool = True) -> Path:
    """Train the refiner of ``cfg.base_model``; returns the written model file (``out_dir/model.safetensors``)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = load_model(cfg.base_model, text_head=None)
    if not getattr(base.config, "high_res_features", False):
        raise SegAnyError(f"{cfg.base_model}: a point refiner needs a model with high_res_features (segany's default)")
    if cfg.second:  # the masks to refine are the point refiner's answers
        if not getattr(base.config, "point_refiner", False):
            raise SegAnyError(f"{cfg.base_model}: a second refiner refines a point refiner's answers: it has none")
        base = with_second_refiner(base, None)
    else:  # the masks to refine are the model's own
        base = with_point_refiner(base, None, max_upscale=cfg.max_upscale)
    predictor = SamPredictor(base)
    zoom = ZoomInPredictor(SamPredictor(base))  # its own predictor: the whole image's stays set for the others
    torch.manual_seed(cfg.seed)
    if cfg.second:
        refiner = with_second_refiner(base, "new").second_refiner.train()
    else:
        refiner = with_point_refiner(base, "new", cfg.hidden).point_refiner.train()
    attach = with_second_refiner if cfg.second else with_point_refiner  # where the trained refiner goes in the file
    opt = torch.optim.AdamW(refiner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    last = out_dir / "last.pt"
    images, steps = resume_part_state(last, "refiner", refiner, opt, progress)
    fitted = images  # the images whose points the refiner has taken passes over
    random.seed(cfg.seed + images)  # a resumed run goes on with other draws, not the first ones again
    torch.manual_seed(cfg.seed + images)
    rng = np.random.default_rng(cfg.seed + images)
    draws = ImageDraws(cfg.train_data, cfg.min_object_area)
    out = out_dir / "model.safetensors"
    buf: list[tuple[torch.Tensor, ...]] = []
    start, hist = time.time(), []
    while images < cfg.images:
        sample, objects = draws.draw()
        images += 1
        with torch.no_grad():
            predictor.set_image(sample.image)
            whole = _image_inputs(predictor, sample.image)
            for _, gt, ignore, _ in random.sample(objects, min(cfg.masks_per_image, len(objects))):
                if cfg.zoom_fraction and random.random() < cfg.zoom_fraction:  # from the whole image, as a user
                    zoom.set_embedding(
                        predictor.get_image_embedding(), predictor.original_size, sample.image,
                        predictor.input_size, predictor.get_decoder_inputs(),
                    )
                    logits, low, prompts, (rows, cols) = zoomed_mask(
                        zoom, gt, ignore, cfg.box_fraction, cfg.max_clicks, cfg.min_clicks
                    )
                    held, gt = zoom.predictor, np.ascontiguousarray(gt[rows, cols])
                    ignore = None if ignore is None else np.ascontiguousarray(ignore[rows, cols])
                    if zoom.last_crop == zoom.full_box:  # answered on the whole image: its inputs are read already
                        image, maps = whole
                    else:
                        image, maps = _image_inputs(held, np.ascontiguousarray(sample.image[rows, cols]))
                else:
                    logits, low, prompts = prompted_mask(
                        predictor, gt, ignore, cfg.box_fraction, cfg.max_clicks, cfg.min_clicks
                    )
                    (image, maps), held = whole, predictor
                ys, xs = _sample_points(logits, refiner, cfg, rng)
                keep = torch.ones(len(ys), dtype=torch.bool) if ignore is None else ~torch.from_numpy(ignore)[ys, xs]
                prompt = prompts.of_mask(0, logits.shape, held.input_size)
                f = refiner.point_features(logits, low, image, maps, held.input_size, ys, xs, prompt)
                buf.append((f[keep], logits[ys, xs][keep], torch.from_numpy(gt)[ys, xs].float()[keep]))
        if sum(len(b[2]) for b in buf) < cfg.buffer_points and images < cfg.images:
            continue
        x, coarse, y = (torch.cat(t) for t in zip(*buf))
        buf = []
        lr_at = _buffer_schedule(cfg, fitted, images)
        fitted = images
        stats = fit_points(refiner.correct, opt, x, coarse, y, cfg.epochs_per_buffer, cfg.batch_points, lr_at)
        steps += len(stats)
        hist += stats
        save_model(attach(base, refiner), out, half=cfg.half)
        save_part_state(last, "refiner", refiner, opt, images, steps)
        if progress and hist:
            h = np.array(hist[-40:]).mean(0)
            print(f"{time.time() - start:6.0f}s images {images}/{cfg.images} steps {steps} loss {h[0]:.4f} "
                  f"(unrefined {h[1]:.4f}) pixel accuracy {h[2]:.4f}", flush=True)
    return out
