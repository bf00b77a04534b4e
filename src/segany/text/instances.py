"""One mask per object that a text names ("the people" -> each person), best first.

The text head answers a phrase with one mask: the union of everything the phrase names (it is trained
against that union). Instances are the connected parts of that mask (OpenCV), each scored by the mean
text probability over its pixels times the head's predicted IoU; parts smaller than
``MIN_AREA_FRACTION`` of the image (or 16 pixels) are dropped as noise. Objects that touch come out as
one instance: the default model's single-point masks are too weak to split them reliably (measured on
two separate red circles: point-grid candidates covered under 20% of a circle each, components 98%).

With a ``text_detector`` on the predictor, instances are the detector's boxes turned into masks instead.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from segany.errors import SegAnyError

MIN_AREA_FRACTION = 0.002


@torch.inference_mode()
def predict_instances(
    predictor, text: str, max_instances: int = 5, min_score: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """See :meth:`segany.predictor.SamPredictor.predict_instances`."""
    if not isinstance(max_instances, int) or isinstance(max_instances, bool) or max_instances < 1:
        raise SegAnyError(f"max_instances must be a positive integer, got {max_instances!r}")
    predictor._require_image()
    h, w = predictor.original_size
    if predictor.text_detector is not None:
        from segany.text.grounding import masks_from_detections

        dets = predictor.text_detector.detect(predictor.image_rgb, text, max_detections=max_instances)
        masks, scores = masks_from_detections(predictor, dets)
        keep = scores >= min_score
        return masks[keep][:max_instances], scores[keep][:max_instances]

    logits, iou, _ = predictor.predict(text=text, return_logits=True)
    prob = 1.0 / (1.0 + np.exp(-np.clip(logits[0], -50, 50)))
    mask = (logits[0] > predictor.model.mask_threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    min_area = max(16, MIN_AREA_FRACTION * h * w)
    masks, scores = [], []
    for k in range(1, n):
        if stats[k, cv2.CC_STAT_AREA] < min_area:
            continue
        part = labels == k
        score = float(prob[part].mean() * np.clip(iou[0], 0, 1))
        if score >= min_score:
            masks.append(part)
            scores.append(score)
    order = np.argsort(-np.asarray(scores, np.float32))[:max_instances]
    if len(order) == 0:
        return np.zeros((0, h, w), bool), np.zeros((0,), np.float32)
    return np.stack([masks[i] for i in order]), np.asarray(scores, np.float32)[order]


def predict_with_detector(
    predictor, text: str, point_coords, point_labels, box, mask_input, return_logits: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``predictor.predict(text=...)`` through the detector: its best box (with any points) -> one mask.

    With no detection the answer is one empty mask with a predicted IoU of 0.
    """
    if box is not None:
        raise SegAnyError("with a text detector, text replaces the box prompt: give text or a box, not both")
    dets = predictor.text_detector.detect(predictor.image_rgb, text, max_detections=1)
    if len(dets.scores) == 0:
        h, w = predictor.original_size
        side = predictor.model.prompt_encoder.mask_input_size
        empty = np.full((1, h, w), -np.inf if return_logits else False, np.float32 if return_logits else bool)
        return empty, np.zeros((1,), np.float32), np.full((1, *side), -1e4, np.float32)
    return predictor.predict(
        point_coords, point_labels, dets.boxes[0], mask_input, multimask_output=False, return_logits=return_logits
    )
