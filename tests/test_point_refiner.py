"""The point refiner (SamConfig.point_refiner): it corrects only the uncertain pixels of the upsampled masks, at
most its budget of them, from the image's own pixels; an untrained one changes nothing; it travels in the model
file, through cached embeddings, the "everything" generator, and its own training command."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segany.automatic_mask_generator import SamAutomaticMaskGenerator
from segany.checkpoint import infer_config, load_model, save_model
from segany.cli import main
from segany.errors import SegAnyError
from segany.modeling import build_sam
from segany.modeling.build import with_crop_refiner, with_point_refiner
from segany.modeling.fast.point_refiner import FastPointRefiner
from segany.modeling.point_refiner import (
    PIXEL_PAD,
    PointRefiner,
    RefinerImage,
    RefinerPrompts,
    _colour_likelihoods,
    _prompt_geometry,
)
from segany.predictor import SamPredictor
from segany.training.refiner_train import (
    RefinerTrainConfig,
    _buffer_schedule,
    _learning_rate,
    fit_points,
    train_point_refiner,
    zoomed_mask,
)
from segany.zoom_in import ZoomInPredictor
from tests.test_efficientnet import tiny_config

POINT = (np.array([[70, 45]]), np.array([1]))


def _image(h: int = 150, w: int = 200, seed: int = 0) -> np.ndarray:
    """A noisy background with a bright disc: edges for the refiner to look at."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[(yy - h // 3) ** 2 + (xx - w // 3) ** 2 < (h // 4) ** 2] = (230, 200, 40)
    return img


