"""Evaluation protocols: simulated clicks, boxes, and "segment everything".

The runners take any predictor with the official ``SamPredictor`` API::

    predictor.set_image(image)                  # H x W x 3 uint8 RGB
    masks, iou_preds, low_res_logits = predictor.predict(
        point_coords=None | (N, 2) float (x, y), point_labels=None | (N,) int,
        box=None | (4,) XYXY, mask_input=None | (1, 256, 256) float, multimask_output=bool)
    # masks C x H x W bool, iou_preds (C,), low_res_logits C x 256 x 256

and samples with ``image``, ``masks`` (``N x H x W`` bool), ``ignore`` (``H x W`` bool), ``names`` and
``stem`` (:class:`segany.io.labelmaps.Sample`; :func:`load_samples` reads a label-map folder lazily).
Ignore pixels are never clicked and never count in an IoU.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from segany.evaluation.clicks import Click, clicks_to_prompt, next_click
from segany.evaluation.metrics import AR_THRESHOLDS, best_ious, mask_iou, recall_curve, summarize_curves
from segany.io.atomic import atomic_write_bytes, atomic_write_json
from segany.utils.masks import batched_mask_to_box


class Predictor(Protocol):
    """The part of the ``SamPredictor`` API the protocols use."""

    def set_image(self, image: np.ndarray) -> None: ...

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class SampleLike(Protocol):
    """An image with its instance masks (:class:`segany.io.labelmaps.Sample` fits)."""

    image: np.ndarray
    masks: np.ndarray
    ignore: np.ndarray
    names: list
    stem: str


class LazySamples:
    """The samples of a label-map folder, loaded one at a time as they are iterated; their number is
    known up front (``len``), for progress bars."""

    def __init__(self, folder: Any, stems: list[str]) -> None:
        self.folder, self.stems = folder, stems

    def __len__(self) -> int:
        return len(self.stems)

    def __iter__(self) -> Iterator[SampleLike]:
        return (self.folder.load(stem) for stem in self.stems)


def load_samples(root: str | os.PathLike, split: str | None = None, max_images: int | None = None) -> LazySamples:
    """Samples of a label-map folder, loaded one at a time (the folder is checked right away)."""
    from segany.io.labelmaps import LabelMapFolder

    folder = LabelMapFolder(root, split)
    return LazySamples(folder, folder.stems[:max_images])


# -- shared helpers --------------------------------------------------------------------------------


def _select_objects(
    sample: SampleLike, min_area: int, max_objects: int | None
) -> tuple[list[tuple[int, np.ndarray, np.ndarray, int]], int]:
    """``([(index, gt H x W, ignore H x W, visible area)], number skipped as too small)``.

    The area counts only non-ignored pixels; an object with none left is always skipped (no click
    could land on it). ``max_objects`` keeps the first ones, in mask order, so runs are repeatable.
    """
    h, w = sample.image.shape[:2]
    ignore = np.zeros((h, w), bool) if sample.ignore is None else np.asarray(sample.ignore, bool)
    masks = np.asarray(sample.masks, bool).reshape(-1, h, w)
    chosen, skipped = [], 0
    for i, gt in enumerate(masks):
        area = int((gt & ~ignore).sum())
        if area < max(min_area, 1):
            skipped += 1
            continue
        if max_objects is not None and len(chosen) >= max_objects:
            break
        chosen.append((i, gt, ignore, area))
    return chosen, skipped


def _images_with_objects(
    samples: Iterable[SampleLike], res: Any, min_area: int, max_objects: int | None, max_images: int | None
) -> Iterator[tuple[SampleLike, list[tuple[int, np.ndarray, np.ndarray, int]]]]:
    """``(sample, chosen objects)`` of each image that has some; counts images and skips in ``res``."""
    for sample in itertools.islice(samples, max_images):
        chosen, skipped = _select_objects(sample, min_area, max_objects)
        res.num_images += 1
        res.num_skipped += skipped
        if chosen:
            yield sample, chosen


def _name(sample: SampleLike, i: int) -> str | None:
    names = getattr(sample, "names", None) or []
    return names[i] if i < len(names) else None


def _pick(masks: np.ndarray, logits: np.ndarray, i: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Mask ``i`` (``H x W`` bool) and its low-res logits as a ``1 x 256 x 256`` mask_input."""
    mask = np.asarray(masks[i]).astype(bool, copy=False)
    if mask.shape != shape:
        raise ValueError(f"predictor returned a {mask.shape} mask for a {shape} image")
    return mask, np.asarray(logits[i], dtype=np.float32)[None]


