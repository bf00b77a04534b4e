"""ZoomInPredictor: later clicks answered on a crop around the object (tiny random model, small images)."""

from __future__ import annotations

import numpy as np
import pytest

from segany.errors import SegAnyError
from segany.evaluation.protocols import click_object
from segany.predictor import SamPredictor
from segany.zoom_in import OUTSIDE_LOGIT, ZoomInPredictor
from tests.conftest import synthetic_image


class CountingPredictor(SamPredictor):
    """Counts the images it embeds and remembers the last one."""

    def set_image(self, image, image_format="RGB"):
        self.embedded = getattr(self, "embedded", []) + [image.shape[:2]]
        super().set_image(image, image_format)


@pytest.fixture()
def zoom(tiny_model):
    # every crop is used, however little it enlarges the picture
    z = ZoomInPredictor(CountingPredictor(tiny_model), expand=1.4, min_side=20, first_min_side=20, box_min_zoom=0)
    z.set_image(synthetic_image(96, 128))
    return z


def test_first_clicks_are_the_plain_predictors_answer(tiny_model, zoom):
    zoom.refine_first = zoom.zoom_box = False
    plain = SamPredictor(tiny_model)
    plain.set_image(synthetic_image(96, 128))
    pt, lab = np.array([[40.0, 30.0]]), np.array([1])
    for kw in ({"point_coords": pt, "point_labels": lab}, {"box": np.array([10.0, 10.0, 60.0, 50.0])}):
        a, b = plain.predict(**kw, multimask_output=True), zoom.predict(**kw, multimask_output=True)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    # a later click without mask_input has no previous mask to zoom on: the plain answer too
    pts, labs = np.array([[40.0, 30.0], [90.0, 70.0]]), np.array([1, 0])
    np.testing.assert_array_equal(plain.predict(pts, labs)[0], zoom.predict(pts, labs)[0])
    assert zoom.predictor.embedded == [(96, 128)]


def test_the_first_click_is_refined_on_a_crop_around_the_best_mask(tiny_model, zoom):
    plain = SamPredictor(tiny_model)
    plain.set_image(synthetic_image(96, 128))
    pt, lab = np.array([[40.0, 30.0]]), np.array([1])
    masks, scores, _ = plain.predict(pt, lab, multimask_output=True, return_logits=True)
    best = masks[int(np.argmax(scores))] > 0
    refined, refined_scores, low = zoom.predict(pt, lab, multimask_output=True)
    assert refined.shape == (1, 96, 128) and refined_scores.shape == (1,) and low.shape[0] == 1
    assert best.any()  # (seed 0: the tiny model's best mask has 1,114 pixels)
    # the crop holds the best whole-image mask and the click; nothing outside it is mask
    x0, y0, x1, y1 = zoom._crop
    ys, xs = np.nonzero(best)
    assert x0 <= min(xs.min(), 40) and x1 > max(xs.max(), 40) and y0 <= min(ys.min(), 30) and y1 > max(ys.max(), 30)
    assert zoom.predictor.embedded[-1] == (y1 - y0, x1 - x0)
    outside = np.ones((96, 128), bool)
    outside[y0:y1, x0:x1] = False
    assert not refined[0][outside].any()
    # without zoom_box a box is answered on the whole image, exactly, from the kept embedding (no new one)
    count = len(zoom.predictor.embedded)
    b = np.array([10.0, 10.0, 60.0, 50.0])
    zoom.zoom_box = False
    for x, y in zip(plain.predict(box=b), zoom.predict(box=b)):
        np.testing.assert_array_equal(x, y)
    assert len(zoom.predictor.embedded) == count
    # with it, on a crop around the box (corners as pixels: 51 x 41), 1.4 times as wide and tall (the fixture's expand)
    zoom.zoom_box = True
    masks, _, _ = zoom.predict(box=b, multimask_output=False)
    x0, y0, x1, y1 = zoom._crop
    assert (x1 - x0, y1 - y0) == (round(51 * 1.4), round(41 * 1.4)) and x0 <= 10 and x1 >= 60 and y0 <= 10 and y1 >= 50
    assert zoom.predictor.embedded[-1] == (y1 - y0, x1 - x0) and masks.shape == (1, 96, 128)
    outside = np.ones((96, 128), bool)
    outside[y0:y1, x0:x1] = False
    assert not masks[0][outside].any()


