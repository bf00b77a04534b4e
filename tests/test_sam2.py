"""SAM 2 / 2.1 for images: parity with the official ``sam2`` package (its own configs, built by its own
``build_sam2``; random weights saved in the official ``{"model": ...}`` layout, loaded by
``segany.load_model`` with no model type).

Small configs: the official tiny trunk layout (stages 1-2-7-2, so the layout is recognised from the
tensors) at width 16 and a 256-pixel input, with the official 256-wide decoder. Tolerances as the SAM 1
parity tests: logits 1e-4, IoUs 1e-5, masks equal except where the reference logit is within 1e-4 of 0.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("sam2")
pytest.importorskip("hydra")

from segany.automatic.generator import SamAutomaticMaskGenerator  # noqa: E402
from segany.checkpoint import load_model, save_model  # noqa: E402
from segany.errors import SegAnyError  # noqa: E402
from segany.modeling.build import build_sam  # noqa: E402
from segany.modeling.config import get_config  # noqa: E402
from segany.modeling.sam2 import Sam2  # noqa: E402
from segany.modeling.sam2_config import Sam2Config  # noqa: E402
from segany.predictor import SamPredictor  # noqa: E402
from tests.reference.sam2_reference import (  # noqa: E402
    build_reference_sam2,
    import_sam2,
    reference_predictor,
    save_official_sam2,
)

# The reference's SAM2Transforms scripts its resize with torch.jit.script, which this torch deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

LOGIT_TOL = 1e-4
IOU_TOL = 1e-5
SIZE = 256


def _image(h: int, w: int, seed: int) -> np.ndarray:
    from tests.test_parity import smooth_image

    return smooth_image(h, w, seed)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(reference model, its checkpoint path, our model loaded from it at 256 pixels)."""
    torch.manual_seed(0)
    ref = build_reference_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", embed_dim=16, image_size=SIZE, seed=3)
    path = save_official_sam2(ref, tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny_small.pt")
    detected = load_model(path).config
    ours = load_model(path, config=dataclasses.replace(detected, image_size=SIZE))
    return ref, path, ours


def _assert_same(ref_out, our_out) -> None:
    (rm, ri, rl), (om, oi, ol) = ref_out, our_out
    assert om.shape == rm.shape and oi.shape == ri.shape and ol.shape == rl.shape
    assert np.abs(ol - rl).max() <= LOGIT_TOL
    assert np.abs(oi - ri).max() <= IOU_TOL
    assert np.abs(om - rm).max() <= LOGIT_TOL  # logits (return_logits=True) in the original frame
    near = np.abs(rm) <= LOGIT_TOL
    assert ((om > 0) == (rm > 0))[~near].all()


def test_checkpoint_recognised_from_tensors(case):
    ref, path, _ = case
    model = load_model(path)
    assert isinstance(model, Sam2)
    cfg = model.config
    assert isinstance(cfg, Sam2Config) and cfg.image_size == 1024
    assert cfg.encoder.stages == (1, 2, 7, 2) and cfg.encoder.embed_dim == 16
    assert cfg.encoder.global_att_blocks == (5, 7, 9) and cfg.encoder.num_heads == 1
    assert cfg.pred_obj_scores and cfg.pred_obj_scores_mlp and cfg.use_high_res_features
    # Every image tensor of the official file is used; only the video modules are left out.
    ours = set(model.state_dict())
    official_image = {k for k in ref.state_dict() if k.startswith(("image_encoder.", "sam_", "no_mem_embed"))}
    assert len(ours) == len(official_image)


@pytest.mark.parametrize(
    "prompt",
    [
        {"point_coords": [[60.0, 50.0]], "point_labels": [1]},
        {"point_coords": [[60.0, 50.0], [150.0, 120.0]], "point_labels": [1, 0], "multimask_output": False},
        {"box": [20.0, 15.0, 170.0, 160.0]},
        {"box": [20.0, 15.0, 170.0, 160.0], "point_coords": [[90.0, 80.0]], "point_labels": [1]},
        {"box": [20.0, 15.0, 170.0, 160.0], "multimask_output": False},
    ],
)
def test_predictor_parity(case, prompt):
    ref, _, ours = case
    image = _image(190, 240, seed=5)
    rp, op = reference_predictor(ref), SamPredictor(ours)
    rp.set_image(image)
    op.set_image(image)
    assert torch.allclose(op.get_image_embedding(), rp.get_image_embedding(), atol=1e-4)
    kw = {k: np.asarray(v) if k != "multimask_output" else v for k, v in prompt.items()}
    ref_out = rp.predict(**kw, return_logits=True)
    our_out = op.predict(**kw, return_logits=True)
    _assert_same(ref_out, our_out)
    # Binary masks too (the default), and a second round with the low-res logits as mask input.
    rm, _, rl = rp.predict(**kw)
    om, _, ol = op.predict(**kw)
    assert (rm != om).mean() < 1e-3
    best = int(np.argmax(ref_out[1]))
    _assert_same(
        rp.predict(**kw, mask_input=rl[best : best + 1], return_logits=True),
        op.predict(**kw, mask_input=rl[best : best + 1], return_logits=True),
    )
    assert np.abs(ol).max() <= 32.0  # returned low-res logits are clamped, as upstream


def test_single_mask_stability_fallback_both_ways(case):
    """multimask_output=False: SAM 2 replaces an unstable single mask by the best of the three. Random
    weights make every mask unstable at the official 0.98, so both models get a threshold between the
    prompts' scores: both branches occur, and agree with the reference."""
    ref, _, ours = case
    image = _image(200, 200, seed=6)
    rp, op = reference_predictor(ref), SamPredictor(ours)
    rp.set_image(image)
    op.set_image(image)
    coords = torch.tensor([[[x, y]] for x in (10.0, 90.0, 180.0) for y in (10.0, 100.0, 190.0)]) * SIZE / 200
    labels = torch.ones(coords.shape[:2], dtype=torch.int)
    md, ref_md = ours.mask_decoder, ref.sam_mask_decoder
    sparse, dense = ours.prompt_encoder((coords, labels), None, None)
    pe = ours.prompt_encoder.get_dense_pe()
    all_masks, *_ = md.predict_masks(op.features, pe, sparse, dense, **op.get_decoder_inputs())
    scores = md.stability_scores(all_masks[:, :1]).flatten()
    threshold = float(scores.median())
    assert scores.min() < threshold < scores.max()
    saved = md.dynamic_multimask_stability_thresh, ref_md.dynamic_multimask_stability_thresh
    md.dynamic_multimask_stability_thresh = ref_md.dynamic_multimask_stability_thresh = threshold
    try:
        r_masks, r_iou, r_low = rp._predict(coords, labels, multimask_output=False, return_logits=True)
        o_masks, o_iou, o_low = op.predict_torch(coords, labels, multimask_output=False, return_logits=True)
    finally:
        md.dynamic_multimask_stability_thresh, ref_md.dynamic_multimask_stability_thresh = saved
    assert torch.allclose(o_low, r_low, atol=LOGIT_TOL) and torch.allclose(o_iou, r_iou, atol=IOU_TOL)
    assert torch.allclose(o_masks, r_masks, atol=LOGIT_TOL)
    single = all_masks[:, 0].clamp(-32, 32)
    # (the fast decoder's logits equal the plain predict_masks' up to float rounding; another token's mask
    # differs by far more)
    took_single = torch.isclose(o_low[:, 0], single, atol=LOGIT_TOL).flatten(1).all(1)
    assert took_single.any() and not took_single.all()


def test_batched_prompts_parity(case):
    ref, _, ours = case
    image = _image(160, 256, seed=7)
    rp, op = reference_predictor(ref), SamPredictor(ours)
    rp.set_image(image)
    op.set_image(image)
    coords = torch.tensor([[[30.0, 40.0], [200.0, 100.0]], [[120.0, 60.0], [10.0, 10.0]]])  # image pixels
    labels = torch.tensor([[1, 0], [1, 1]], dtype=torch.int)
    boxes = torch.tensor([[10.0, 10.0, 150.0, 120.0], [50.0, 30.0, 250.0, 150.0]])
    t = rp._transforms
    r = rp._predict(
        t.transform_coords(coords, normalize=True, orig_hw=(160, 256)),
        labels,
        t.transform_boxes(boxes, normalize=True, orig_hw=(160, 256)),
        multimask_output=True,
        return_logits=True,
    )
    o = op.predict_torch(
        op.transform.apply_coords_torch(coords, op.original_size),
        labels,
        op.transform.apply_boxes_torch(boxes, op.original_size),
        multimask_output=True,
        return_logits=True,
    )
    for a, b in zip(o, r):
        assert torch.allclose(a, b, atol=LOGIT_TOL)


def test_automatic_generator_parity(case):
    ref, _, ours = case
    image = _image(150, 200, seed=8)
    kw = dict(points_per_side=6, pred_iou_thresh=0.4, stability_score_thresh=0.2, box_nms_thresh=1.0)
    gen = import_sam2().SAM2AutomaticMaskGenerator(ref, **kw)
    gen.predictor._bb_feat_sizes = reference_predictor(ref)._bb_feat_sizes
    ref_records = gen.generate(image)
    our_records = SamAutomaticMaskGenerator(ours, **kw).generate(image)
    assert len(ref_records) > 2 and len(our_records) == len(ref_records)
    # Random weights give big overlapping masks: NMS is off (1.0) so that many records are compared.
    key = lambda r: (tuple(np.round(r["point_coords"][0], 3)), round(r["predicted_iou"], 4))  # noqa: E731
    for r, o in zip(sorted(ref_records, key=key), sorted(our_records, key=key)):
        # Logits agree to ~1e-5, so a pixel whose logit is that close to 0 may flip.
        assert (r["segmentation"] != o["segmentation"]).mean() < 1e-3
        assert abs(r["area"] - o["area"]) <= 2 and np.abs(np.subtract(r["bbox"], o["bbox"])).max() <= 1
        assert abs(r["predicted_iou"] - o["predicted_iou"]) <= IOU_TOL
        assert abs(r["stability_score"] - o["stability_score"]) <= 1e-3


def test_save_and_reload_our_format(case, tmp_path):
    _, _, ours = case
    out = tmp_path / "sam2_small.safetensors"
    save_model(ours, out)
    again = load_model(out)
    assert isinstance(again, Sam2) and again.config == ours.config
    image = _image(120, 90, seed=9)
    a, b = SamPredictor(ours), SamPredictor(again)
    a.set_image(image)
    b.set_image(image)
    prompt = {"point_coords": np.array([[40.0, 60.0]]), "point_labels": np.array([1])}
    for x, y in zip(a.predict(**prompt, return_logits=True), b.predict(**prompt, return_logits=True)):
        assert np.array_equal(x, y)


def test_registered_configs_build_and_embedding_reuse():
    model = build_sam(get_config("sam2_tiny_test")).eval()
    assert isinstance(model, Sam2)
    for name in ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l", "sam2_hiera_t"):
        assert isinstance(get_config(name), Sam2Config)
    p = SamPredictor(model)
    image = _image(64, 96, seed=10)
    p.set_image(image)
    first = p.predict(point_coords=np.array([[30.0, 20.0]]), point_labels=np.array([1]), return_logits=True)
    emb, inputs = p.get_image_embedding(), p.get_decoder_inputs()
    assert [f.shape[1:] for f in inputs["high_res_features"]] == [(4, 32, 32), (8, 16, 16)]
    q = SamPredictor(model)
    with pytest.raises(SegAnyError, match="high_res_features"):
        q.set_embedding(emb, (64, 96))
    q.set_embedding(emb, (64, 96), decoder_inputs=inputs)
    again = q.predict(point_coords=np.array([[30.0, 20.0]]), point_labels=np.array([1]), return_logits=True)
    for x, y in zip(first, again):
        assert np.array_equal(x, y)


def test_unknown_hiera_layout_is_a_clear_error(case, tmp_path):
    ref, path, _ = case
    sd = torch.load(path, weights_only=True)["model"]
    sd = {k: v for k, v in sd.items() if not k.startswith("image_encoder.trunk.blocks.11.")}
    bad = tmp_path / "odd.pt"
    torch.save({"model": sd}, bad)
    with pytest.raises(SegAnyError, match="not an official layout"):
        load_model(bad)


def _cli(*argv) -> tuple[int, str, str]:
    import contextlib
    import io

    from segany import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_cli_segment_everything_convert(case, tmp_path):
    """``segany convert`` of an official SAM 2.1 file, then ``segment`` and ``everything`` with it (the
    converted file at 256 pixels so the grid runs quickly): the masks are the reference's."""
    import json

    from PIL import Image

    ref, path, ours = case
    code, _, err = _cli("convert", path, tmp_path / "converted.safetensors")
    assert code == 0, err
    converted = load_model(tmp_path / "converted.safetensors")
    assert isinstance(converted, Sam2) and converted.config.image_size == 1024
    small = tmp_path / "sam2_256.safetensors"
    save_model(ours, small)
    image = _image(120, 160, seed=11)
    Image.fromarray(image).save(tmp_path / "img.png")
    code, _, err = _cli("segment", tmp_path / "img.png", "--point", "40,50", "-o", tmp_path / "seg", "--model", small)
    assert code == 0, err
    got = np.asarray(Image.open(tmp_path / "seg" / "mask.png")) > 0
    rp = reference_predictor(ref)
    rp.set_image(image)
    masks, _, _ = rp.predict(np.array([[40.0, 50.0]]), np.array([1]), multimask_output=False)
    assert (got != masks[0]).mean() < 1e-3
    low = ["--points-per-side", "4", "--pred-iou-thresh", "0.3", "--stability-score-thresh", "0.2"]
    code, out, err = _cli("everything", tmp_path / "img.png", "-o", tmp_path / "all", "--model", small, *low)
    assert code == 0, err
    records = json.loads((tmp_path / "all" / "img.json").read_text())
    assert records["annotations"], out


def test_generator_defaults_follow_the_family():
    """SAM 2's automatic generator keeps predicted IoUs above 0.8 by default (SAM's: 0.88)."""
    sam2 = build_sam(get_config("sam2_tiny_test")).eval()
    sam1 = build_sam(get_config("tiny_test")).eval()
    assert SamAutomaticMaskGenerator(sam2).pred_iou_thresh == 0.8
    assert SamAutomaticMaskGenerator(sam1).pred_iou_thresh == 0.88
    assert SamAutomaticMaskGenerator(sam2, pred_iou_thresh=0.5).pred_iou_thresh == 0.5
    import inspect

    ref = inspect.signature(import_sam2().SAM2AutomaticMaskGenerator).parameters["pred_iou_thresh"].default
    assert ref == 0.8  # the reference's own default
