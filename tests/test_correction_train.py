"""``segany train-correction``: the correction decoder trained on the product's own clicks, the rest frozen."""

from __future__ import annotations

import copy
import dataclasses
import random

import numpy as np
import pytest
import torch

from segany.checkpoint import load_model, save_model
from segany.errors import SegAnyError
from segany.evaluation.protocols import click_object
from segany.modeling.build import with_point_refiner
from segany.modeling.dense_prompt_encoder import MASK_MAP
from segany.predictor import SamPredictor
from segany.training.correction_train import (
    CorrectionTrainConfig,
    PromptTap,
    ZoomCorrections,
    correction_loss,
    low_res_targets,
    train_correction_decoder,
)
from segany.training.losses import LossConfig, mask_iou
from segany.training.refiner_train import ClickRecorder
from segany.training.trainer import changed_model
from segany.zoom_in import ZoomInPredictor, mask_prompt, paste_logits
from tests.test_correction_decoder import CHANGES
from tests.test_high_res_features import _dense_high_res_model
from tests.test_point_refiner import _folder, _image


def _base():
    """The default model's layout in small: a correction decoder whose skip reads the clicks (random weights)
    but not the previous mask (zero, as the shipped one's), and a point refiner with random weights."""
    model = changed_model(_dense_high_res_model(), CHANGES).eval()
    model = with_point_refiner(model, "new")
    torch.manual_seed(3)
    with torch.no_grad():
        model.point_refiner.mlp[-1].weight.normal_(0, 1.0)
        conv = model.correction_decoder.conv_m0
        conv.weight.normal_(0, 0.3)
        conv.weight[:, MASK_MAP] = 0
    return model


def _gt(image: np.ndarray) -> np.ndarray:
    return image[..., 0] == 230  # the disc of tests.test_point_refiner's image


