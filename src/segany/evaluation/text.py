"""Measuring text prompts.

* :func:`eval_categories`: for each held-out image and each category present, the text (the category's
  clean name) -> one mask, IoU against the union of that category's segments; and two prompt-blind
  references on the same images: ``blind`` = the automatic generator's top-ranked mask (chosen without
  the text, the same for every category of the image) and ``oracle`` = the automatic mask that best
  fits the target (an upper bound for any way of choosing among them); ``blind_largest`` = the largest
  automatic mask (a stronger blind choice for stuff such as sky or wall). The text is compared with the
  stronger of the two blind references.
* :func:`eval_synthetic`: held-out synthetic scenes, each attribute query in its canonical wording
  ("the red circle on the left"), IoU against the union of the shapes it names; per query kind.

Both read a *source* of text samples (``len(source)``, ``source.sample(i)`` -> image, queries, target masks
and ignore mask), e.g. :mod:`segany.training.text_data`'s ``CategoryTargets`` and ``SyntheticTargets``:
measuring depends on the samples' shape, not on the training code.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Protocol

import numpy as np

from segany.automatic import SamAutomaticMaskGenerator
from segany.evaluation.metrics import mask_iou
from segany.predictor import SamPredictor
from segany.text.phrases import attribute_phrase, category_phrase


class TextSource(Protocol):
    """Text samples: ``sample(i)`` has ``image`` (H x W x 3), ``queries`` (K), ``targets`` (K x H x W bool)
    and ``ignore`` (H x W bool)."""

    def __len__(self) -> int: ...

    def sample(self, index: int) -> Any: ...


def _blind_masks(generator: SamAutomaticMaskGenerator, image: np.ndarray) -> list[np.ndarray]:
    records = generator.generate(image)
    records.sort(key=lambda r: -float(r["predicted_iou"]))
    return [r["segmentation"] for r in records]


def eval_categories(
    predictor: SamPredictor,
    src: TextSource,
    max_images: int | None = None,
    blind: bool = True,
    points_per_side: int = 16,
) -> dict[str, Any]:
    """Text-to-mask mIoU on a source of category queries (e.g. ``CategoryTargets(root, split)``, a label-map
    folder's split), with the prompt-blind references."""
    n = len(src) if max_images is None else min(max_images, len(src))
    generator = None
    if blind:
        # thresholds off: the default model's IoU predictions are low, and the reference must always
        # have a mask to offer
        generator = SamAutomaticMaskGenerator(
            predictor.model, points_per_side=points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0
        )
    text_ious, blind_ious, largest_ious, oracle_ious = [], [], [], []
    t0 = time.time()
    for i in range(n):
        s = src.sample(i)
        predictor.set_image(s.image)
        auto = _blind_masks(generator, s.image) if generator is not None else []
        largest = max(auto, key=lambda m: int(m.sum())) if auto else None
        for q, target in zip(s.queries, s.targets):
            masks, _, _ = predictor.predict(text=category_phrase(q), multimask_output=False)
            text_ious.append(mask_iou(masks[0], target, s.ignore))
            if generator is not None:
                blind_ious.append(mask_iou(auto[0], target, s.ignore) if auto else 0.0)
                largest_ious.append(mask_iou(largest, target, s.ignore) if auto else 0.0)
                oracle_ious.append(max((mask_iou(m, target, s.ignore) for m in auto), default=0.0))
    out = {
        "images": n,
        "queries": len(text_ious),
        "text_miou": float(np.mean(text_ious)) if text_ious else float("nan"),
        "seconds": round(time.time() - t0, 1),
    }
    if generator is not None:
        out["blind_miou"] = float(np.mean(blind_ious)) if blind_ious else float("nan")
        out["blind_largest_miou"] = float(np.mean(largest_ious)) if largest_ious else float("nan")
        out["oracle_miou"] = float(np.mean(oracle_ious)) if oracle_ious else float("nan")
        stronger = max(out["blind_miou"], out["blind_largest_miou"])
        out["ratio_text_over_blind"] = out["text_miou"] / max(stronger, 1e-9)
    return out


def _kind(query: dict) -> str:
    return "+".join(k for k in ("color", "shape", "position") if k in query)


def eval_synthetic(predictor: SamPredictor, src: TextSource) -> dict[str, Any]:
    """mIoU of canonical attribute phrases on a source of attribute queries (e.g. ``SyntheticTargets`` of
    held-out scenes: seeds never used in training)."""
    n = len(src)
    per_kind: dict[str, list[float]] = defaultdict(list)
    t0 = time.time()
    for i in range(n):
        s = src.sample(i)
        predictor.set_image(s.image)
        for q, target in zip(s.queries, s.targets):
            masks, _, _ = predictor.predict(text=attribute_phrase(q), multimask_output=False)
            per_kind[_kind(q)].append(mask_iou(masks[0], target, s.ignore))
    every = [v for vs in per_kind.values() for v in vs]
    return {
        "scenes": n,
        "queries": len(every),
        "miou": float(np.mean(every)) if every else float("nan"),
        "by_kind": {k: {"queries": len(v), "miou": float(np.mean(v))} for k, v in sorted(per_kind.items())},
        "seconds": round(time.time() - t0, 1),
    }
