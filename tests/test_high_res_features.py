"""High-resolution features in the default model family (SAM 2's decoder on the EfficientNet encoder's
stride-4 and stride-8 maps): a checkpoint gains them with a function-preserving start, and training
reaches them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from segany.checkpoint import infer_config, load_model, save_model
from segany.errors import SegAnyError
from segany.modeling import build_sam, get_config
from segany.predictor import SamPredictor
from segany.training.config import TrainConfig
from segany.training.trainer import changed_model, train
from tests.test_efficientnet import cv2_free_shapes, dense_config, tiny_config
from tests.test_training import tiny_cfg


def test_high_res_features_reach_the_decoder_and_a_zero_start_keeps_the_outputs(tmp_path):
    torch.manual_seed(0)
    base = build_sam(tiny_config(16)).eval()
    path = tmp_path / "base.safetensors"
    save_model(base, path)
    high = changed_model(load_model(path, text_head=None), {"high_res_features": True}).eval()
    assert high.decoder_input_names == ("high_res_features",) and base.decoder_input_names == ()
    image = np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8)

    def click(model):
        predictor = SamPredictor(model)
        predictor.set_image(image)
        return predictor.predict(point_coords=np.array([[60, 40]]), point_labels=np.array([1]))[2]

    before = click(base)
    np.testing.assert_allclose(click(high), before, atol=1e-4)  # zero projections add nothing
    emb, inputs = high.embed_image(torch.zeros(1, 3, 128, 128))
    s0, s1 = inputs["high_res_features"]
    assert emb.shape[-1] == 8 and s0.shape[-1] == 32 and s1.shape[-1] == 16  # strides 16, 4 and 8
    with torch.no_grad():
        high.mask_decoder.conv_s0.weight.normal_()
    assert np.abs(click(high) - before).max() > 1e-2  # the stride-4 features now move the mask
    saved = tmp_path / "high.safetensors"
    save_model(high, saved)
    back = load_model(saved, text_head=None)
    assert back.config.high_res_features and infer_config(back.state_dict(), 128).high_res_features
    np.testing.assert_allclose(click(back), click(high), atol=1e-4)
    with pytest.raises(ValueError, match="EfficientNet"):
        build_sam(dataclasses.replace(get_config("tiny_test"), high_res_features=True))


def test_model_changes_add_high_res_features_to_a_checkpoint_and_train_them(tmp_path):
    torch.manual_seed(0)
    start = build_sam(tiny_config(16))
    ckpt = tmp_path / "start.safetensors"
    save_model(start, ckpt)
    res = train(
        tiny_cfg(
            tmp_path,
            checkpoint=str(ckpt),
            model_changes={"high_res_features": True},
            frozen_stages=3,
            max_free_clicks=2,
            max_steps=3,
        )
    )
    sd0, sd1 = start.state_dict(), res.model.cpu().state_dict()
    assert res.model.config.high_res_features
    # the projections started at zero and learned; the frozen stages that feed them did not move
    for name in ("mask_decoder.conv_s0.weight", "mask_decoder.conv_s1.weight"):
        assert sd1[name].abs().sum() > 0, name
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if k.startswith("image_encoder.stages.1."))
    assert all(np.isfinite(r["loss"]) for r in res.history if r["kind"] == "train")
    with pytest.raises(SegAnyError, match="model_changes"):
        TrainConfig(model_changes={"high_res_features": True})  # nothing to change without a checkpoint
    with pytest.raises(SegAnyError, match="model_changes"):
        train(tiny_cfg(tmp_path, out_dir=str(tmp_path / "bad"), checkpoint=str(ckpt), model_changes={"nope": 1}))


def test_onnx_export_of_a_high_res_model_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    from segany.export.onnx import export_decoder, export_encoder, read_metadata
    from segany.export.onnx_predictor import OnnxSamPredictor
    from tests.test_onnx import H, W, _compare, synthetic_image

    torch.manual_seed(3)
    model = build_sam(dataclasses.replace(tiny_config(16), high_res_features=True)).eval()
    enc, dec = export_encoder(model, tmp_path / "e.onnx"), export_decoder(model, tmp_path / "d.onnx")
    assert read_metadata(dec)["segany_family"] == "sam_high_res"
    image = synthetic_image(H, W)
    torch_p = SamPredictor(model)
    torch_p.set_image(image)
    onnx_p = OnnxSamPredictor(enc, dec, threads=1)
    onnx_p.set_image(image)  # the ONNX encoder's three outputs
    np.testing.assert_allclose(onnx_p.get_image_embedding(), torch_p.get_image_embedding().numpy(), atol=1e-4)
    for multimask in (True, False):
        _compare(torch_p, onnx_p, multimask)
    with pytest.raises(SegAnyError, match="high_res_feats_0"):
        onnx_p.set_embedding(onnx_p.get_image_embedding(), (H, W))


def test_lr_scales_give_named_parameters_their_own_lr():
    from segany.training.optim import build_optimizer

    model = build_sam(dataclasses.replace(tiny_config(16), high_res_features=True))
    opt = build_optimizer(model, 1e-3, lr_scales={"mask_decoder.conv_s": 10})
    scaled = {id(p) for g in opt.param_groups if g["lr"] == pytest.approx(1e-2) for p in g["params"]}
    expected = {id(p) for n, p in model.named_parameters() if n.startswith("mask_decoder.conv_s")}
    assert scaled == expected and len(expected) == 4
    with pytest.raises(SegAnyError, match="lr_scales"):
        build_optimizer(model, 1e-3, lr_scales={"mask_decoder.nope": 10})
    with pytest.raises(SegAnyError, match="lr_scales"):
        TrainConfig(lr_scales={"mask_decoder.conv_s": -1})


def _dense_high_res_model() -> torch.nn.Module:
    """The default model's layout in small: clicks drawn into the dense embedding, high-resolution features,
    random decoder, downscaler and projection values of a useful size (the defaults are all 0 / 1)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(dense_config(), high_res_features=True)
    model = build_sam(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in [*model.mask_decoder.named_parameters(), *model.prompt_encoder.named_parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "norm" in name else 0.3) + ("norm" in name))
    return model


