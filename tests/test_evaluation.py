"""Evaluation: click simulator, metrics and protocol runners on hand-made masks (no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segany.evaluation.clicks import Click, clicks_to_prompt, next_click
from segany.evaluation.metrics import (
    AR_THRESHOLDS,
    average_recall,
    best_ious,
    mask_iou,
    noc,
    nof,
    recall_curve,
    summarize_curves,
)
from segany.evaluation.protocols import mask_to_box, run_box, run_clicks, run_everything
from segany.io.labelmaps import Sample


def rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """``h x w`` bool mask, True on rows y0..y1 and columns x0..x1 (inclusive)."""
    m = np.zeros((h, w), dtype=bool)
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


# -- click simulator -----------------------------------------------------------------------------


def test_first_click_is_centre_of_odd_square():
    gt = rect(30, 30, 5, 15, 7, 17)  # 11 x 11, centre (x=12, y=10)
    assert next_click(gt, np.zeros_like(gt)) == Click(12, 10, True)


def test_first_click_on_square_touching_the_border():
    # The 1 px padding makes the image border a region border: still the exact centre.
    gt = rect(20, 20, 0, 6, 0, 6)
    assert next_click(gt, np.zeros_like(gt)) == Click(3, 3, True)


def test_missing_right_half_gets_positive_click_at_its_centre():
    gt = rect(30, 30, 5, 15, 4, 25)  # 11 rows x 22 columns
    pred = rect(30, 30, 5, 15, 4, 14)  # the left 11 columns: the missing part is the 11 x 11 square 15..25
    assert next_click(gt, pred) == Click(20, 10, True)


def test_spill_gets_negative_click_at_its_centre():
    gt = rect(40, 40, 10, 20, 10, 20)
    spill = rect(40, 40, 12, 18, 21, 27)  # 7 x 7 outside the object, centre (24, 15)
    pred = gt | spill
    pred[10, 10] = False  # a 1 px miss: shallower than the spill, so the spill wins
    assert next_click(gt, pred) == Click(24, 15, False)


def test_fn_wins_ties():
    gt = rect(20, 40, 2, 6, 2, 6)  # 5 x 5 object, nothing predicted on it
    pred = rect(20, 40, 2, 6, 20, 24)  # 5 x 5 spill elsewhere: same depth
    assert next_click(gt, pred) == Click(4, 4, True)


def test_ignore_pixels_are_never_clicked():
    gt = rect(30, 30, 5, 15, 7, 17)
    ignore = rect(30, 30, 9, 11, 11, 13)  # the 3 x 3 around the centre
    c = next_click(gt, np.zeros_like(gt), ignore)
    assert c is not None and c.is_positive and gt[c.y, c.x] and not ignore[c.y, c.x]
    # An error that lies wholly in the ignore region is no error.
    assert next_click(gt, gt & ~ignore, ignore) is None


def test_no_error_no_click_and_shape_checks():
    gt = rect(10, 10, 2, 5, 2, 5)
    assert next_click(gt, gt.copy()) is None
    with pytest.raises(ValueError):
        next_click(gt, np.zeros((10, 11), bool))


def test_clicks_to_prompt():
    coords, labels = clicks_to_prompt([Click(3, 4, True), Click(5, 6, False)])
    assert coords.dtype == np.float32 and coords.tolist() == [[3, 4], [5, 6]]
    assert labels.tolist() == [1, 0]


# -- metrics ---------------------------------------------------------------------------------------


def test_mask_iou_with_ignore():
    gt = rect(10, 10, 0, 3, 0, 3)  # 16 px
    pred = rect(10, 10, 0, 3, 0, 5)  # 24 px, 8 spill
    assert mask_iou(pred, gt) == pytest.approx(16 / 24)
    ignore = rect(10, 10, 0, 3, 4, 5)  # exactly the spill
    assert mask_iou(pred, gt, ignore) == 1.0
    assert mask_iou(np.zeros_like(gt), np.zeros_like(gt)) == 1.0


def test_noc_nof_miou_on_hand_made_curves():
    curves = np.array(
        [
            [0.50, 0.86, 0.91, 0.95, 0.97],  # NoC@85 = 2, NoC@90 = 3
            [0.90, 0.92, 0.93, 0.94, 0.95],  # 1, 1
            [0.10, 0.20, 0.30, 0.86, 0.88],  # 4, never -> 5 (a failure)
            [0.40, 0.50, 0.60, 0.70, 0.90],  # 5, 5 reached at the last click: NoC 5 but not a failure
        ]
    )
    assert noc(curves, 0.85).tolist() == [2, 1, 4, 5]
    assert noc(curves, 0.90).tolist() == [3, 1, 5, 5]
    assert nof(curves, 0.90) == 1 and nof(curves, 0.85) == 0
    s = summarize_curves(curves)
    assert s["mIoU@1"] == pytest.approx((0.5 + 0.9 + 0.1 + 0.4) / 4)
    assert s["mIoU@3"] == pytest.approx((0.91 + 0.93 + 0.3 + 0.6) / 4)
    assert s["mIoU@5"] == pytest.approx((0.97 + 0.95 + 0.88 + 0.9) / 4)
    assert s["NoC@85"] == pytest.approx(12 / 4) and s["NoC@90"] == pytest.approx(14 / 4)
    assert s["NoF@90"] == 1 and s["num_objects"] == 4 and s["max_clicks"] == 5


def test_average_recall_on_hand_made_masks():
    a = rect(20, 20, 0, 9, 0, 9)  # 100 px
    b = rect(20, 20, 10, 19, 10, 19)  # 100 px
    c = rect(20, 20, 0, 4, 15, 19)  # 25 px, nothing predicted near it
    pred_a = rect(20, 20, 0, 9, 0, 7)  # 80 px inside a: IoU 0.8
    pred_b = rect(20, 20, 10, 19, 10, 19)  # == b: IoU 1
    gt = np.stack([a, b, c])
    best = best_ious(gt, [pred_a, pred_b])
    assert best == pytest.approx([0.8, 1.0, 0.0])
    # Thresholds 0.50 .. 0.95: a counts up to 0.80 (7 of 10), b at all 10, c never.
    assert recall_curve(best).tolist() == pytest.approx([2 / 3] * 7 + [1 / 3] * 3)
    assert average_recall(gt, [pred_a, pred_b]) == pytest.approx((7 * 2 / 3 + 3 / 3) / 10)
    assert AR_THRESHOLDS[-1] == 0.95  # exactly: an IoU of 0.95 counts
    # Ignore pixels leave both masks: pred_a matches a once a's missing columns are ignored.
    assert best_ious(gt, [pred_a], ignore=rect(20, 20, 0, 9, 8, 9))[0] == pytest.approx(1.0)
    assert best_ious(gt, []).tolist() == [0.0, 0.0, 0.0]


# -- protocols -------------------------------------------------------------------------------------


class OraclePredictor:
    """gt intersected with discs of radius ``r`` around the positive clicks, minus discs around negatives.

    ``objects`` are the gt masks of the image; the prompt's first click picks which one. Multimask
    output puts the oracle mask second with the best score, so picking by score is exercised. The
    low-res logits hold a call id, so the mask_input fed back can be traced to the call it came from.
    """

    def __init__(self, objects: list[np.ndarray], r: float = 2.0):
        self.objects, self.r = objects, r
        self.set_calls = 0
        self.calls: list[dict] = []

    def set_image(self, image: np.ndarray) -> None:
        self.set_calls += 1
        self.shape = image.shape[:2]

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        self.calls.append({"n": len(point_coords), "mask_input": mask_input, "multi": multimask_output})
        yy, xx = np.mgrid[: self.shape[0], : self.shape[1]]
        x0, y0 = point_coords[0].astype(int)
        gt = next(o for o in self.objects if o[y0, x0])
        pos = np.zeros(self.shape, bool)
        neg = np.zeros(self.shape, bool)
        for (x, y), lab in zip(point_coords, point_labels):
            disc = (xx - x) ** 2 + (yy - y) ** 2 <= self.r**2
            (pos if lab == 1 else neg)[...] |= disc
        oracle = gt & pos & ~neg
        call_id = float(len(self.calls))
        if multimask_output:
            masks = np.stack([np.ones(self.shape, bool), oracle, np.zeros(self.shape, bool)])
            return masks, np.array([0.5, 0.9, 0.1]), np.full((3, 256, 256), call_id, np.float32)
        return oracle[None], np.array([0.9]), np.full((1, 256, 256), call_id, np.float32)


def strip_sample() -> tuple[Sample, list[np.ndarray]]:
    """One 5 x 40 image: object A = row 1, columns 0..19 (20 px); B = row 3, columns 5..34 (30 px);
    C = 2 px at row 4 (skipped with min_area=5)."""
    h, w = 5, 40
    a, b, c = rect(h, w, 1, 1, 0, 19), rect(h, w, 3, 3, 5, 34), rect(h, w, 4, 4, 38, 39)
    sample = Sample(
        image=np.zeros((h, w, 3), np.uint8),
        masks=np.stack([a, b, c]),
        ignore=np.zeros((h, w), bool),
        names=["a", "b", None],
        stem="img0",
    )
    return sample, [a, b, c]


def test_run_clicks_with_oracle_predictor(tmp_path):
    # On a 1 px strip every pixel is 1 from the boundary, so each click lands on the leftmost missed
    # pixel, and a radius-2 disc covers it plus 2 px either side. Click k covers the first 3k pixels:
    # A (20 px): IoU 3k/20 -> .15 .30 .45 .60 .75 .90 1 1; B (30 px): 3k/30 -> .1 .2 ... .8
    sample, objects = strip_sample()
    pred = OraclePredictor(objects)
    res = run_clicks(pred, [sample], max_clicks=8, min_area=5)
    assert pred.set_calls == 1 and res.num_images == 1 and res.num_skipped == 1
    curves = res.curves()
    assert curves.shape == (2, 8)
    assert curves[0] == pytest.approx([0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.0, 1.0])
    assert curves[1] == pytest.approx([0.1 * k for k in range(1, 9)])
    assert np.all(np.diff(curves, axis=1) >= 0)
    # A is perfect after 7 clicks: no 8th click, the IoU is carried.
    assert [(c.x, c.y) for c in res.objects[0].clicks] == [
        (0, 1),
        (3, 1),
        (6, 1),
        (9, 1),
        (12, 1),
        (15, 1),
        (18, 1),
    ]
    assert all(c.is_positive for c in res.objects[0].clicks)

    s = res.summary()
    assert s["mIoU@1"] == pytest.approx((0.15 + 0.1) / 2)
    assert s["mIoU@3"] == pytest.approx((0.45 + 0.3) / 2)
    assert s["mIoU@5"] == pytest.approx((0.75 + 0.5) / 2)
    assert s["NoC@85"] == pytest.approx((6 + 8) / 2)  # B never gets there: max_clicks
    assert s["NoC@90"] == pytest.approx((6 + 8) / 2)
    assert s["NoF@90"] == 1 and s["NoF@85"] == 1
    assert s["num_objects"] == 2

    # The protocol: click 1 multimask, then single-mask with the chosen logits fed back.
    first_a = pred.calls[:7]
    assert [c["n"] for c in first_a] == [1, 2, 3, 4, 5, 6, 7]
    assert first_a[0]["multi"] and first_a[0]["mask_input"] is None
    assert not any(c["multi"] for c in first_a[1:])
    for i, c in enumerate(first_a[1:], start=1):
        assert c["mask_input"].shape == (1, 256, 256) and np.all(c["mask_input"] == i)  # from call i

    paths = res.write(tmp_path / "out")
    assert {p.name for p in paths} == {"summary.json", "per_image.json", "iou_vs_clicks.png"}
    per_image = json.loads((tmp_path / "out" / "per_image.json").read_text())
    assert per_image[0]["stem"] == "img0" and [o["name"] for o in per_image[0]["objects"]] == ["a", "b"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["NoF@90"] == 1
    assert (tmp_path / "out" / "iou_vs_clicks.png").read_bytes()[:4] == b"\x89PNG"


def test_run_clicks_limits():
    sample, objects = strip_sample()
    pred = OraclePredictor(objects)
    res = run_clicks(pred, [sample, sample, sample], max_clicks=3, max_objects_per_image=1, max_images=2)
    assert res.num_images == 2 and pred.set_calls == 2
    assert [o.index for o in res.objects] == [0, 0]
    with pytest.raises(ValueError):
        run_clicks(pred, [sample], max_clicks=0)


class BoxPredictor:
    """Returns the box's pixels (max coordinates inclusive) as the mask."""

    def set_image(self, image):
        self.shape = image.shape[:2]

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        x0, y0, x1, y1 = box.astype(int)
        return rect(*self.shape, y0, y1, x0, x1)[None], np.array([1.0]), np.zeros((1, 256, 256), np.float32)