def _model(trained: bool, seed: int = 0):
    """A tiny model with high-res features and a point refiner: fresh (an identity) or with random weights."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(tiny_config(16), high_res_features=True, point_refiner=True)
    model = build_sam(cfg).eval()
    with torch.no_grad():
        model.mask_decoder.conv_s0.weight.normal_(0, 0.5)
        if trained:
            model.point_refiner.mlp[-1].weight.normal_(0, 2.0)
            model.point_refiner.mlp[-1].bias.fill_(0.5)
    return model


def _logits(model, image=None, **kwargs):
    predictor = SamPredictor(model)
    predictor.set_image(_image() if image is None else image)
    return predictor.predict(*POINT, multimask_output=False, return_logits=True, **kwargs)


def test_an_untrained_refiner_changes_nothing_and_a_trained_one_only_uncertain_pixels():
    fresh, trained = _model(False), _model(True)
    plain = with_point_refiner(fresh, None)
    assert plain.point_refiner is None and not plain.config.point_refiner
    base = _logits(plain)[0]
    np.testing.assert_allclose(_logits(fresh)[0], base, atol=1e-5)  # its last layer starts at zero
    refined = _logits(trained)[0]
    changed = np.abs(refined - base) > 1e-4
    assert changed.any()
    assert np.all(np.abs(base[changed]) < trained.point_refiner.threshold)  # only uncertain pixels move
    trained.point_refiner.budget = 100
    few = np.abs(_logits(trained)[0] - base) > 1e-4
    assert 0 < few.sum() <= 100
    predictor = SamPredictor(trained)
    predictor.set_image(_image())
    binary = predictor.predict(*POINT, multimask_output=False)[0]
    assert binary.dtype == bool and np.array_equal(binary[0], _logits(trained)[0][0] > 0)


def test_an_image_the_input_enlarges_much_is_left_unrefined():
    trained = _model(True)
    small = _image(48, 60)  # the tiny model's 128-px input enlarges it 2.13 times

    def logits(model):
        predictor = SamPredictor(model)
        predictor.set_image(small)
        return predictor.predict(np.array([[20, 16]]), np.array([1]), multimask_output=False, return_logits=True)[0]

    base = logits(with_point_refiner(trained, None))
    np.testing.assert_allclose(logits(trained), base, atol=1e-5)
    trained.point_refiner.max_upscale = 2.5
    assert (np.abs(logits(trained) - base) > 1e-4).any()


def test_a_crop_refiner_refines_the_images_the_point_refiner_leaves(tmp_path, capsys):
    point, other = _model(True, seed=0), _model(True, seed=1)
    model = with_crop_refiner(point, other.point_refiner)
    assert model.config.crop_refiner and model.crop_refiner.max_upscale == float("inf")
    alone = with_point_refiner(point, other.point_refiner, max_upscale=float("inf"))  # its refiner, no limit
    small, click = _image(48, 60), (np.array([[20, 16]]), np.array([1]))  # enlarged 2.13 times

    def logits(m, image=None, prompt=POINT):
        predictor = SamPredictor(m)
        predictor.set_image(_image() if image is None else image)
        return predictor.predict(*prompt, multimask_output=False, return_logits=True)[0]

    np.testing.assert_allclose(logits(model), logits(point), atol=1e-5)  # shrunk: the point refiner's answer
    np.testing.assert_allclose(logits(model, small, click), logits(alone, small, click), atol=1e-5)
    assert (np.abs(logits(model, small, click) - logits(point, small, click)) > 1e-4).any()
    box = np.array([120, 100, 189, 139])  # zoom-in answers it on a crop around it: the crop refiner's answer

    def zoomed(m):
        zoom = ZoomInPredictor(SamPredictor(m), box_min_zoom=0)  # its crop, though it barely enlarges this image
        zoom.set_image(_image())
        return zoom.predict(box=box, multimask_output=False, return_logits=True)[0], zoom.last_crop

    (ours, crop), (theirs, _), (points, _) = zoomed(model), zoomed(alone), zoomed(point)
    assert crop != (0, 0, 200, 150)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert (np.abs(ours - points) > 1e-4).any()
    save_model(model, tmp_path / "m.safetensors")
    back = load_model(tmp_path / "m.safetensors", text_head=None)
    assert back.config.crop_refiner and infer_config(back.state_dict(), 128).crop_refiner
    np.testing.assert_allclose(logits(back, small, click), logits(model, small, click), atol=1e-5)
    plain = with_point_refiner(model, None)  # no refiner: neither
    assert plain.crop_refiner is None and not plain.config.crop_refiner
    with pytest.raises(SegAnyError, match="point refiner"):
        with_crop_refiner(plain, other.point_refiner)
    # segany convert puts one in from another run's file; a file without a refiner is refused in one line
    save_model(point, tmp_path / "point.safetensors")
    save_model(other, tmp_path / "other.safetensors")
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(tmp_path / "point.safetensors"), str(out), "--crop-refiner",
                 str(tmp_path / "other.safetensors")]) == 0
    converted = load_model(out, text_head=None)
    torch.testing.assert_close(converted.crop_refiner.state_dict(), other.point_refiner.state_dict())
    capsys.readouterr()
    save_model(plain, tmp_path / "plain.safetensors")
    assert main(["convert", str(tmp_path / "point.safetensors"), str(out), "--crop-refiner",
                 str(tmp_path / "plain.safetensors")]) != 0
    err = capsys.readouterr().err.strip()
    assert "no point refiner" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_uncertain_pixels_are_the_most_uncertain_within_the_threshold():
    refiner = PointRefiner((16,), threshold=6.0, budget=500)
    g = torch.Generator().manual_seed(0)
    low = torch.randn(32, 32, generator=g) * 8
    logits = torch.nn.functional.interpolate(low[None, None], size=(120, 128), mode="bilinear")[0, 0]
    a = logits.abs().flatten()
    best = set(torch.topk(a, 500, largest=False).indices.tolist())
    for args in ((), (low, (120, 128))):  # a full search, and the threshold taken from the low-res grid
        ys, xs = refiner.uncertain_pixels(logits, *args)
        assert set((ys * 128 + xs).tolist()) == best
    refiner.budget = 0
    ys, xs = refiner.uncertain_pixels(logits)
    assert len(ys) == int((a < 6.0).sum())


def test_patches_at_the_border_repeat_the_edge_pixel():
    refiner = PointRefiner((4,))
    image = torch.arange(5 * 7 * 3, dtype=torch.float32).view(5, 7, 3).to(torch.uint8)
    ref = RefinerImage.of(image, torch.zeros(1, 3, 32, 32), (5, 7), refiner.pixel_mean, refiner.pixel_std)
    assert ref.pixels.shape == (3, 5 + 2 * PIXEL_PAD, 7 + 2 * PIXEL_PAD)
    logits = torch.randn(5, 7)
    ys, xs = torch.tensor([0, 4]), torch.tensor([0, 6])
    f = refiner.point_features(logits, torch.zeros(8, 8), ref, [torch.zeros(1, 4, 8, 8)], (5, 7), ys, xs)
    std, mean = refiner.pixel_std, refiner.pixel_mean
    # the first RGB patch (step 1) of the corner pixel (0, 0): red channel, offsets (-2..2, -2..2) row-major
    red = f[0, 1:26].view(5, 5) * std[0] + mean[0]
    expect = image[:, :, 0].float()[[0, 0, 0, 1, 2]][:, [0, 0, 0, 1, 2]]
    torch.testing.assert_close(red, expect, atol=1e-3, rtol=0)
    assert f.shape == (2, refiner.mlp[0].in_features)
    assert abs(f[1, 0].item() - logits[4, 6].item() / 8) < 1e-6


def test_colour_likelihoods_favour_the_masks_colours():
    grid = torch.full((3, 8, 8), 40.0)
    grid[:, 2:5, 2:5] = torch.tensor([230.0, 200.0, 40.0])[:, None, None]  # a yellow square on dark grey
    low = torch.full((8, 8), -8.0)
    low[2:5, 2:5] = 8.0  # the mask: the square
    colours = torch.tensor([[230.0, 40.0, 0.0], [200.0, 40.0, 255.0], [40.0, 40.0, 0.0]])  # yellow, grey, blue
    f = _colour_likelihoods(_grid_image(grid, (32, 32)), low, colours)
    assert f.shape == (4, 3)
    assert (f[:, 0] > 0.5).all() and (f[:, 1] < -0.5).all()  # inside's colour / outside's colour
    assert (f[:, 2].abs() < 0.5).all()  # a colour seen nowhere: no preference beyond the prior's
    assert (f.abs() <= 3).all()
    # a padded grid: cells past the image's own (h, w) do not count
    padded = torch.cat([grid, torch.full((3, 8, 4), 230.0)], 2)
    padded_low = torch.cat([low, low[:, :4]], 1)
    torch.testing.assert_close(_colour_likelihoods(_grid_image(padded, (32, 32)), padded_low, colours), f)


def _grid_image(grid: torch.Tensor, input_size: tuple[int, int]) -> RefinerImage:
    """A ``RefinerImage`` whose mask grid is ``grid`` ``3 x h x w`` (0-255; the resized image ``input_size``)."""
    mean, std = torch.zeros(3), torch.ones(3)
    x = grid.repeat_interleave(4, 1).repeat_interleave(4, 2)[None]  # an input whose 4 x 4 means are the grid
    return RefinerImage.of(torch.zeros(2, 2, 3, dtype=torch.uint8), x, input_size, mean, std)


def test_prompt_geometry_places_pixels_against_the_clicks_and_the_box():
    ys, xs = torch.tensor([10, 10, 90]), torch.tensor([10, 60, 90])
    clicks = _prompt_geometry(ys, xs, (100, 100), torch.tensor([[10.0, 10.0], [60.0, 10.0]]), torch.tensor([1, 0]))
    torch.testing.assert_close(clicks[0], torch.tensor([0.0, 1.0, 1.0]))  # the positive click, 50 px on (x 8/100)
    torch.testing.assert_close(clicks[1], torch.tensor([1.0, 0.0, 1.0]))  # the negative one
    torch.testing.assert_close(clicks[4], clicks[1])  # the last click is the negative one
    assert (clicks[5] == -1).all() and torch.allclose(clicks[6], torch.tensor(0.4)) and (clicks[[2, 3, 7]] == 0).all()
    box = _prompt_geometry(ys, xs, (100, 100), box=torch.tensor([0.0, 0.0, 20.0, 20.0]))
    assert (box[:2] == 1).all() and (box[4:7] == 0).all()  # no clicks
    torch.testing.assert_close(box[2], torch.tensor([1.0, 0.0, 0.0]))  # inside the box
    torch.testing.assert_close(box[3], torch.tensor([10 * 0.08, -1.0, -1.0]))  # its nearest edge, signed, clipped
    assert box[7, 0] == 0 and box[7, 2] == 1  # at its centre / far away
    none = _prompt_geometry(ys, xs, (100, 100))
    assert (none[:2] == 1).all() and (none[2:] == 0).all()


@torch.no_grad()
def test_the_predictor_gives_the_refiner_its_prompts_in_the_original_frame():
    model = _model(True)
    model.point_refiner.mlp[0].weight[:, :-8] = 0  # a refiner that reads only the prompt's geometry
    predictor = SamPredictor(model)
    predictor.set_image(_image())
    box = np.array([40, 20, 120, 90])
    for prompt in (dict(point_coords=POINT[0], point_labels=POINT[1]), dict(box=box)):
        logits, _, low = predictor.predict(**prompt, multimask_output=False, return_logits=True)
        unrefined = SamPredictor(with_point_refiner(model, None))
        unrefined.set_image(_image())
        base = torch.from_numpy(unrefined.predict(**prompt, multimask_output=False, return_logits=True)[0])
        h, w = base.shape[-2:]
        points = torch.as_tensor(prompt.get("point_coords", np.zeros((0, 2))), dtype=torch.float)[None]
        labels = torch.as_tensor(prompt.get("point_labels", np.zeros(0)))[None]
        boxes = torch.as_tensor(box, dtype=torch.float)[None] if "box" in prompt else None
        # the same prompts given in the original frame (an input of the image's own size): the same answer
        own = RefinerPrompts(points, labels, boxes)
        want = model.point_refiner(base.clone(), torch.from_numpy(low), predictor.get_refiner_image(),
                                   [*predictor.decoder_inputs["high_res_features"], predictor.features],
                                   predictor.input_size, _scaled(own, predictor.input_size, (h, w)))
        np.testing.assert_allclose(logits, want.numpy(), atol=1e-2)  # the frames' round trip moves a box by ~1e-5 px
        moved = dict(point_coords=POINT[0] + 30, point_labels=POINT[1]) if "point_coords" in prompt else None
        if moved:  # elsewhere, the same mask is refined otherwise
            other = model.point_refiner(base.clone(), torch.from_numpy(low), predictor.get_refiner_image(),
                                        [*predictor.decoder_inputs["high_res_features"], predictor.features],
                                        predictor.input_size,
                                        _scaled(RefinerPrompts(points + 30, labels), predictor.input_size, (h, w)))
            assert not torch.allclose(other, want)


def _scaled(prompts: RefinerPrompts, input_size, original_size) -> RefinerPrompts:
    """``prompts`` in the original frame taken into the model's input frame."""
    sx, sy = input_size[1] / original_size[1], input_size[0] / original_size[0]
    return RefinerPrompts(
        prompts.points * torch.tensor([sx, sy]) if prompts.points is not None else None, prompts.labels,
        prompts.boxes * torch.tensor([sx, sy, sx, sy]) if prompts.boxes is not None else None,
    )


