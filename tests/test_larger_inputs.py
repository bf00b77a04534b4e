"""``max_image_size``: a larger image encoded on a larger grid by the same weights (the default model's
convolutional encoder), chosen per image by the predictor, and kept off where one grid is needed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from segany.automatic import SamAutomaticMaskGenerator
from segany.checkpoint import load_model, save_model
from segany.checkpoint_convert import with_image_size
from segany.errors import SegAnyError
from segany.modeling import build_sam, get_config
from segany.modeling.build import at_image_size, input_side
from segany.predictor import SamPredictor
from segany.zoom_in import ZoomInPredictor


def default_like(image_size: int = 128, max_image_size: int | None = 192):
    """The shipped default's architecture (dense prompts, high-resolution features) at a small input size."""
    cfg = dataclasses.replace(get_config("segany_default_v3"), image_size=image_size, max_image_size=max_image_size)
    torch.manual_seed(0)
    return build_sam(cfg).eval()


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_input_side_rule():
    model = default_like()
    assert [input_side(model, h, w) for h, w in [(100, 120), (128, 60), (150, 90), (129, 10), (300, 200)]] == [
        128, 128, 160, 160, 192
    ]
    assert input_side(default_like(max_image_size=None), 300, 200) == 128


def test_config_checks():
    with pytest.raises(ValueError, match="max_image_size"):
        build_sam(dataclasses.replace(get_config("tiny_test"), max_image_size=256))  # a ViT: one grid
    for cap in (96, 200):  # below the input size; not a multiple of 32
        with pytest.raises(ValueError, match="max_image_size"):
            default_like(max_image_size=cap)


def test_larger_image_on_a_larger_grid_with_the_same_weights():
    model = default_like()
    predictor = SamPredictor(model)
    pts, labels = np.array([[60, 50], [120, 90]]), np.array([1, 0])
    predictor.set_image(image(150, 170))
    assert predictor.model is not model and predictor.model.image_size == 192
    assert predictor.get_image_embedding().shape[-2:] == (12, 12) and predictor.input_size == (169, 192)
    enc = predictor.model.image_encoder
    assert enc.stem.weight.data_ptr() == model.image_encoder.stem.weight.data_ptr()  # shared, not copied
    masks, scores, low = predictor.predict(pts, labels)
    assert masks.shape == (3, 150, 170) and low.shape == (3, 48, 48)
    # the same as a model converted to that input size
    fixed = SamPredictor(with_image_size(model, 192, None))
    fixed.set_image(image(150, 170))
    want, want_scores, want_low = fixed.predict(pts, labels)
    torch.testing.assert_close(torch.from_numpy(low), torch.from_numpy(want_low), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(scores), torch.from_numpy(want_scores), rtol=1e-4, atol=1e-4)
    assert (masks != want).mean() < 1e-3
    # the previous mask goes back on the same grid
    again, _, _ = predictor.predict(pts, labels, mask_input=low[:1], multimask_output=False)
    assert again.shape == (1, 150, 170)
    # a small image: the given model, its own grid
    predictor.set_image(image(90, 100))
    assert predictor.model is model and predictor.predict(pts[:1], labels[:1])[2].shape == (3, 32, 32)


def test_embeddings_and_transformed_images_of_a_larger_grid():
    model = default_like()
    source = SamPredictor(model)
    source.set_image(image(150, 170))
    want = source.predict(np.array([[60, 50]]), np.array([1]))[2]
    reused = SamPredictor(model)  # an embedding cache's path: the grid is read off the embedding
    reused.set_embedding(source.get_image_embedding(), (150, 170), decoder_inputs=source.get_decoder_inputs())
    assert reused.model.image_size == 192
    torch.testing.assert_close(torch.from_numpy(reused.predict(np.array([[60, 50]]), np.array([1]))[2]),
                               torch.from_numpy(want))
    torch_path = SamPredictor(model)
    torch_path.set_torch_image(torch.zeros(1, 3, 160, 141), (150, 132))
    assert torch_path.model.image_size == 160
    with pytest.raises(SegAnyError, match="longest side"):
        torch_path.set_torch_image(torch.zeros(1, 3, 224, 200), (224, 200))  # above max_image_size