def _jsonable(obj: Any) -> Any:
    """NaN / inf -> None (JSON has no NaN), numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_json(out_dir: Path, protocol: str, summary: dict, per_image: list[dict]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "summary.json", out_dir / "per_image.json"]
    atomic_write_json(paths[0], _jsonable({"protocol": protocol, **summary}), indent=2)
    atomic_write_json(paths[1], _jsonable(per_image))
    return paths


def _group_by_image(records: Sequence[Any], to_dict: Callable[[Any], dict]) -> list[dict]:
    """``[{"stem": s, "objects": [...]}]`` in first-seen order."""
    out: list[dict] = []
    for stem, group in itertools.groupby(records, key=lambda r: r.stem):
        out.append({"stem": stem, "objects": [to_dict(r) for r in group]})
    return out


# -- clicks ----------------------------------------------------------------------------------------


@dataclass
class ClickObject:
    """One object's run: IoU after each click (``max_clicks`` long) and the clicks made."""

    stem: str
    index: int
    name: str | None
    area: int
    ious: list[float]
    clicks: list[Click]


@dataclass
class ClickResults:
    """Result of :func:`run_clicks`."""

    max_clicks: int
    iou_thresholds: tuple[float, ...]
    objects: list[ClickObject] = field(default_factory=list)
    num_images: int = 0
    num_skipped: int = 0
    seconds: float = 0.0

    def curves(self) -> np.ndarray:
        """``N x max_clicks`` IoU after each click."""
        return np.array([o.ious for o in self.objects], dtype=np.float64).reshape(-1, self.max_clicks)

    def summary(self) -> dict[str, Any]:
        """``mIoU@1/@3/@5``, ``NoC@85``, ``NoC@90``, ``NoF@85``, ``NoF@90``, counts and time."""
        out: dict[str, Any] = summarize_curves(self.curves(), (1, 3, 5), self.iou_thresholds)
        out.update(num_images=self.num_images, num_skipped=self.num_skipped, seconds=round(self.seconds, 3))
        return out

    def write(self, out_dir: str | os.PathLike, plot: bool = True) -> list[Path]:
        """Write ``summary.json``, ``per_image.json`` and ``iou_vs_clicks.png``; return the paths.

        The plot needs matplotlib (an optional extra): without it a warning is issued and no PNG written.
        """
        out_dir = Path(out_dir)

        def obj(o: ClickObject) -> dict:
            clicks = [[c.x, c.y, int(c.is_positive)] for c in o.clicks]
            return {"index": o.index, "name": o.name, "area": o.area, "ious": o.ious, "clicks": clicks}

        paths = _write_json(out_dir, "clicks", self.summary(), _group_by_image(self.objects, obj))
        if plot and self.objects and _plot_curve(out_dir / "iou_vs_clicks.png", self.curves(), self.iou_thresholds):
            paths.append(out_dir / "iou_vs_clicks.png")
        return paths


