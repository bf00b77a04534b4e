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
from tests.test_efficientnet import tiny_config
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