def test_fast_paths_of_a_high_res_model_with_dense_clicks_are_the_plain_decoder():
    """Clicks drawn into the dense embedding go through SAM 2's re-associated decoder (their few dense cells
    as extra rows) in the predictor and the automatic generator, with the plain decoder's results."""
    from segany import SamAutomaticMaskGenerator
    from segany.modeling.fast.sam2_decoder import Sam2ReassociatedDecoder, reassociated_class

    model = _dense_high_res_model()
    plain = build_sam(model.config, fast=False).eval()
    plain.load_state_dict(model.state_dict())
    assert reassociated_class(model) is Sam2ReassociatedDecoder and reassociated_class(plain) is None
    image = cv2_free_shapes(np.random.default_rng(2))
    got, want = SamPredictor(model), SamPredictor(plain)
    got.set_image(image)
    want.set_image(image)
    for pts, labels in (([[30, 20]], [1]), ([[30, 20], [90, 70]], [1, 0])):
        for multi in (True, False):
            kw = {"point_coords": np.array(pts), "point_labels": np.array(labels), "multimask_output": multi}
            a, b = got.predict(**kw, return_logits=True), want.predict(**kw, return_logits=True)
            np.testing.assert_allclose(a[0], b[0], atol=1e-4 * max(1.0, np.abs(b[0]).max()))
            np.testing.assert_allclose(a[1], b[1], atol=1e-5)
    assert model.mask_decoder._reassociated_cache is not None  # the clicks took the re-associated path
    kwargs = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
    fast, slow = SamAutomaticMaskGenerator(model, **kwargs), SamAutomaticMaskGenerator(model, **kwargs)
    slow.fast_decoder = False
    assert fast.fast_decoder
    with torch.inference_mode():
        records = [
            sorted(g.generate(image), key=lambda r: (r["point_coords"], r["predicted_iou"])) for g in (fast, slow)
        ]
    assert len(records[0]) == len(records[1]) == 3 * 8 * 8
    for r, w in zip(*records):
        assert r["point_coords"] == w["point_coords"]
        assert r["predicted_iou"] == pytest.approx(w["predicted_iou"], abs=1e-5)
        assert (r["segmentation"] != w["segmentation"]).sum() <= max(2, 0.001 * w["segmentation"].sum())


# mask_skip alone (the mask input's logits) and with mask_skip_prompts (the four prompt maps)
SKIPS = [{"mask_skip": True}, {"mask_skip": True, "mask_skip_prompts": True}]


@pytest.mark.parametrize("changes", SKIPS)
def test_clicks_with_a_mask_input_upscale_channels_last_as_the_plain_decoder(changes):
    """A prompt with a mask input skips the re-associated decoder (every dense cell differs) but still
    upscales channels-last at inference (each transposed convolution one matmul, the high-resolution maps
    rearranged once per image, ``mask_skip``'s mask added there too): the plain decoder's logits, for one
    prompt and a batch of them."""
    from segany.modeling.fast.sam2_decoder import FastSam2MaskDecoder

    model = changed_model(_dense_high_res_model(), changes).eval()
    with torch.no_grad():
        model.mask_decoder.conv_m0.weight.normal_(std=0.3, generator=torch.Generator().manual_seed(3))
    plain = build_sam(model.config, fast=False).eval()
    plain.load_state_dict(model.state_dict())
    assert isinstance(model.mask_decoder, FastSam2MaskDecoder)
    image = cv2_free_shapes(np.random.default_rng(2))
    got, want = SamPredictor(model), SamPredictor(plain)
    got.set_image(image)
    want.set_image(image)
    pts, labels = np.array([[30, 20], [90, 70]]), np.array([1, 0])
    first = want.predict(pts[:1], labels[:1], multimask_output=False)[2]
    got.predict(pts[:1], labels[:1], multimask_output=False)  # the re-associated path rearranges the maps
    kept = model.mask_decoder._high_res_blocks
    for multi in (True, False):
        kw = {"mask_input": first, "multimask_output": multi, "return_logits": True}
        a, b = got.predict(pts, labels, **kw), want.predict(pts, labels, **kw)
        np.testing.assert_allclose(a[0], b[0], atol=1e-4 * max(1.0, np.abs(b[0]).max()))
        np.testing.assert_allclose(a[1], b[1], atol=1e-5)
    assert model.mask_decoder._high_res_blocks is not None  # the channels-last upscaling ran
    assert model.mask_decoder._high_res_blocks is kept  # on the maps the first click rearranged
    boxes = torch.tensor([[10.0, 10.0, 80.0, 60.0], [40.0, 30.0, 120.0, 90.0]])
    masks = torch.from_numpy(first).expand(2, -1, -1, -1)
    with torch.inference_mode():
        a, b = (
            p.predict_torch(None, None, p.transform.apply_boxes_torch(boxes, p.original_size), masks, True, True)
            for p in (got, want)
        )
    torch.testing.assert_close(a[0], b[0], atol=1e-4 * max(1.0, b[0].abs().max().item()), rtol=0)