def test_recorded_prompts_are_what_the_product_sent_and_the_loss_reads_its_answers():
    """Every click after the first is recorded with the refined low-res answer before it as its mask input; the
    training forward (plain modules, autograd on, fp32) answers those prompts as the predictor does: the
    low-res IoUs it reports are those of the predictor's own low-res logits."""
    model = _base()
    predictor = SamPredictor(model)
    image = _image()
    predictor.set_image(image)
    gt = _gt(image)
    recorder = ClickRecorder(predictor)
    random.seed(0)
    click_object(recorder, gt, None, 4)
    corrections = recorder.corrections()
    assert 1 <= len(corrections) <= 3
    coords, labels, mask = corrections[0]
    _, _, low = predictor.predict(coords[:1], labels[:1])  # the first click's answer, as the clicker sent it
    kept = low[np.argmax(predictor.predict(coords[:1], labels[:1])[1])]
    np.testing.assert_allclose(mask[0], kept, atol=1e-5)
    pts = torch.as_tensor(predictor.transform.apply_coords(coords[:1], image.shape[:2])).float()[None]
    decoder_low = predictor.predict_low_res(pts, torch.as_tensor(labels[:1])[None])[0][0]
    assert np.abs(kept - decoder_low[np.argmax(predictor.predict(coords[:1], labels[:1])[1])].numpy()).max() > 0.1
    assert [len(p[1]) for p in corrections] == list(range(2, 2 + len(corrections)))

    gts, valid = low_res_targets(predictor, gt[None], np.zeros_like(gt)[None])
    side = model.prompt_encoder.mask_input_size[0]
    assert gts.shape == valid.shape == (1, side, side)
    h, w = predictor.input_size
    assert valid[0, : h // 4 - 1, : w // 4 - 1].all() and not valid[0, h // 4 + 1 :].any()  # the padding never counts
    loss, ious = correction_loss(predictor, [(*p, 0) for p in corrections], gts, valid, LossConfig(), bf16=False)
    assert loss.requires_grad and loss.item() > 0
    for (c, lab, m), iou in zip(corrections, ious):
        pts = torch.as_tensor(predictor.transform.apply_coords(c, predictor.original_size)).float()[None]
        low_res, _ = predictor.predict_low_res(pts, torch.as_tensor(lab)[None], None, torch.as_tensor(m)[None], False)
        assert iou == pytest.approx(mask_iou(low_res[:, 0].float(), gts, valid).item(), abs=0.02)


def test_zoom_in_clicks_train_on_the_crops_they_were_answered_on():
    """A correction through zoom-in is answered on a crop around the previous mask, with that mask brought to the
    crop as the mask input: that prompt is trained, in the crop's frame, against the object's part in the crop;
    the loss reads the decoder's own answer to it (the IoU it reports is that answer's)."""
    model = _base()
    image = _image()
    gt = _gt(image)
    zoom = ZoomInPredictor(PromptTap(model))
    zoom.set_image(image)
    whole = zoom.full_box
    previous = mask_prompt(model, np.where(gt, 10.0, -10.0).astype(np.float32), whole)
    zoom.remember(whole, previous)  # the object's own mask as the previous answer
    recorder = ZoomCorrections(zoom, gt, np.zeros_like(gt), LossConfig(), bf16=False)
    clicks = np.array([[66.0, 50.0], [40.0, 40.0]], np.float32)
    recorder.predict(point_coords=clicks, point_labels=np.array([1, 1]), mask_input=previous, multimask_output=False)
    x0, y0, x1, y1 = zoom.last_crop
    assert x1 - x0 < 200  # a crop, not the whole image
    assert len(recorder.losses) == len(recorder.ious) == 1 and recorder.losses[0].requires_grad
    tap = zoom.predictor
    coords, labels, mask = tap.last_prompt
    np.testing.assert_allclose(coords, clicks - [x0, y0])  # the clicks in the crop's frame
    brought = mask_prompt(model, paste_logits(model, previous, whole, gt.shape)[0], zoom.last_crop)
    np.testing.assert_allclose(mask, brought, atol=1e-4)  # the previous mask brought to the crop
    gts, valid = low_res_targets(tap, gt[None, y0:y1, x0:x1], np.zeros((1, y1 - y0, x1 - x0), bool))
    pts = torch.as_tensor(tap.transform.apply_coords(coords, tap.original_size)).float()[None]
    low_res, _ = tap.predict_low_res(pts, torch.as_tensor(labels)[None], None, torch.as_tensor(mask)[None], False)
    expected = mask_iou(low_res[:, 0].float(), gts, valid).item()
    assert recorder.ious[0] == pytest.approx(expected, abs=0.02)
    recorder.losses[0].backward()
    assert model.correction_decoder.conv_m0.weight.grad.abs().sum() > 0


def test_keep_first_answers_teaches_zoom_ins_first_crop_the_base_decoders_answer():
    """With a teacher the first click's answer asked again on its crop is trained towards the teacher's answer (here
    the decoder itself: its answer is its own target), not the object; a later click still against the object."""
    model = _base()
    image = _image()
    gt = _gt(image)
    zoom = ZoomInPredictor(PromptTap(model))
    teacher = copy.deepcopy(model.correction_decoder).eval()
    ious = []
    for first_teacher in (teacher, None):
        zoom.set_image(image)
        recorder = ZoomCorrections(zoom, gt, np.zeros_like(gt), LossConfig(), bf16=False, first_teacher=first_teacher)
        click_object(recorder, gt, None, 2)
        assert len(recorder.ious) == 2
        ious.append(recorder.ious)
    assert ious[0][0] > 0.97 and ious[1][0] < 0.9  # the teacher's answer, not the object
    assert ious[0][1] == pytest.approx(ious[1][1], abs=1e-6)  # the second click: the object either way


def test_training_moves_only_the_correction_decoder_keeps_the_skip_off_the_mask_and_resumes(tmp_path):
    base = _base()
    _folder(tmp_path / "data")
    save_model(base, tmp_path / "base.safetensors")
    cfg = CorrectionTrainConfig(
        out_dir=str(tmp_path / "run"), base_model=str(tmp_path / "base.safetensors"),
        train_data=[{"root": str(tmp_path / "data")}], images=4, images_per_step=2, save_every=2, max_clicks=4,
        lr=1e-3, warmup_steps=1, half=False, min_object_area=20,
    )
    out = train_correction_decoder(cfg, progress=False)
    model = load_model(out, text_head=None)
    after, before = model.state_dict(), base.state_dict()
    moved = [k for k in before if not torch.equal(after[k], before[k])]
    assert moved and all(k.startswith("correction_decoder.") for k in moved)
    conv = model.correction_decoder.conv_m0.weight
    assert conv[:, MASK_MAP].abs().max() == 0 and "correction_decoder.conv_m0.weight" in moved
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["images"] == 4
    train_correction_decoder(dataclasses.replace(cfg, images=6, zoom_fraction=1.0), progress=False)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["images"] == 6
    resumed = load_model(out, text_head=None).state_dict()
    moved = [k for k in after if not torch.equal(resumed[k], after[k])]
    assert moved and all(k.startswith("correction_decoder.") for k in moved)  # zoom-in's crops train it too


def test_bad_options_and_models_are_one_line_errors(tmp_path):
    data = [{"root": str(tmp_path)}]
    for bad in ({"min_clicks": 1}, {"max_clicks": 1}, {"images_per_step": 3, "save_every": 4}, {"train_data": []},
                {"lr": 0}, {"zoom_fraction": 1.5},
                {"keep_first_answers": True}):
        with pytest.raises(SegAnyError):
            CorrectionTrainConfig(**{"train_data": data, **bad})
    _folder(tmp_path / "data")
    save_model(_dense_high_res_model(), tmp_path / "plain.safetensors")
    cfg = CorrectionTrainConfig(base_model=str(tmp_path / "plain.safetensors"), out_dir=str(tmp_path / "run"),
                                train_data=[{"root": str(tmp_path / "data")}])
    with pytest.raises(SegAnyError, match="no correction decoder"):
        train_correction_decoder(cfg, progress=False)
