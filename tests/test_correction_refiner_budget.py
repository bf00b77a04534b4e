"""``SamConfig.correction_refiner_budget``: how many pixels the point refiner corrects in answers to prompts with a
mask input (first prompts keep the refiner's own budget)."""

from __future__ import annotations

import numpy as np

from segany.checkpoint import load_model, save_model
from segany.cli import main
from segany.modeling.build import with_point_refiner, with_settings
from segany.predictor import SamPredictor
from tests.test_point_refiner import POINT, _image, _model

FIRST = 100  # the refiner's own budget in these tests (first prompts)


def _changed(model, mask_input: np.ndarray | None) -> tuple[int, int]:
    """Pixels the refiner changed in one single-mask answer to ``POINT`` (with ``mask_input``), and the answer's
    uncertain pixels (the refiner's candidates)."""
    logits = []
    for m in (model, with_point_refiner(model, None)):
        predictor = SamPredictor(m)
        predictor.set_image(_image())
        answer = predictor.predict(*POINT, mask_input=mask_input, multimask_output=False, return_logits=True)
        logits.append(answer[0][0])
    refined, plain = logits
    return int((refined != plain).sum()), int((np.abs(plain) < model.point_refiner.threshold).sum())


def _model_with(budget: int):
    model = with_settings(_model(True), correction_refiner_budget=budget)
    model.point_refiner.budget = FIRST
    return model


def test_corrections_are_refined_on_their_own_budget_and_first_prompts_on_the_refiners():
    model = _model_with(300)
    predictor = SamPredictor(model)
    predictor.set_image(_image())
    low_res = predictor.predict(*POINT, multimask_output=False)[2]
    changed, uncertain = _changed(model, None)
    assert changed == FIRST < uncertain  # a first prompt: the refiner's own budget
    changed, uncertain = _changed(model, low_res)
    assert changed == 300 < uncertain  # a correction: the model's setting
    changed, uncertain = _changed(_model_with(0), low_res)
    assert changed == uncertain > 300  # 0: every uncertain pixel


def test_convert_sets_the_budget_and_keeps_the_weights(tmp_path, capsys):
    model = _model(True)
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_model(model, src)
    assert main(["convert", str(src), str(dst), "--correction-refiner-budget", "8192"]) == 0
    assert "corrections refined on 8192 pixels" in capsys.readouterr().out
    back = load_model(dst, text_head=None)
    assert back.config.correction_refiner_budget == 8192
    assert load_model(src, text_head=None).config.correction_refiner_budget == 2048
    for k, v in model.state_dict().items():
        assert np.array_equal(back.state_dict()[k].numpy(), v.numpy()), k
    assert main(["convert", str(src), str(tmp_path / "x.safetensors"), "--correction-refiner-budget", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--correction-refiner-budget must be 0 (all) or more" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()
