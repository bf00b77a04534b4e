"""SamConfig.correction_decoder: prompts with a mask input answered by a second mask decoder, so that
training it moves no first click, box or "everything" answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segany.checkpoint import infer_config, load_model, save_model
from segany.modeling import build_sam, get_config
from segany.predictor import SamPredictor
from segany.training.trainer import changed_model, train
from tests.test_efficientnet import cv2_free_shapes
from tests.test_high_res_features import _dense_high_res_model, assert_onnx_clicks_match_torch
from tests.test_training import tiny_cfg

CHANGES = {"correction_decoder": True, "mask_skip": True, "mask_skip_prompts": True}
PTS, LABELS = np.array([[30, 20], [90, 70]]), np.array([1, 0])


def _clicks(model, image: np.ndarray) -> tuple[np.ndarray, ...]:
    """A first click's three masks, a box's mask, and a corrective click's mask (logits) with the first
    click's best mask as the mask input."""
    predictor = SamPredictor(model)
    predictor.set_image(image)
    first, _, low = predictor.predict(PTS[:1], LABELS[:1], return_logits=True)
    box = predictor.predict(box=np.array([10, 10, 80, 60]), multimask_output=False, return_logits=True)[0]
    later = predictor.predict(PTS, LABELS, mask_input=low[:1], multimask_output=False, return_logits=True)[0]
    return first, box, later


def _close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_a_correction_decoder_starts_as_the_mask_decoder_and_moves_only_corrections(tmp_path):
    """Added by model_changes it is a copy of the mask decoder (the mask skip on it alone, starting at zero;
    the first decoder's projected high-resolution features shared): the same answers. Changed, it moves the
    answers of prompts with a mask input and no others (the fast paths of first clicks and boxes stay
    exact); saved, it loads back with the config read from the tensors."""
    base = _dense_high_res_model()
    model = changed_model(base, CHANGES).eval()
    md, cd = model.mask_decoder, model.correction_decoder
    assert not md.mask_skip and cd.mask_skip and cd.conv_m0.in_channels == 4
    assert hasattr(md, "conv_s0") and not hasattr(cd, "conv_s0")  # one projection of the image's features
    assert model.decoder_for(False) is md and model.decoder_for(True) is cd
    image = cv2_free_shapes(np.random.default_rng(2))
    before = _clicks(base, image)
    for got, want in zip(_clicks(model, image), before):
        _close(got, want)
    with torch.no_grad():
        for p in cd.parameters():
            p.add_(0.2 * torch.randn_like(p))
    first, box, later = _clicks(model, image)
    _close(first, before[0])
    _close(box, before[1])
    assert np.abs(later - before[2]).max() > 1e-2
    saved = tmp_path / "corr.safetensors"
    save_model(model, saved)
    back = load_model(saved, text_head=None)
    inferred = infer_config(back.state_dict(), 128)
    for cfg in (back.config, inferred):
        assert cfg.correction_decoder and cfg.mask_skip and cfg.mask_skip_prompts
    for got, want in zip(_clicks(back, image), (first, box, later)):
        _close(got, want)