def test_zoom_in_and_everything_follow_the_grid():
    model = default_like()
    zoom = ZoomInPredictor(SamPredictor(model))
    zoom.set_image(image(150, 170))
    masks, _, _ = zoom.predict(np.array([[60, 50]]), np.array([1]))
    assert zoom.model is zoom.predictor.model and masks.shape[-2:] == (150, 170)
    generator = SamAutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0)
    records = generator.generate(image(150, 170))
    assert generator.predictor.model.image_size == 192 and records
    assert all(r["segmentation"].shape == (150, 170) for r in records)


def test_convert_sets_and_drops_the_cap(tmp_path, capsys):
    from segany.cli import main
    from segany.serve.engine import ServedModel

    src, dst, off = tmp_path / "m.safetensors", tmp_path / "cap.safetensors", tmp_path / "off.safetensors"
    save_model(default_like(max_image_size=None), src)
    assert main(["convert", str(src), str(dst), "--max-image-size", "192"]) == 0
    assert "larger images up to 192" in capsys.readouterr().out
    capped = load_model(dst)
    assert capped.config.max_image_size == 192 and capped.image_size == 128
    assert main(["convert", str(dst), str(off), "--max-image-size", "0"]) == 0
    assert load_model(off).config.max_image_size is None
    assert main(["convert", str(dst), str(off), "--image-size", "256"]) == 0  # above the cap: dropped
    assert load_model(off).config.max_image_size is None
    capsys.readouterr()
    assert main(["convert", str(src), str(off), "--max-image-size", "100"]) == 2
    err = capsys.readouterr().err
    assert "max image size 100" in err and "Traceback" not in err
    # the server's page decodes with one ONNX decoder: one grid there, the same weights
    served = ServedModel(capped)
    assert served.model.config.max_image_size is None and served.image_size == 128
    assert served.model.image_encoder.stem.weight.data_ptr() == capped.image_encoder.stem.weight.data_ptr()
    served.close()


def test_at_image_size_keeps_mode_and_head():
    model = default_like().train()
    moved = at_image_size(model, 160, 192)
    assert moved.training and moved.config.max_image_size == 192
    assert all(a is b for a, b in zip(moved.parameters(), model.parameters()))
    from segany.modeling.fast import FastSam

    plain = build_sam(model.config, fast=False)  # the plain modules stay plain on another grid
    assert isinstance(moved, FastSam) and type(at_image_size(plain, 160, 192)) is type(plain)


def test_a_larger_grid_keeps_the_speed_mode():
    from segany.perf import bf16_supported, optimize

    if not bf16_supported("cpu"):
        pytest.skip("no native bf16 on this CPU")
    model = optimize(default_like(), "bf16")  # its convolution weights now stored in bf16
    predictor = SamPredictor(model)
    predictor.set_image(image(150, 170))
    assert predictor.model.image_size == 192 and predictor.model.speed_mode == ("bf16", False)
    masks, scores, _ = predictor.predict(np.array([[60, 50]]), np.array([1]))
    assert masks.shape == (3, 150, 170) and np.isfinite(scores).all()


def test_zoom_in_crops_on_their_own_grid():
    """The whole image on the capped grid, a crop of it on the model's own: the previous mask goes from one
    grid to the other (as a mask prompt, and as remembered low-res logits)."""
    from segany.zoom_in import paste_logits

    model = default_like()
    img = image(300, 340)
    crop = (100, 80, 200, 190)
    on_crop = SamPredictor(model)
    on_crop.set_image(np.ascontiguousarray(img[80:190, 100:200]))
    low = on_crop.predict(np.array([[50, 50]]), np.array([1]))[2]
    assert on_crop.model is model and low.shape[-1] == 32  # the crop on the 128-px grid
    zoom = ZoomInPredictor(SamPredictor(model), min_side=40)
    zoom.set_image(img)
    assert zoom.model.image_size == 192  # the whole image on the capped grid
    zoom.remember(crop, low)
    np.testing.assert_allclose(zoom._last[2], paste_logits(model, low, crop, (300, 340)), rtol=1e-5, atol=1e-4)
    # a mask of the whole image sent back as the prompt of a crop: brought to the crop's grid
    best = np.full((300, 340), -20.0, np.float32)
    best[120:160, 130:170] = 20.0
    masks, _, low2 = zoom._predict_on(crop, np.array([[150, 140]], np.float32), np.array([1]), None, best, False, False)
    assert masks.shape == (1, 300, 340) and low2.shape == (1, 32, 32) and zoom.model is model
