"""A model that does not decode the input's padding (``SamConfig.decode_padding`` False)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from segany.modeling import build_sam
from segany.modeling.low_res import decoded_region, edge_beyond, low_res_rows
from segany.predictor import SamPredictor
from tests.test_efficientnet import tiny_config

POINT = (np.array([[60, 30]]), np.array([1]))


def _model(decode_padding: bool, fast: bool = True, correction: bool = False):
    """A tiny model with high-res features; ``correction``: with a correction decoder whose skip at the mask grid
    reads the four prompt maps (the default's layout)."""
    torch.manual_seed(0)
    skip = dict(dense_prompts=True, mask_skip=True, mask_skip_prompts=True) if correction else {}
    cfg = dataclasses.replace(
        tiny_config(16), high_res_features=True, decode_padding=decode_padding, correction_decoder=correction, **skip
    )
    model = build_sam(cfg, fast=fast).eval()
    with torch.no_grad():
        model.mask_decoder.conv_s0.weight.normal_(0, 0.5)
        if correction:
            model.correction_decoder.conv_m0.weight.normal_(0, 0.5)
    return model


def _image(h: int = 60, w: int = 150) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    img[10:40, 40:90] = (230, 200, 40)
    return img


def _predict(model, image, **kwargs):
    predictor = SamPredictor(model)
    predictor.set_image(image)
    return predictor, predictor.predict(*POINT, return_logits=True, **kwargs)


def test_the_region_is_what_the_post_processing_reads():
    assert low_res_rows(100, 64, 256) == 26  # 25 rows cover 100 pixels at 4 a row, and bilinear reads one more
    assert decoded_region((100, 256), (16, 16), 256) == (7, 16)
    assert decoded_region((256, 256), (16, 16), 256) == (16, 16)
    x = torch.arange(2 * 8 * 12, dtype=torch.float).view(2, 8, 12)
    y = edge_beyond(x, (1, 2))
    assert y.shape == x.shape and torch.equal(y[:, :4, :8], x[:, :4, :8])
    assert torch.equal(y[:, 4:, :8], x[:, 3:4, :8].expand(-1, 4, -1))
    assert torch.equal(y[:, :, 8:], y[:, :, 7:8].expand(-1, -1, 4))


@pytest.mark.parametrize("multimask", [False, True])
def test_masks_are_the_same_and_the_padding_is_the_edge(multimask):
    image = _image()
    full, (masks, iou, low) = _predict(_model(True), image, multimask_output=multimask)
    pred, (masks2, iou2, low2) = _predict(_model(False), image, multimask_output=multimask)
    region = pred.model.decoder_region(pred.input_size)
    rows, cols = 4 * region[0], 4 * region[1]
    assert rows < low.shape[-2]  # the wide image leaves padding rows
    np.testing.assert_allclose(masks2, masks, atol=1e-4)  # the post-processing reads only the region
    np.testing.assert_allclose(iou2, iou, atol=1e-5)
    np.testing.assert_allclose(low2[:, :rows, :cols], low[:, :rows, :cols], atol=1e-4)
    assert np.array_equal(low2[:, rows:, :], np.repeat(low2[:, rows - 1 : rows, :], low.shape[-2] - rows, 1))
    assert not np.allclose(low2[:, rows:], low[:, rows:], atol=1e-2)  # SAM's own padding logits differ


def test_the_plain_and_the_fast_decoders_agree_on_first_clicks_and_corrections():
    image = _image()
    fast, plain = _model(False, correction=True), _model(False, fast=False, correction=True)
    plain.load_state_dict(fast.state_dict())
    _, first = _predict(fast, image, multimask_output=False)
    _, first_plain = _predict(plain, image, multimask_output=False)
    for a, b in zip(first, first_plain):
        np.testing.assert_allclose(a, b, atol=1e-4)
    later = dict(mask_input=first[2], multimask_output=False)
    for a, b in zip(_predict(fast, image, **later)[1], _predict(plain, image, **later)[1]):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_sams_batched_interface_gives_the_predictors_answer():
    model, image = _model(False), _image()
    pred, (masks, iou, low) = _predict(model, image, multimask_output=False)
    coords = torch.as_tensor(pred.transform.apply_coords(POINT[0], pred.original_size), dtype=torch.float)
    record = {
        "image": pred.transform.apply_image_torch(torch.as_tensor(image).permute(2, 0, 1)[None].float())[0],
        "original_size": image.shape[:2],
        "point_coords": coords[None],
        "point_labels": torch.as_tensor(POINT[1])[None],
    }
    with torch.no_grad():
        out = pred.model([record], multimask_output=False)[0]
    np.testing.assert_allclose(out["low_res_logits"][0].numpy(), low, atol=1e-3)


def test_decode_padding_needs_the_decoder_that_takes_a_region():
    with pytest.raises(ValueError, match="decode_padding"):
        build_sam(dataclasses.replace(tiny_config(16), decode_padding=False))


def test_convert_sets_and_clears_decode_padding(capsys, tmp_path, tiny_checkpoint):
    from segany.checkpoint import load_model, save_model
    from tests.test_cli import run_cli

    src, dst, back = tmp_path / "src.safetensors", tmp_path / "nopad.safetensors", tmp_path / "pad.safetensors"
    save_model(_model(True), src)
    code, _, err = run_cli(capsys, "convert", src, dst, "--no-decode-padding")
    assert code == 0, err
    converted = load_model(dst, text_head=None)
    assert converted.config.decode_padding is False
    for k, v in load_model(src, text_head=None).state_dict().items():
        torch.testing.assert_close(converted.state_dict()[k], v)
    image = _image()
    np.testing.assert_allclose(_predict(converted, image)[1][2], _predict(_model(False), image)[1][2], atol=1e-5)
    assert run_cli(capsys, "convert", dst, back, "--decode-padding")[0] == 0
    assert load_model(back, text_head=None).config.decode_padding is True
    code, _, err = run_cli(capsys, "convert", tiny_checkpoint, tmp_path / "x.safetensors", "--no-decode-padding")
    assert code != 0 and "decode_padding" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