def test_the_refiner_travels_in_the_model_file_and_through_a_cached_embedding(tmp_path):
    model = _model(True)
    path = tmp_path / "refined.safetensors"
    save_model(model, path)
    back = load_model(path, text_head=None)
    assert back.config.point_refiner and infer_config(back.state_dict(), 128).point_refiner
    np.testing.assert_allclose(_logits(back)[0], _logits(model)[0], atol=1e-4)
    predictor = SamPredictor(back)
    predictor.set_image(_image())
    cached = SamPredictor(back)
    emb, size = predictor.get_image_embedding(), predictor.original_size
    cached.set_embedding(emb, size, predictor.input_size, decoder_inputs=predictor.get_decoder_inputs(),
                         refiner_image=predictor.get_refiner_image())
    want = predictor.predict(*POINT, multimask_output=False, return_logits=True)[0]
    np.testing.assert_allclose(cached.predict(*POINT, multimask_output=False, return_logits=True)[0], want, atol=1e-5)
    unrefined = SamPredictor(back)  # without what the refiner reads: the model's own upsampled masks
    unrefined.set_embedding(emb, size, predictor.input_size, decoder_inputs=predictor.get_decoder_inputs())
    plain = _logits(with_point_refiner(back, None))[0]
    got = unrefined.predict(*POINT, multimask_output=False, return_logits=True)[0]
    np.testing.assert_allclose(got, plain, atol=1e-4)


