"""The second refiner (SamConfig.second_refiner): it refines the point refiner's answers to prompts with a mask input
again, and nothing else (first prompts, zoom-in's crops); an untrained one changes nothing; it travels in the model
file, goes with the point refiner it was trained after, and is trained by `segany train-refiner` with `second`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from segany.checkpoint import infer_config, load_model, save_model
from segany.cli import main
from segany.errors import SegAnyError
from segany.modeling import build_sam
from segany.modeling.build import with_crop_refiner, with_point_refiner, with_second_refiner, with_settings
from segany.predictor import SamPredictor
from segany.training.refiner_train import ClickRecorder, train_point_refiner
from segany.zoom_in import ZoomInPredictor
from tests.test_point_refiner import POINT, _image, _model, _refiner_run

LATER = (np.array([[70, 45], [150, 120]]), np.array([1, 0]))


def _answers(model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A first click's logits, and a second click's with the first answer's low-res logits as its mask input, and
    those low-res logits."""
    predictor = SamPredictor(model)
    predictor.set_image(_image())
    first, _, low = predictor.predict(*POINT, multimask_output=False, return_logits=True)
    later = predictor.predict(*LATER, mask_input=low, multimask_output=False, return_logits=True)[0]
    return first[0], later[0], low


def test_a_second_refiner_refines_only_the_point_refiners_answers_to_later_prompts():
    point = _model(True, seed=0)
    other = _model(True, seed=1).point_refiner
    model = with_second_refiner(point, other)
    assert model.config.second_refiner and model.second_refiner.max_upscale == point.point_refiner.max_upscale
    first, later, _ = _answers(point)
    first2, later2, _ = _answers(model)
    np.testing.assert_allclose(first2, first, atol=1e-5)  # a first prompt: the point refiner's answer
    changed = np.abs(later2 - later) > 1e-4
    assert changed.any()
    assert np.all(np.abs(later[changed]) < other.threshold)  # only the refined answer's uncertain pixels move
    # an untrained second refiner changes nothing (its last layer starts at zero)
    np.testing.assert_allclose(_answers(with_second_refiner(point, "new"))[1], later, atol=1e-5)
    # zoom-in's crops are the crop refiner's: the second refiner, trained after the point refiner, is not applied
    box = np.array([120, 100, 189, 139])

    def zoomed(m):
        zoom = ZoomInPredictor(SamPredictor(m), box_min_zoom=0, min_side=20)
        zoom.set_image(_image())
        low = zoom.predict(box=box, multimask_output=False)[2]
        click = np.array([[150, 120]]), np.array([1])
        out = zoom.predict(*click, box=box, mask_input=low, multimask_output=False, return_logits=True)[0]
        return out, zoom.last_crop

    with_crop = with_crop_refiner(point, _model(True, seed=2).point_refiner)
    (ours, crop), (theirs, _) = zoomed(with_second_refiner(with_crop, other)), zoomed(with_crop)
    assert crop != (0, 0, 200, 150)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_the_second_refiner_travels_in_the_file_and_goes_with_its_point_refiner(tmp_path):
    point = _model(True, seed=0)
    model = with_second_refiner(point, _model(True, seed=1).point_refiner)
    save_model(model, tmp_path / "m.safetensors")
    back = load_model(tmp_path / "m.safetensors", text_head=None)
    assert back.config.second_refiner and infer_config(back.state_dict(), 128).second_refiner
    np.testing.assert_allclose(_answers(back)[1], _answers(model)[1], atol=1e-5)
    # another point refiner, or none: the second refiner (trained on the old one's answers) goes with it
    for replaced in (with_point_refiner(model, _model(True, seed=2).point_refiner), with_point_refiner(model, None)):
        assert replaced.second_refiner is None and not replaced.config.second_refiner
    with pytest.raises(SegAnyError, match="point refiner"):
        with_second_refiner(with_point_refiner(model, None), "new")
    with pytest.raises(ValueError, match="second_refiner needs point_refiner"):
        build_sam(dataclasses.replace(model.config, point_refiner=False))


def test_training_writes_the_base_model_with_a_trained_second_refiner(tmp_path, capsys):
    base = _model(True)
    cfg = _refiner_run(tmp_path, base, second=True, box_fraction=0.0, min_clicks=2, max_clicks=3)
    model = load_model(train_point_refiner(cfg, progress=False), text_head=None)
    assert model.config.second_refiner and model.second_refiner.mlp[-1].weight.abs().sum() > 0  # trained
    for k, v in base.state_dict().items():  # the base model, its point refiner included, is unchanged
        torch.testing.assert_close(model.state_dict()[k], v)
    save_model(with_point_refiner(base, None), tmp_path / "plain.safetensors")
    bad = tmp_path / "bad.yaml"
    for option, word in (
        (f"base_model: {tmp_path / 'plain.safetensors'}", "has none"),  # nothing for a second refiner to follow
        ("zoom_fraction: 0.5", "zoom_fraction"),
        ("hidden: 32", "hidden"),
        ("min_clicks: 4\nmax_clicks: 3", "min_clicks"),
    ):
        bad.write_text(f"train_data: [{{root: {tmp_path / 'data'}}}]\nsecond: true\nimages: 1\n{option}\n")
        assert main(["train-refiner", "--config", str(bad)]) != 0
        err = capsys.readouterr().err.strip()
        assert word in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_training_clicks_follow_the_answers_as_the_predictor_cuts_them():
    model = with_settings(_model(True), first_prompt_threshold=-3.0)
    predictor = SamPredictor(model)
    predictor.set_image(_image())
    recorder = ClickRecorder(predictor)
    first = recorder.predict(point_coords=POINT[0], point_labels=POINT[1], mask_input=None, multimask_output=True)
    want = predictor.predict(*POINT, multimask_output=True)
    np.testing.assert_array_equal(first[0], want[0])  # cut at the first prompt's threshold, as a user sees it
    assert (first[0] != (recorder.answers[0][0] > 0)).any()  # (which is not SAM's 0 here)
    low = first[2][int(np.argmax(first[1]))][None]
    later = recorder.predict(point_coords=LATER[0], point_labels=LATER[1], mask_input=low, multimask_output=False)
    np.testing.assert_array_equal(later[0], predictor.predict(*LATER, mask_input=low, multimask_output=False)[0])