def test_convert_takes_a_runs_decoder_as_the_correction_decoder(tmp_path):
    """``segany convert BASE OUT --correction-decoder RUN``: first clicks and boxes stay BASE's exactly,
    corrections are RUN's (its own high-resolution projections aside: the correction decoder reads BASE's);
    a source of another architecture, or a model that has one already, is refused."""
    from segany.checkpoint_convert import convert_checkpoint
    from segany.errors import SegAnyError

    base = _dense_high_res_model()
    run = changed_model(base, {"mask_skip": True, "mask_skip_prompts": True}).eval()
    with torch.no_grad():
        for name, p in run.mask_decoder.named_parameters():
            if not name.startswith("conv_s"):
                p.add_(0.2 * torch.randn_like(p))
    paths = {name: tmp_path / f"{name}.safetensors" for name in ("base", "run", "out")}
    save_model(base, paths["base"])
    save_model(run, paths["run"])
    cfg = convert_checkpoint(paths["base"], paths["out"], correction_decoder=paths["run"])
    assert cfg.correction_decoder and cfg.mask_skip and cfg.mask_skip_prompts
    image = cv2_free_shapes(np.random.default_rng(3))
    got, from_base = _clicks(load_model(paths["out"], text_head=None), image), _clicks(base, image)
    _close(got[0], from_base[0])
    _close(got[1], from_base[1])
    # a correction with the same mask input (the first click's best mask): RUN's answer, not BASE's
    low = SamPredictor(base)
    low.set_image(image)
    args = dict(point_coords=PTS, point_labels=LABELS, mask_input=low.predict(PTS[:1], LABELS[:1])[2][:1],
                multimask_output=False, return_logits=True)
    answers = []
    for name in ("out", "run", "base"):
        p = SamPredictor(load_model(paths[name], text_head=None))
        p.set_image(image)
        answers.append(p.predict(**args)[0])
    _close(answers[0], answers[1])
    assert np.abs(answers[1] - answers[2]).max() > 1e-2  # the runs differ, so the routing is seen
    # --correction-skip prompts: the skip reads the clicks and the box, not the previous mask
    convert_checkpoint(paths["base"], tmp_path / "p.safetensors", correction_decoder=paths["run"],
                       correction_skip_mask=False)
    got_w = load_model(tmp_path / "p.safetensors", text_head=None).correction_decoder.conv_m0.weight
    run_w = run.mask_decoder.conv_m0.weight
    assert torch.equal(got_w[:, 1:], run_w[:, 1:]) and not got_w[:, 0].any() and run_w[:, 0].abs().sum() > 0
    with pytest.raises(SegAnyError, match="needs a source with mask_skip_prompts"):
        convert_checkpoint(paths["base"], tmp_path / "x.safetensors", correction_decoder=paths["base"],
                           correction_skip_mask=False)
    with pytest.raises(SegAnyError, match="correction decoder is added"):
        convert_checkpoint(paths["out"], tmp_path / "x.safetensors", correction_decoder=paths["run"])
    other = build_sam(get_config("tiny_test"))
    save_model(other, tmp_path / "other.safetensors")
    with pytest.raises(SegAnyError, match="a run of the model's architecture"):
        convert_checkpoint(paths["base"], tmp_path / "x.safetensors", correction_decoder=tmp_path / "other.safetensors")


def test_the_official_batched_forward_routes_mask_inputs_to_the_correction_decoder():
    torch.manual_seed(0)
    model = changed_model(build_sam(get_config("tiny_test")), {"correction_decoder": True}).eval()
    with torch.no_grad():
        for p in model.correction_decoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
    image = torch.rand(3, model.image_size, model.image_size) * 255
    record = {"image": image, "original_size": (64, 64), "point_coords": torch.tensor([[[10.0, 20.0]]])}
    record["point_labels"] = torch.tensor([[1]])
    low = torch.zeros(1, 1, *model.prompt_encoder.mask_input_size)
    with torch.no_grad():
        out = model([record, {**record, "mask_inputs": low}], multimask_output=False)
        sparse, dense = model.prompt_encoder((record["point_coords"], record["point_labels"]), None, None)
        emb = model.image_encoder(model.preprocess(image)[None])
        first = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, False)[0]
        _, dense_m = model.prompt_encoder((record["point_coords"], record["point_labels"]), None, low)
        corr = model.correction_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense_m, False)[0]
    torch.testing.assert_close(out[0]["low_res_logits"], first, atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1]["low_res_logits"], corr, atol=1e-4, rtol=0)


def test_training_the_correction_decoder_alone_keeps_the_first_decoder(tmp_path):
    """A stage with the mask decoder frozen trains the correction decoder only (every other part frozen is
    no longer "nothing to train"); the first decoder's weights come out as they went in."""
    from segany.errors import SegAnyError

    torch.manual_seed(0)
    ckpt = tmp_path / "start.safetensors"
    save_model(build_sam(get_config("tiny_test")), ckpt)
    frozen = dict(freeze_image_encoder=True, freeze_prompt_encoder=True, freeze_mask_decoder=True)
    cfg = tiny_cfg(tmp_path, checkpoint=str(ckpt), model_changes={"correction_decoder": True}, lr=1e-2, **frozen)
    res = train(cfg)
    start = load_model(ckpt, text_head=None).state_dict()
    trained = load_model(res.out_dir / "final.safetensors", text_head=None)
    for name, value in trained.mask_decoder.state_dict().items():
        torch.testing.assert_close(value, start[f"mask_decoder.{name}"], atol=0, rtol=0)
    moved = [
        (value - start[f"mask_decoder.{name}"]).abs().max().item()
        for name, value in trained.correction_decoder.state_dict().items()
    ]
    assert max(moved) > 1e-3
    with pytest.raises(SegAnyError, match="nothing to train"):
        train(tiny_cfg(tmp_path / "all", checkpoint=str(ckpt), **frozen))