def test_the_fast_refiner_matches_the_plain_one():
    model = _model(True)
    assert isinstance(model.point_refiner, FastPointRefiner)
    plain = build_sam(model.config, fast=False).eval()
    plain.load_state_dict(model.state_dict())
    assert type(plain.point_refiner) is PointRefiner
    a, b = _logits(model)[0], _logits(plain)[0]
    correction = np.abs(b - _logits(with_point_refiner(model, None))[0]).max()
    assert correction > 1.0 and np.abs(a - b).max() < 0.02 * correction  # bf16 products where the hardware has them
    assert np.mean((a > 0) != (b > 0)) < 0.01


def test_the_fast_refiners_kept_projection_follows_the_image_and_the_weights():
    model = _model(True)
    with torch.no_grad():
        model.point_refiner.mlp[0].weight.normal_(0, 0.2)
    plain = build_sam(model.config, fast=False).eval()
    plain.load_state_dict(model.state_dict())
    predictor, other = SamPredictor(model), _image(seed=1)[::-1].copy()
    predictor.set_image(_image())
    predictor.predict(*POINT, multimask_output=False, return_logits=True)  # keeps the first image's projection
    for change in (False, True):
        if change:  # written in place: the same tensor, a new version
            with torch.no_grad():
                model.point_refiner.mlp[0].weight.mul_(-1.5)
                plain.point_refiner.mlp[0].weight.mul_(-1.5)
        predictor.set_image(other)
        a = predictor.predict(*POINT, multimask_output=False, return_logits=True)[0]
        b = _logits(plain, other)[0]
        scale = np.abs(b - _logits(with_point_refiner(plain, None), other)[0]).max()
        assert scale > 1.0 and np.abs(a - b).max() < 0.02 * scale


