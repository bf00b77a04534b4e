"""A refining predictor returns the refined answer's low-res logits (the next prompt's mask input): the decoder's,
cut where the answer is cut, plus the area mean of every refined pixel's change (both refiners'); the ones a
model without a refiner returns are unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segany.modeling.build import with_point_refiner, with_second_refiner, with_settings
from segany.modeling.point_refiner import add_to_cells
from segany.predictor import SamPredictor
from tests.test_point_refiner import POINT, _image, _model

LATER = (np.array([[70, 45], [150, 120]]), np.array([1, 0]))


@pytest.mark.parametrize("original", [(48, 56), (12, 14), (24, 28)])
def test_add_to_cells_adds_the_area_mean_of_the_changes(original):
    """Each cell gains the mean change over the input pixels it spans (the original frame resized to the input)."""
    g, (h, w) = 8, (24, 28)  # the input's 6 x 7 cells of an 8 x 8 grid; the rest is padding
    rng = np.random.default_rng(0)
    flat = rng.choice(original[0] * original[1], size=original[0] * original[1] // 3, replace=False)
    ys, xs = torch.from_numpy(flat // original[1]), torch.from_numpy(flat % original[1])
    change = torch.from_numpy(rng.normal(size=len(flat))).float()
    cells = torch.zeros(g, g)
    add_to_cells(cells, ys, xs, change, (h, w), original)
    dense = torch.zeros(1, 1, *original)
    dense[0, 0, ys, xs] = change
    expected = F.avg_pool2d(F.interpolate(dense, size=(h, w), mode="area"), 4)[0, 0]
    torch.testing.assert_close(cells[: h // 4, : w // 4], expected, atol=1e-5, rtol=1e-4)
    assert cells[h // 4 :].abs().sum() == 0 and cells[:, w // 4 :].abs().sum() == 0


def _answer(model, image, *prompt, mask_input=None):
    """Logits and low-res logits of one mask answering ``prompt``."""
    predictor = SamPredictor(model)
    predictor.set_image(image)
    logits, _, low = predictor.predict(*prompt, mask_input=mask_input, multimask_output=False, return_logits=True)
    return logits, low, predictor


def _area_means(change: np.ndarray, input_hw: tuple[int, int], g: int) -> np.ndarray:
    """``1 x H x W`` changes of logit as the ``1 x g x g`` mask grid's area means (zero on the padding)."""
    h, w = input_hw
    resized = F.interpolate(torch.from_numpy(change)[None], size=(h, w), mode="area")
    out = torch.zeros(1, g, g)
    out[:, : h // 4, : w // 4] = F.avg_pool2d(resized, 4)[0]
    return out.numpy()


def test_a_refined_answer_returns_its_own_low_res_logits():
    image = _image(192, 256)  # the tiny model's input halves it: every cell spans 8 x 8 pixels exactly
    model = with_settings(_model(True), first_prompt_threshold=-0.5)
    plain = with_point_refiner(model, None)  # the same decoder, no refiner
    refined, low, predictor = _answer(model, image, *POINT)
    coarse, coarse_low, _ = _answer(plain, image, *POINT)
    g, input_hw = low.shape[-1], predictor.input_size
    assert predictor.answer_threshold(first_prompt=True) == -0.5
    change = refined - coarse
    assert np.abs(change).max() > 0.1  # the refiner moved some pixels
    expected = coarse_low + 0.5 + _area_means(change, input_hw, g)  # the first answer is cut at -0.5
    np.testing.assert_allclose(low, expected, atol=1e-4)
    # a later click: the point refiner's and the second refiner's changes both, cut at 0
    second = with_second_refiner(model, _model(True, seed=1).point_refiner)
    later, later_low, _ = _answer(second, image, *LATER, mask_input=coarse_low)
    later_coarse, later_coarse_low, _ = _answer(plain, image, *LATER, mask_input=coarse_low)
    only_point = _answer(model, image, *LATER, mask_input=coarse_low)[0]
    assert np.abs(later - only_point).max() > 0.1  # the second refiner moved some pixels too
    expected = later_coarse_low + _area_means(later - later_coarse, input_hw, g)
    np.testing.assert_allclose(later_low, expected, atol=1e-4)
    # an untrained refiner changes no pixel: the decoder's low-res logits, shifted to the answer's cut
    fresh = _answer(with_point_refiner(model, "new"), image, *POINT)[1]
    np.testing.assert_allclose(fresh, coarse_low + 0.5, atol=1e-5)
