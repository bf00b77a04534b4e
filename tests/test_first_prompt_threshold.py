"""``SamConfig.first_prompt_threshold``: where the refined answers to prompts without a mask input are cut."""

from __future__ import annotations

import numpy as np

from segany.automatic_mask_generator import SamAutomaticMaskGenerator
from segany.checkpoint import load_model, save_model
from segany.cli import main
from segany.modeling.build import with_point_refiner, with_settings
from segany.predictor import SamPredictor
from segany.zoom_in import ZoomInPredictor
from tests.test_point_refiner import POINT, _image, _model

CUT = -0.5


def _predictor(model) -> SamPredictor:
    predictor = SamPredictor(model)
    predictor.set_image(_image())
    return predictor


def _answer(predictor, **prompt) -> tuple[np.ndarray, np.ndarray]:
    """The binary mask and the logits of one single-mask answer."""
    binary = predictor.predict(multimask_output=False, **prompt)[0][0]
    logits = predictor.predict(multimask_output=False, return_logits=True, **prompt)[0][0]
    return binary, logits


def test_refined_first_answers_are_cut_at_the_first_prompt_threshold_and_corrections_at_sams():
    model = with_settings(_model(True), first_prompt_threshold=CUT)
    predictor = _predictor(model)
    binary, logits = _answer(predictor, point_coords=POINT[0], point_labels=POINT[1])
    assert ((logits > CUT) != (logits > 0)).any()  # the two cuts differ on this answer
    assert np.array_equal(binary, logits > CUT)
    box = np.array([20, 10, 120, 90])
    binary, logits = _answer(predictor, box=box)
    assert np.array_equal(binary, logits > CUT)
    low_res = predictor.predict(*POINT, multimask_output=False)[2]
    binary, logits = _answer(predictor, point_coords=POINT[0], point_labels=POINT[1], mask_input=low_res)
    assert ((logits > CUT) != (logits > 0)).any()
    assert np.array_equal(binary, logits > 0)  # a correction: SAM's threshold
    # zoom-in answers a first click on the whole image exactly as the predictor does, and cuts it at the same
    # logit when it answers it again on a crop around that mask (with the mask as its mask input; this random
    # model's masks cover the image, so the crop is the whole image)
    zoom = ZoomInPredictor(_predictor(model), refine_first=False)
    zoom.set_image(_image())
    first = _answer(predictor, point_coords=POINT[0], point_labels=POINT[1])[0]
    assert np.array_equal(zoom.predict(*POINT, multimask_output=False)[0][0], first)
    zoom = ZoomInPredictor(_predictor(model))
    zoom.set_image(_image())
    binary, logits = _answer(zoom, point_coords=POINT[0], point_labels=POINT[1])
    assert ((logits > CUT) != (logits > 0)).any()
    assert np.array_equal(binary, logits > CUT)


def test_unrefined_answers_keep_sams_threshold():
    model = with_settings(_model(True), first_prompt_threshold=CUT)
    for predictor in (_predictor(with_point_refiner(model, None)), _unrefined(model)):
        binary, logits = _answer(predictor, point_coords=POINT[0], point_labels=POINT[1])
        assert np.array_equal(binary, logits > 0)
    # an image the input enlarges past the point refiner's limit, with no crop refiner: left unrefined
    predictor = SamPredictor(model)
    predictor.set_image(_image(48, 60))
    binary, logits = _answer(predictor, point_coords=np.array([[20, 16]]), point_labels=np.array([1]))
    assert ((logits > CUT) != (logits > 0)).any()
    assert np.array_equal(binary, logits > 0)


def _unrefined(model) -> SamPredictor:
    """A predictor given the embedding without the pixels the refiner reads."""
    full = _predictor(model)
    predictor = SamPredictor(model)
    predictor.set_embedding(full.get_image_embedding(), full.original_size, full.input_size,
                            decoder_inputs=full.get_decoder_inputs())
    return predictor


def test_everything_cuts_its_refined_masks_at_the_first_prompt_threshold():
    opts = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    model = _model(True)
    at_zero = SamAutomaticMaskGenerator(model, **opts).generate(_image())
    lower = SamAutomaticMaskGenerator(with_settings(model, first_prompt_threshold=CUT), **opts).generate(_image())
    assert len(lower) == len(at_zero) > 0
    pairs = [(a["segmentation"], b["segmentation"]) for a, b in zip(at_zero, lower)]
    assert all(np.all(b[a]) for a, b in pairs)  # the same logits cut lower: each mask grows or stays
    assert sum(int(b.sum() - a.sum()) for a, b in pairs) > 0


def test_convert_sets_the_threshold_and_keeps_the_weights(tmp_path, capsys):
    model = _model(True)
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_model(model, src)
    assert main(["convert", str(src), str(dst), "--first-prompt-threshold", "-0.5"]) == 0
    back = load_model(dst, text_head=None)
    assert back.config.first_prompt_threshold == CUT
    assert load_model(src, text_head=None).config.first_prompt_threshold == 0
    for k, v in model.state_dict().items():
        assert np.array_equal(back.state_dict()[k].numpy(), v.numpy()), k
    capsys.readouterr()
    for bad in ("nan", "inf"):
        assert main(["convert", str(src), str(tmp_path / "x.safetensors"), "--first-prompt-threshold", bad]) == 2
        err = capsys.readouterr().err
        assert "--first-prompt-threshold must be a finite number" in err and "Traceback" not in err
        assert not (tmp_path / "x.safetensors").exists()