def test_a_later_click_is_answered_on_a_crop_around_the_mask_and_the_clicks(zoom):
    h, w = 96, 128
    previous = np.full((h, w), -5.0, np.float32)
    previous[30:50, 40:70] = 5.0  # a 30 x 20 mask
    side = tuple(zoom.model.prompt_encoder.mask_input_size)
    zoom._last = (zoom.full_box, np.zeros((1, *side), np.float32), previous[None])
    sent = np.zeros((1, *side), np.float32)
    clicks, labels = np.array([[50.0, 40.0], [75.0, 45.0]]), np.array([1, 1])
    masks, scores, low = zoom.predict(clicks, labels, mask_input=sent, multimask_output=False)
    x0, y0, x1, y1 = zoom._crop
    # the box around the mask (x 40..70) and the clicks (x up to 75), 1.4 times wider, holds both
    assert x0 <= 40 and x1 >= 76 and y0 <= 30 and y1 >= 50 and (x1, y1) != (w, h)
    assert x1 - x0 == pytest.approx(36 * 1.4, abs=1) and y1 - y0 == pytest.approx(20 * 1.4, abs=1)
    assert zoom.predictor.embedded[-1] == (y1 - y0, x1 - x0)
    assert masks.shape == (1, h, w) and scores.shape == (1,)
    outside = np.ones((h, w), bool)
    outside[y0:y1, x0:x1] = False
    assert not masks[0][outside].any()
    zoom.recompute_iou = 0.0  # keep the crop while it holds every click, whatever the new mask
    logits = zoom.predict(clicks, labels, mask_input=low, multimask_output=False, return_logits=True)[0]
    assert (logits[0][outside] == OUTSIDE_LOGIT).all()
    # the second call sent back the first call's low-res logits: recognised, same crop, no new embedding
    assert len(zoom.predictor.embedded) == 2


class SmallMaskPredictor(CountingPredictor):
    """Answers on the whole 96 x 128 image with a 10 x 15 mask (the tiny model's masks span the image)."""

    def predict(self, *args, **kwargs):
        logits, scores, low = super().predict(*args, **kwargs)
        if self.original_size == (96, 128):
            logits = np.full_like(logits, -5.0)
            logits[:, 30:40, 40:55] = 5.0
        return logits, scores, low


def test_the_first_clicks_crop_is_at_least_first_min_side(tiny_model):
    zoom = ZoomInPredictor(SmallMaskPredictor(tiny_model), expand=1.4, min_side=20, first_min_side=80)
    zoom.set_image(synthetic_image(96, 128))
    zoom.predict(np.array([[45.0, 35.0]]), np.array([1]), multimask_output=True, return_logits=True)
    x0, y0, x1, y1 = zoom._crop  # the mask's box 1.4 times wider (21 x 14), at least 80 a side
    assert (x1 - x0, y1 - y0) == (80, 80) and x0 <= 40 and x1 >= 55 and y0 <= 30 and y1 >= 40
    assert zoom.predictor.embedded[-1] == (80, 80)
    # a later click around the same small mask: a crop sized by min_side (IoU with the first one under 0.5)
    previous = np.full((96, 128), -5.0, np.float32)
    previous[30:40, 40:55] = 5.0
    zoom._last = (zoom._crop, zoom._last[1], previous[None])
    clicks, labels = np.array([[45.0, 35.0], [50.0, 36.0]]), np.array([1, 1])
    zoom.predict(clicks, labels, mask_input=zoom._last[1], multimask_output=False)
    x0, y0, x1, y1 = zoom._crop
    assert (x1 - x0, y1 - y0) == (21, 20) and zoom.predictor.embedded[-1] == (20, 21)


def test_a_boxs_crop_that_enlarges_less_than_box_min_zoom_is_not_used(tiny_model, zoom):
    zoom.box_min_zoom = 3.0
    plain = SamPredictor(tiny_model)
    plain.set_image(synthetic_image(96, 128))
    b = np.array([10.0, 10.0, 60.0, 50.0])  # its crop (71 x 57) enlarges the picture 128 / 71 = 1.8 times more
    for x, y in zip(plain.predict(box=b, multimask_output=False), zoom.predict(box=b, multimask_output=False)):
        np.testing.assert_array_equal(x, y)  # the whole image's answer, from the kept embedding
    assert zoom._crop == zoom.full_box and zoom.predictor.embedded == [(96, 128)]
    small = np.array([40.0, 30.0, 50.0, 38.0])  # its crop is min_side's 20 x 20: 6.4 times
    zoom.predict(box=small, multimask_output=False)
    assert zoom._crop != zoom.full_box and zoom.predictor.embedded[-1] == (20, 20)
    # a later click around a 60 x 40 mask (its crop 84 x 56: 1.5 times): its crop all the same
    previous = np.full((96, 128), -5.0, np.float32)
    previous[20:60, 30:90] = 5.0
    zoom._last = (zoom.full_box, np.zeros((1, *zoom.model.prompt_encoder.mask_input_size), np.float32), previous[None])
    zoom.predict(np.array([[50.0, 40.0], [60.0, 45.0]]), np.array([1, 1]), mask_input=zoom._last[1])
    assert zoom._crop != zoom.full_box and len(zoom.predictor.embedded) == 3


