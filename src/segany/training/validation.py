"""Validation during training: the step loss on fixed prompts, and the click / box protocols of
:mod:`segany.evaluation` through a :class:`~segany.predictor.SamPredictor` on the model being trained."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from segany.training.config import TrainConfig
from segany.training.loader import collate_for_training, to_device
from segany.training.step import SamTrainStep


@torch.no_grad()
def validation_loss(
    step_module: SamTrainStep,
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    max_images: int,
    seed: int = 0,
) -> dict[str, float]:
    """Mean step loss (and IoUs) over the first ``max_images`` items, fixed prompts (``seed``)."""
    n = min(len(dataset), max_images)  # type: ignore[arg-type]
    if n == 0:
        return {}
    was = step_module.training
    step_module.eval()
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    torch.manual_seed(seed)
    sums: dict[str, float] = {}
    count = 0
    try:
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            out = step_module(to_device(collate_for_training(items), device))
            k = len(items)
            for key, v in out.items():
                sums[key] = sums.get(key, 0.0) + float(v) * k
            count += k
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        step_module.train(was)
    return {f"val_{k}": v / count for k, v in sums.items()}


@torch.no_grad()
def validate(
    step_module: SamTrainStep,
    val_dataset: Dataset,
    samples: Sequence[Any],
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Validation loss plus click mIoU@1 and box mIoU (segany.evaluation protocols) on ``samples``."""
    from segany.evaluation.protocols import run_box, run_clicks
    from segany.predictor import SamPredictor

    t0 = time.perf_counter()
    res: dict[str, Any] = validation_loss(step_module, val_dataset, device, cfg.batch_size, cfg.val_max_images)
    model = step_module.model
    was = step_module.training
    model.eval()
    try:
        pred = SamPredictor(model)
        clicks = run_clicks(pred, samples, max_clicks=cfg.val_max_clicks, max_objects_per_image=cfg.val_max_objects)
        boxes = run_box(pred, samples, max_objects_per_image=cfg.val_max_objects)
    finally:
        step_module.train(was)
    cs, bs = clicks.summary(), boxes.summary()
    res["val_click_miou1"] = cs.get("mIoU@1")
    res["val_box_miou"] = bs.get("mIoU")
    res["val_objects"] = cs.get("num_objects")
    res["val_seconds"] = round(time.perf_counter() - t0, 3)
    ok = [v for v in (res["val_click_miou1"], res["val_box_miou"]) if v is not None and math.isfinite(v)]
    res["val_mean_miou"] = float(np.mean(ok)) if ok else None
    return res


def metric_value(cfg: TrainConfig, val: dict[str, Any]) -> float | None:
    """``cfg.best_metric`` of a validation: higher is better (val_loss is negated); None when not available."""
    key = {
        "mean_miou": "val_mean_miou",
        "click_miou1": "val_click_miou1",
        "box_miou": "val_box_miou",
        "val_loss": "val_loss",
    }[cfg.best_metric]
    v = val.get(key)
    if v is None or not math.isfinite(v):
        return None
    return -float(v) if cfg.best_metric == "val_loss" else float(v)