def test_everything_masks_are_refined():
    trained = _model(True)
    opts = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    got = SamAutomaticMaskGenerator(trained, **opts).generate(_image())
    plain = SamAutomaticMaskGenerator(with_point_refiner(trained, None), **opts).generate(_image())
    assert len(got) == len(plain) > 0
    assert any(not np.array_equal(a["segmentation"], b["segmentation"]) for a, b in zip(got, plain))


def _folder(root: Path, n: int = 4) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img = _image(seed=i)
        labels = np.zeros(img.shape[:2], np.uint8)
        labels[(img[..., 0] == 230)] = 1
        labels[100:140, 120:190] = 2
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
        Image.fromarray(labels).save(root / "masks" / f"im{i}.png")


def _refiner_run(tmp_path: Path, base, **options) -> RefinerTrainConfig:
    """A three-image refiner training of ``base`` (saved as tmp_path/base.safetensors) on a labelled folder
    (tmp_path/data), into tmp_path/run; ``options``: the config's other fields."""
    _folder(tmp_path / "data")
    save_model(base, tmp_path / "base.safetensors")
    return RefinerTrainConfig(
        out_dir=str(tmp_path / "run"), base_model=str(tmp_path / "base.safetensors"),
        train_data=[{"root": str(tmp_path / "data")}], images=3, buffer_points=500, batch_points=256,
        points_per_mask=200, random_points=50, half=False, **options,
    )


def test_training_writes_a_model_with_a_trained_refiner_and_resumes(tmp_path):
    base = _model(False)
    cfg = _refiner_run(tmp_path, base, hidden=16, max_upscale=float("inf"))
    out = train_point_refiner(cfg, progress=False)
    model = load_model(out, text_head=None)
    assert model.config.point_refiner and model.config.point_refiner_hidden == 16
    assert model.config.point_refiner_max_upscale == model.point_refiner.max_upscale == float("inf")  # kept by the file
    assert model.point_refiner.mlp[0].out_features == 16  # its own width, kept by the file
    assert infer_config(model.state_dict(), 128).point_refiner_hidden == 16
    assert model.point_refiner.mlp[-1].weight.abs().sum() > 0  # trained away from its zero start
    for k, v in with_point_refiner(base, None).state_dict().items():  # the model itself is unchanged
        torch.testing.assert_close(model.state_dict()[k], v)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["images"] == 3
    # resumes: 2 more images, their masks through zoom-in's crops
    train_point_refiner(dataclasses.replace(cfg, images=5, zoom_fraction=1.0), progress=False)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["images"] == 5


