"""``segany segment``: one image, point/box prompts -> mask PNG(s), overlay PNG and a JSON record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segany.errors import SegAnyError


def check_prompts_in_image(
    points: list[tuple[tuple[float, float], int]], box: tuple[float, float, float, float] | None, h: int, w: int
) -> None:
    """Points and boxes must lie inside the ``w x h`` image (pixel coordinates, x right, y down)."""
    for (x, y), label in points:
        if not (0 <= x < w and 0 <= y < h):
            kind = "point" if label == 1 else "negative point"
            raise SegAnyError(f"{kind} {x:g},{y:g} is outside the image ({w}x{h}: x in [0,{w}), y in [0,{h}))")
    if box is not None:
        x0, y0, x1, y1 = box
        if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
            raise SegAnyError(f"box {x0:g},{y0:g},{x1:g},{y1:g} lies outside the image ({w}x{h})")


def segment_image(
    image_path: Path,
    points: list[tuple[tuple[float, float], int]],
    box: tuple[float, float, float, float] | None,
    out_dir: Path,
    model: str = "default",
    device: str = "cpu",
    multimask: bool = False,
    text: str | None = None,
    instances: int | None = None,
    detector: str | None = None,
    zoom_in: bool = False,
) -> dict[str, Any]:
    """Run the predictor on one image and write ``mask*.png``, ``overlay.png`` and ``result.json``.

    With a box, parts of a mask wholly outside the box are dropped (:func:`keep_parts_touching_box`).
    Every candidate is written, an empty one too (its record says ``"empty": true``).

    ``text``: a text prompt (with or without points / box); ``instances``: with a text alone, one mask per
    matching object, at most that many; ``detector``: an open-vocabulary detector folder for the text.
    ``zoom_in``: points and a box answered on a crop around the object (:class:`segany.zoom_in.ZoomInPredictor`:
    the whole image's best mask predicted again on a crop around it, one mask, unless ``multimask``; a box on
    a crop around it).
    """
    from segany.checkpoint import load_model
    from segany.io.atomic import atomic_write_json
    from segany.io.images import load_image
    from segany.io.png import write_mask_png
    from segany.io.rle import encode_rle, rle_area, rle_to_bbox
    from segany.predictor import SamPredictor
    from segany.utils.masks import keep_parts_touching_box
    from segany.viz import overlay_masks, save_png

    if zoom_in and text is not None:
        raise SegAnyError("--zoom-in answers points and boxes; a text prompt is answered on the whole image")
    image = load_image(image_path)
    h, w = image.shape[:2]
    check_prompts_in_image(points, box, h, w)
    if out_dir.exists() and not out_dir.is_dir():
        raise SegAnyError(f"{out_dir}: exists and is not a folder")
    sam = load_model(model, device=device)
    text_detector = None
    if detector is not None:
        from segany.text.grounding import OpenVocabularyDetector

        text_detector = OpenVocabularyDetector.from_pretrained(detector, device=device)
    predictor = SamPredictor(sam, text_detector=text_detector)
    if zoom_in:
        from segany.zoom_in import ZoomInPredictor

        predictor = ZoomInPredictor(predictor, refine_first=not multimask)  # --multimask: the whole image's 3
    predictor.set_image(image)
    coords = np.array([p for p, _ in points], dtype=np.float64) if points else None
    labels = np.array([lab for _, lab in points], dtype=np.int64) if points else None
    box_arr = np.array(box, dtype=np.float64) if box is not None else None
    if instances is not None:
        masks, scores = predictor.predict_instances(text, max_instances=instances)
        order = np.arange(len(masks))  # already best first
    else:
        # One ambiguous prompt: ask for 3 masks and keep the best, as the paper recommends.
        ambiguous = box is None and len(points) == 1 and text is None
        text_kw = {} if text is None else {"text": text}  # ZoomInPredictor takes no text (checked above)
        masks, scores, _ = predictor.predict(
            coords, labels, box_arr, multimask_output=multimask or ambiguous, **text_kw
        )
        order = np.argsort(-scores)
        if not multimask:
            order = order[:1]
        if box is not None:
            masks = np.stack([keep_parts_touching_box(m, box) for m in masks])
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for rank, i in enumerate(order):
        m = masks[i]
        name = "mask.png" if len(order) == 1 else f"mask_{rank}.png"
        write_mask_png(out_dir / name, m)
        rle = encode_rle(m)
        area = rle_area(rle)
        records.append(
            {
                "file": name,
                "predicted_iou": float(scores[i]),
                "empty": area == 0,  # a candidate can be empty: the model found nothing for that output
                "area": area,
                "bbox": rle_to_bbox(rle),  # XYWH, as COCO
                "segmentation": rle,
            }
        )
    overlay = overlay_masks(
        image,
        [masks[i] for i in order] if instances is not None else [masks[i] for i in order[:1]],
        points=coords,
        labels=labels,
        boxes=None if box_arr is None else box_arr[None],
    )
    save_png(out_dir / "overlay.png", overlay)
    result = {
        "image": str(image_path),
        "width": w,
        "height": h,
        "model": str(model),
        "prompts": {
            "points": [[x, y] for (x, y), lab in points if lab == 1],
            "negative_points": [[x, y] for (x, y), lab in points if lab == 0],
            "box": list(box) if box is not None else None,
            "text": text,
            "instances": instances,
        },
        "masks": records,
    }
    atomic_write_json(out_dir / "result.json", result, indent=2)
    return result