def test_the_previous_mask_becomes_the_crops_mask_prompt(zoom):
    h, w = 96, 128
    logits = np.full((h, w), -8.0, np.float32)
    logits[20:60, 30:90] = 8.0
    crop = (20, 10, 100, 70)
    low = zoom._low_res(logits, crop)
    s = zoom.model.prompt_encoder.mask_input_size
    assert low.shape == (1, *s)
    # back up to the crop's frame (the input is the crop's longest side at model.image_size, padded)
    import torch
    import torch.nn.functional as F

    size = zoom.model.image_size
    up = F.interpolate(torch.from_numpy(low)[None], (size, size), mode="bilinear", align_corners=False)[0, 0]
    scale = size / max(crop[2] - crop[0], crop[3] - crop[1])
    inside = up[int((25 - crop[1]) * scale), int((40 - crop[0]) * scale)]
    outside = up[int((65 - crop[1]) * scale), int((95 - crop[0]) * scale)]
    assert inside > 0 > outside
    assert (up[int(60 * scale) + 2 :, :] < 0).all()  # the padding below the crop is background


def test_click_loop_runs_with_zoom_and_reuses_crops(tiny_model, zoom):
    gt = np.zeros((96, 128), bool)
    gt[20:60, 30:90] = True
    ious, clicks = click_object(zoom, gt, None, max_clicks=6)
    assert len(ious) == 6 and all(0.0 <= v <= 1.0 for v in ious)
    # at most one embedding per click, plus the whole image
    assert 1 <= len(zoom.predictor.embedded) <= 1 + len(clicks)


def test_bad_settings_and_no_image(tiny_model):
    with pytest.raises(ValueError, match="skip_clicks"):
        ZoomInPredictor(SamPredictor(tiny_model), skip_clicks=0)
    with pytest.raises(ValueError, match="expand"):
        ZoomInPredictor(SamPredictor(tiny_model), expand=0.5)
    with pytest.raises(ValueError, match="first_min_side"):
        ZoomInPredictor(SamPredictor(tiny_model), first_min_side=0)
    with pytest.raises(ValueError, match="box_min_zoom"):
        ZoomInPredictor(SamPredictor(tiny_model), box_min_zoom=float("nan"))
    with pytest.raises(SegAnyError, match="set_image"):
        ZoomInPredictor(SamPredictor(tiny_model)).predict(np.array([[1.0, 1.0]]), np.array([1]))
    zoom = ZoomInPredictor(SamPredictor(tiny_model))
    zoom.set_image(synthetic_image(32, 40))
    for kw in ({"box": np.array([1.0, np.nan, 5.0, 5.0])}, {"box": np.zeros(3)}, {"point_coords": np.ones((1, 3))}):
        with pytest.raises(SegAnyError):
            zoom.predict(point_labels=np.array([1]) if "point_coords" in kw else None, **kw)


def test_segany_eval_zoom_in(tmp_path, tiny_checkpoint, capsys):
    import json

    from segany.cli import main
    from tests.test_first_hour import _label_map_folder

    data = _label_map_folder(tmp_path / "data")
    args = ["eval", "--data", str(data), "--max-clicks", "3", "--model", str(tiny_checkpoint)]
    assert main([*args, "--zoom-in"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["zoom_in"] is True and summary["num_objects"] == 4 and 0.0 <= summary["mIoU@3"] <= 1.0
    assert main([*args, "--zoom-in", "--protocol", "box"]) == 0
    assert json.loads(capsys.readouterr().out)["num_objects"] == 4
    assert main([*args, "--zoom-in", "--protocol", "everything"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--zoom-in applies to the clicks and box protocols, not everything")
    assert "Traceback" not in "".join(err)