def test_run_box():
    h, w = 20, 20
    square = rect(h, w, 2, 5, 3, 8)
    ell = rect(h, w, 10, 15, 10, 11) | rect(h, w, 14, 15, 10, 15)  # L shape: 12 + 8 = 20 px, box 6 x 6
    sample = Sample(
        np.zeros((h, w, 3), np.uint8), np.stack([square, ell]), np.zeros((h, w), bool), [None] * 2, "s"
    )
    assert mask_to_box(ell).tolist() == [10, 10, 15, 15]
    s = run_box(BoxPredictor(), [sample]).summary()
    assert s["mIoU"] == pytest.approx((1.0 + 20 / 36) / 2) and s["num_objects"] == 2


def test_run_everything():
    sample, objects = strip_sample()
    a, b, _ = objects
    half_b = b.copy()
    half_b[:, 20:] = False  # 15 of B's 30 px: IoU 0.5

    res = run_everything(lambda image: [{"segmentation": a}, half_b], [sample], min_area=5)
    s = res.summary()
    assert s["num_objects"] == 2 and s["num_skipped"] == 1 and s["mean_masks_per_image"] == 2
    assert s["recall@50"] == 1.0 and s["recall@55"] == 0.5 and s["recall@95"] == 0.5
    assert s["AR"] == pytest.approx((1.0 + 9 * 0.5) / 10)