def test_zoom_in_training_masks_are_taken_on_their_crop():
    model = with_point_refiner(_model(False), None)
    image = _image()
    gt = np.zeros(image.shape[:2], bool)
    gt[100:140, 120:190] = True
    whole = SamPredictor(model)
    whole.set_image(image)
    zoom = ZoomInPredictor(SamPredictor(model), box_min_zoom=0)  # the box's crop, however little it enlarges
    random.seed(3)
    for box_fraction in (0.0, 1.0):
        zoom.set_embedding(whole.get_image_embedding(), whole.original_size, image, whole.input_size,
                           whole.get_decoder_inputs())
        logits, low, prompts, (rows, cols) = zoomed_mask(zoom, gt, None, box_fraction, 3)
        x0, y0, x1, y1 = zoom.last_crop
        assert logits.shape == (y1 - y0, x1 - x0)
        assert (rows.start, rows.stop, cols.start, cols.stop) == (y0, y1, x0, x1)
        np.testing.assert_allclose(logits.numpy(), zoom._last[2][0][y0:y1, x0:x1])  # the kept answer, cropped
        assert zoom.predictor.original_size == logits.shape and low.shape[-1] == 4 * 128 // 16
        # the prompt in the crop's input frame: the box is the object's, shifted into the crop and resized
        if box_fraction:  # the box's crop: twice its size (at least 100 pixels), inside the image
            assert (x0, y0, x1, y1) == (60, 50, 200, 150)
            (h, w), (sh, sw) = zoom.predictor.input_size, (y1 - y0, x1 - x0)
            want = (np.array([120, 100, 189, 139]) - [x0, y0, x0, y0]) * np.tile([w / sw, h / sh], 2)
            np.testing.assert_allclose(prompts.boxes[0].numpy(), want, atol=1e-3)
        else:
            assert prompts.points is not None and prompts.boxes is None


def test_train_refiner_command_reports_bad_options_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_data: []\n")
    assert main(["train-refiner", "--config", str(bad)]) != 0
    err = capsys.readouterr().err.strip()
    assert "train_data" in err and "Traceback" not in err and len(err.splitlines()) == 1
    for option in ("max_upscale: 0.5", "zoom_fraction: 2"):
        bad.write_text(f"train_data: [{{root: {tmp_path}}}]\n{option}\n")
        assert main(["train-refiner", "--config", str(bad)]) != 0
        err = capsys.readouterr().err.strip()
        assert option.split(":")[0] in err and "Traceback" not in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="high_res_features"):
        build_sam(dataclasses.replace(tiny_config(16), point_refiner=True))


def test_the_learning_rate_falls_to_zero_over_the_run_unless_constant(tmp_path, capsys):
    cfg = RefinerTrainConfig(train_data=[{"root": str(tmp_path)}], images=100, lr=1e-3)
    assert [_learning_rate(cfg, i) for i in (0, 50, 100, 120)] == pytest.approx([1e-3, 5e-4, 0.0, 0.0], abs=1e-12)
    assert _learning_rate(dataclasses.replace(cfg, lr_schedule="constant"), 100) == 1e-3
    # one buffer holding the whole run's points: its passes go down the whole schedule
    assert [_buffer_schedule(cfg, 0, 100)(d) for d in (0, 0.5)] == pytest.approx([1e-3, 5e-4])
    seen = []
    layer = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x, y = torch.randn(64, 3), (torch.rand(64) > 0.5).float()
    before = layer.weight.detach().clone()
    correct = lambda f, c: c + layer(f)[:, 0]  # noqa: E731
    stats = fit_points(correct, opt, x, torch.zeros(64), y, 2, 16, lambda d: seen.append(d) or 0.0)
    assert len(stats) == 8 and seen == [k / 8 for k in range(8)]
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=0)  # every step at the rate given: 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"train_data: [{{root: {tmp_path}}}]\nlr_schedule: linear\n")
    assert main(["train-refiner", "--config", str(bad)]) != 0
    err = capsys.readouterr().err.strip()
    assert "lr_schedule" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_the_server_answers_refined_masks_from_its_cached_upload():
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import io
    import warnings

    from segany.io.rle import decode_rle
    from segany.serve.app import create_app

    with warnings.catch_warnings():  # newer starlette asks for httpx2; httpx still works
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    trained = _model(True)
    buf = io.BytesIO()
    Image.fromarray(_image()).save(buf, format="PNG")
    with TestClient(create_app(trained)) as c:
        image_id = c.post("/api/images", content=buf.getvalue(), headers={"Content-Type": "image/png"}).json()
        body = {"points": POINT[0].tolist(), "labels": POINT[1].tolist(), "multimask": False}
        r = c.post(f"/api/images/{image_id['image_id']}/predict", json=body)
    assert r.status_code == 200, r.text
    served = decode_rle(r.json()["masks"][0]["segmentation"])
    assert np.array_equal(served, _logits(trained)[0][0] > 0)  # the upload's cached refiner image: refined
    assert not np.array_equal(served, _logits(with_point_refiner(trained, None))[0][0] > 0)