def _plot_curve(path: Path, curves: np.ndarray, thresholds: Sequence[float]) -> bool:
    """Mean IoU vs number of clicks as a PNG; False (with a warning) when matplotlib is missing."""
    try:  # lazily: matplotlib is optional. Figure + Agg canvas: no pyplot, no global backend switch.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no IoU-vs-clicks plot written", stacklevel=3)
        return False
    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    clicks = np.arange(1, curves.shape[1] + 1)
    ax.plot(clicks, curves.mean(axis=0), marker="o", markersize=3)
    for t in thresholds:
        ax.axhline(t, color="gray", linestyle="--", linewidth=0.8)
    ax.set(xlabel="clicks", ylabel="mean IoU", ylim=(0, 1), xlim=(1, max(2, curves.shape[1])))
    ax.set_title(f"IoU vs clicks ({len(curves)} objects)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return True


def click_object(
    predictor: Predictor, gt: np.ndarray, ignore: np.ndarray | None, max_clicks: int
) -> tuple[list[float], list[Click]]:
    """Run the click loop on one object of the image already set; ``(ious (max_clicks,), clicks)``.

    Click 1 goes on an empty prediction with ``multimask_output=True`` and keeps the mask with the
    highest predicted IoU (SAM's answer to one ambiguous click). Later clicks send all clicks so far
    plus the chosen mask's low-res logits as ``mask_input``, single-mask. When no error is left to
    click the IoU stays as it is for the remaining clicks.
    """
    pred = np.zeros(gt.shape, dtype=bool)
    logits: np.ndarray | None = None
    clicks: list[Click] = []
    ious: list[float] = []
    for _ in range(max_clicks):
        click = next_click(gt, pred, ignore)
        if click is None:
            break
        clicks.append(click)
        coords, labels = clicks_to_prompt(clicks)
        first = logits is None
        masks, scores, low_res = predictor.predict(
            point_coords=coords, point_labels=labels, mask_input=logits, multimask_output=first
        )
        best = int(np.argmax(scores)) if first else 0
        pred, logits = _pick(masks, low_res, best, gt.shape)
        ious.append(mask_iou(pred, gt, ignore))
    if not ious:  # gt has no clickable pixel: callers skip such objects
        raise ValueError("object has no pixel outside the ignore region")
    ious += [ious[-1]] * (max_clicks - len(ious))
    return ious, clicks


def run_clicks(
    predictor: Predictor,
    samples: Iterable[SampleLike],
    max_clicks: int = 20,
    iou_thresholds: Sequence[float] = (0.85, 0.9),
    min_area: int = 1,
    max_objects_per_image: int | None = None,
    max_images: int | None = None,
) -> ClickResults:
    """Interactive evaluation with simulated clicks (see :func:`click_object`), every object of every image.

    Objects with fewer than ``min_area`` non-ignored pixels are skipped (counted in ``num_skipped``).
    The image is set once and its objects looped; images without objects are not set at all.
    """
    if max_clicks < 1:
        raise ValueError(f"max_clicks must be >= 1, got {max_clicks}")
    res = ClickResults(max_clicks=max_clicks, iou_thresholds=tuple(float(t) for t in iou_thresholds))
    start = time.perf_counter()
    for sample, chosen in _images_with_objects(samples, res, min_area, max_objects_per_image, max_images):
        predictor.set_image(sample.image)
        for i, gt, ignore, area in chosen:
            ious, clicks = click_object(predictor, gt, ignore, max_clicks)
            res.objects.append(ClickObject(sample.stem, i, _name(sample, i), area, ious, clicks))
    res.seconds = time.perf_counter() - start
    return res


# -- boxes -----------------------------------------------------------------------------------------


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight XYXY box of an ``H x W`` bool mask, max coordinates inclusive (SAM's convention): ``(4,)``."""
    return batched_mask_to_box(torch.from_numpy(np.ascontiguousarray(mask))).numpy().astype(np.float32)


@dataclass
class BoxObject:
    """One object's box prompt and the IoU of the single predicted mask."""

    stem: str
    index: int
    name: str | None
    area: int
    box: list[float]
    iou: float


@dataclass
class BoxResults:
    """Result of :func:`run_box`."""

    objects: list[BoxObject] = field(default_factory=list)
    num_images: int = 0
    num_skipped: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """``mIoU`` over objects, counts and time."""
        ious = [o.iou for o in self.objects]
        return {
            "mIoU": float(np.mean(ious)) if ious else float("nan"),
            "num_objects": len(ious),
            "num_images": self.num_images,
            "num_skipped": self.num_skipped,
            "seconds": round(self.seconds, 3),
        }

    def write(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write ``summary.json`` and ``per_image.json``; return the paths."""

        def obj(o: BoxObject) -> dict:
            return {"index": o.index, "name": o.name, "area": o.area, "box": o.box, "iou": o.iou}

        return _write_json(Path(out_dir), "box", self.summary(), _group_by_image(self.objects, obj))


def run_box(
    predictor: Predictor,
    samples: Iterable[SampleLike],
    min_area: int = 1,
    max_objects_per_image: int | None = None,
    max_images: int | None = None,
) -> BoxResults:
    """Box-prompt evaluation: the tight XYXY box of each gt mask, ``multimask_output=False``."""
    res = BoxResults()
    start = time.perf_counter()
    for sample, chosen in _images_with_objects(samples, res, min_area, max_objects_per_image, max_images):
        predictor.set_image(sample.image)
        for i, gt, ignore, area in chosen:
            box = mask_to_box(gt)
            masks, _, low_res = predictor.predict(box=box, multimask_output=False)
            pred, _ = _pick(masks, low_res, 0, gt.shape)
            iou = mask_iou(pred, gt, ignore)
            res.objects.append(BoxObject(sample.stem, i, _name(sample, i), area, box.tolist(), iou))
    res.seconds = time.perf_counter() - start
    return res


# -- everything ------------------------------------------------------------------------------------


@dataclass
class EverythingImage:
    """One image of :func:`run_everything` (with gt objects): gt indices, their best IoUs, masks made."""

    stem: str
    indices: list[int]
    best_ious: list[float]
    num_pred: int


@dataclass
class EverythingResults:
    """Result of :func:`run_everything`; recall is pooled over all gt instances of all images."""

    thresholds: tuple[float, ...] = tuple(float(t) for t in AR_THRESHOLDS)
    images: list[EverythingImage] = field(default_factory=list)
    num_images: int = 0
    num_skipped: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """``AR``, ``recall@50`` ... ``recall@95``, counts and time."""
        best = np.array([v for im in self.images for v in im.best_ious], dtype=np.float64)
        recalls = recall_curve(best, np.asarray(self.thresholds))
        out: dict[str, Any] = {"AR": float(recalls.mean())}
        out.update({f"recall@{round(t * 100)}": float(r) for t, r in zip(self.thresholds, recalls)})
        n_pred = [im.num_pred for im in self.images]
        out.update(
            num_objects=int(best.size),
            num_images=self.num_images,
            num_skipped=self.num_skipped,
            mean_masks_per_image=float(np.mean(n_pred)) if n_pred else float("nan"),
            seconds=round(self.seconds, 3),
        )
        return out

    def write(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write ``summary.json`` and ``per_image.json``; return the paths."""
        per_image = [
            {"stem": im.stem, "num_pred": im.num_pred, "indices": im.indices, "best_ious": im.best_ious}
            for im in self.images
        ]
        return _write_json(Path(out_dir), "everything", self.summary(), per_image)


def run_everything(
    generator_fn: Callable[[np.ndarray], Sequence[Any]],
    samples: Iterable[SampleLike],
    thresholds: Sequence[float] = tuple(AR_THRESHOLDS),
    min_area: int = 1,
    max_objects_per_image: int | None = None,
    max_images: int | None = None,
) -> EverythingResults:
    """Segment-everything evaluation: average recall of ``generator_fn(image)``'s masks over the gt.

    ``generator_fn`` returns ``H x W`` bool masks, or ``SamAutomaticMaskGenerator`` records (dicts with a
    ``"segmentation"`` array).
    """
    res = EverythingResults(thresholds=tuple(float(t) for t in thresholds))
    start = time.perf_counter()
    # images with nothing to recall are skipped: no generator run is spent on them
    for sample, chosen in _images_with_objects(samples, res, min_area, max_objects_per_image, max_images):
        preds = [m["segmentation"] if isinstance(m, dict) else m for m in generator_fn(sample.image)]
        gt = np.stack([g for _, g, _, _ in chosen])
        best = best_ious(gt, preds, chosen[0][2]).tolist()
        res.images.append(EverythingImage(sample.stem, [i for i, *_ in chosen], best, len(preds)))
    res.seconds = time.perf_counter() - start
    return res