@pytest.mark.parametrize("changes", SKIPS)
def test_mask_skip_starts_as_the_identity_and_moves_only_masks_with_a_mask_input(tmp_path, changes):
    """``mask_skip``: a mask input's logits (with ``mask_skip_prompts``, the clicks and box maps too) at the
    mask grid through a zero-started, bias-free convolution into the stride-4 features. Added by
    model_changes it changes nothing; trained, it moves the masks of prompts with a mask input and no others
    (so the fast paths of first clicks, boxes and "everything" stay exact); saved, it loads back with the
    config read from the tensors."""
    base = _dense_high_res_model()
    skip = changed_model(base, changes).eval()
    assert skip.mask_decoder.conv_m0.in_channels == (4 if changes.get("mask_skip_prompts") else 1)
    assert skip.mask_decoder.conv_m0.weight.abs().sum() == 0 and skip.mask_decoder.conv_m0.bias is None
    image = cv2_free_shapes(np.random.default_rng(2))
    pts, labels = np.array([[30, 20], [90, 70]]), np.array([1, 0])

    def clicks(model):
        predictor = SamPredictor(model)
        predictor.set_image(image)
        first = predictor.predict(pts[:1], labels[:1], multimask_output=False, return_logits=True)
        later = predictor.predict(pts, labels, mask_input=first[2], multimask_output=False, return_logits=True)
        return first[0], later[0]

    before = clicks(base)
    for got, want in zip(clicks(skip), before):
        np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()))
    with torch.no_grad():
        skip.mask_decoder.conv_m0.weight.normal_(std=0.3)
    first, later = clicks(skip)
    np.testing.assert_allclose(first, before[0], atol=1e-4 * max(1.0, np.abs(before[0]).max()))
    assert np.abs(later - before[1]).max() > 1e-2
    saved = tmp_path / "skip.safetensors"
    save_model(skip, saved)
    back = load_model(saved, text_head=None)
    inferred = infer_config(back.state_dict(), 128)
    assert back.config.mask_skip and inferred.mask_skip
    assert back.config.mask_skip_prompts == inferred.mask_skip_prompts == bool(changes.get("mask_skip_prompts"))
    np.testing.assert_allclose(clicks(back)[1], later, atol=1e-4 * max(1.0, np.abs(later).max()))
    with pytest.raises(ValueError, match="mask_skip"):
        build_sam(dataclasses.replace(dense_config(), mask_skip=True))
    with pytest.raises(ValueError, match="mask_skip_prompts"):
        build_sam(dataclasses.replace(base.config, mask_skip_prompts=True))


@pytest.mark.parametrize("changes", SKIPS)
def test_onnx_export_of_a_mask_skip_model_matches_torch(tmp_path, changes):
    """The exported decoder (the web page's) adds the mask input (and the prompt maps) through ``conv_m0`` as
    PyTorch does, and nothing without a mask input."""
    pytest.importorskip("onnxruntime")
    model = changed_model(_dense_high_res_model(), changes).eval()
    with torch.no_grad():
        model.mask_decoder.conv_m0.weight.normal_(std=0.3)
    assert_onnx_clicks_match_torch(model, tmp_path)


def assert_onnx_clicks_match_torch(model: torch.nn.Module, tmp_path) -> None:
    """``model``'s exported encoder and decoder give PyTorch's answers to a first click and to a click with
    that click's mask as the mask input."""
    from segany.export.onnx import export_decoder, export_encoder
    from segany.export.onnx_predictor import OnnxSamPredictor
    from tests.test_onnx import H, W, _compare, synthetic_image

    enc, dec = export_encoder(model, tmp_path / "e.onnx"), export_decoder(model, tmp_path / "d.onnx")
    image = synthetic_image(H, W)
    torch_p = SamPredictor(model)
    torch_p.set_image(image)
    onnx_p = OnnxSamPredictor(enc, dec, threads=1)
    onnx_p.set_image(image)
    low = torch_p.predict(np.array([[40, 30]]), np.array([1]), multimask_output=False)[2]
    _compare(torch_p, onnx_p, False)
    _compare(torch_p, onnx_p, False, mask_input=low)