def test_onnx_export_of_a_correction_decoder_matches_torch(tmp_path):
    """The exported decoder (the web page's) runs both decoders in one graph and takes the correction
    decoder's answer when ``has_mask_input`` is set, as PyTorch does."""
    pytest.importorskip("onnxruntime")
    model = changed_model(_dense_high_res_model(), CHANGES).eval()
    with torch.no_grad():
        for p in model.correction_decoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
    assert_onnx_clicks_match_torch(model, tmp_path)


def test_a_first_prompt_only_onnx_graph_leaves_the_correction_decoder_out(tmp_path):
    """``export_decoder(first_prompt_only=True)`` (the web page's graph, which never sends a mask input)
    holds the first decoder alone: about half the file, PyTorch's first clicks, and a mask input answered
    by the first decoder, as PyTorch answers it with the correction decoder removed."""
    pytest.importorskip("onnxruntime")
    import copy

    from segany.export.onnx import export_decoder, export_encoder, read_metadata
    from segany.export.onnx_predictor import OnnxSamPredictor
    from tests.test_onnx import H, W, _compare, synthetic_image

    model = changed_model(_dense_high_res_model(), CHANGES).eval()
    with torch.no_grad():
        for p in model.correction_decoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
    enc = export_encoder(model, tmp_path / "e.onnx")
    both = export_decoder(model, tmp_path / "both.onnx")
    first = export_decoder(model, tmp_path / "first.onnx", first_prompt_only=True)
    assert first.stat().st_size < 0.6 * both.stat().st_size
    assert read_metadata(first)["segany_first_prompt_only"] == "1"
    assert read_metadata(both)["segany_first_prompt_only"] == "0"
    image = synthetic_image(H, W)
    without = copy.deepcopy(model)
    without.correction_decoder = None
    torch_p, onnx_p = SamPredictor(without), OnnxSamPredictor(enc, first, threads=1)
    torch_p.set_image(image)
    onnx_p.set_image(image)
    low = torch_p.predict(np.array([[40, 30]]), np.array([1]), multimask_output=False)[2]
    _compare(torch_p, onnx_p, True)
    _compare(torch_p, onnx_p, False, mask_input=low)
    # and the correction decoder does change that answer (else the check above proves nothing)
    full = SamPredictor(model)
    full.set_image(image)
    args = dict(point_coords=np.array([[40, 30]]), point_labels=np.array([1]), mask_input=low,
                multimask_output=False, return_logits=True)
    assert np.abs(full.predict(**args)[0] - torch_p.predict(**args)[0]).max() > 1e-2


def test_skip_without_mask_trains_the_skip_on_the_clicks_and_box_alone(tmp_path):
    """``skip_without_mask``: the skip's weights on the previous mask's logits stay exactly zero through a
    run (as ``--correction-skip prompts`` leaves a trained one's) while its other three maps' weights learn;
    a model with no four-map skip is refused before any step."""
    from segany.errors import SegAnyError

    torch.manual_seed(0)
    ckpt = tmp_path / "start.safetensors"
    save_model(_dense_high_res_model(), ckpt)
    frozen = dict(freeze_image_encoder=True, freeze_prompt_encoder=True)
    changes = {"mask_skip": True, "mask_skip_prompts": True}
    cfg = tiny_cfg(
        tmp_path, checkpoint=str(ckpt), model_changes=changes, skip_without_mask=True, lr=1e-2, **frozen
    )
    weight = load_model(train(cfg).out_dir / "final.safetensors", text_head=None).mask_decoder.conv_m0.weight
    assert weight[:, 0].abs().max().item() == 0
    assert weight[:, 1:].abs().max().item() > 1e-3
    with pytest.raises(SegAnyError, match="skip_without_mask needs"):
        train(tiny_cfg(tmp_path / "plain", checkpoint=str(ckpt), skip_without_mask=True, **frozen))


def test_the_server_keeps_the_pages_graph_apart_for_a_model_with_a_correction_decoder():
    """``ServedModel.decoder_onnx(first_prompt_only=True)`` (``GET /api/decoder.onnx?first_prompt_only=true``,
    the page's download): its own, smaller graph beside the whole one, each exported once and kept."""
    pytest.importorskip("onnxruntime")
    from segany.serve.engine import ServedModel

    served = ServedModel(changed_model(_dense_high_res_model(), CHANGES))
    whole, page = served.decoder_onnx(), served.decoder_onnx(first_prompt_only=True)
    assert page != whole and len(page) < len(whole)
    assert served.decoder_onnx(first_prompt_only=True) is page and served.decoder_onnx() is whole
