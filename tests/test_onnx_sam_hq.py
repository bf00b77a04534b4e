"""SAM-HQ's ONNX export against the torch predictor (tiny random SAM-HQ, onnxruntime on the CPU).

The decoder takes the early ViT features (``interm_embeddings``) besides the embedding and returns SAM's
four outputs each with the HQ mask added; the predictor's single-mask result is output 0, its multimask
result the best of outputs 1-3 (upstream's semantics). The encoder returns both image inputs.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from segany.export.onnx import export_decoder, export_encoder, read_metadata
from segany.export.onnx_sam_hq import export_sam_hq_decoder
from segany.modeling.build import build_sam
from segany.modeling.config import ViTConfig, get_config
from segany.modeling.sam_hq import SamHQConfig
from segany.predictor import SamPredictor
from tests.conftest import synthetic_image

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

H, W = 90, 130
LOGIT_TOL = 1e-4  # onnxruntime (CPU) against torch, float32
IOU_TOL = 1e-5


def _hq_model():
    torch.manual_seed(0)
    cfg = SamHQConfig(**vars(get_config("tiny_test")))
    cfg.encoder = ViTConfig(embed_dim=32, depth=3, num_heads=2, window_size=4, global_attn_indexes=(1, 2))
    return build_sam(cfg).eval()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model = _hq_model()
    tmp = tmp_path_factory.mktemp("hq_onnx")
    paths = {
        "plain": export_decoder(model, tmp / "d.onnx"),
        "hq_only": export_decoder(model, tmp / "d_hq.onnx", hq_token_only=True),
        "single": export_decoder(model, tmp / "d_single.onnx", return_single_mask=True),
        "encoder": export_encoder(model, tmp / "e.onnx"),
    }
    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    p = SamPredictor(model)
    image = synthetic_image(H, W, seed=3)
    p.set_image(image)
    return model, paths, sessions, p, image


def _feeds(p: SamPredictor, coords, labels, box=None, mask_input=None) -> dict[str, np.ndarray]:
    """The decoder's inputs for a prompt, as a viewer builds them (resized frame, box corners first,
    one padding point without a box)."""
    pts, labs = [], []
    if box is not None:
        pts += p.transform.apply_boxes(np.array(box, float), p.original_size).reshape(2, 2).tolist()
        labs += [2, 3]
    if coords is not None:
        pts += p.transform.apply_coords(np.array(coords, float), p.original_size).tolist()
        labs += list(labels)
    if box is None:
        pts, labs = pts + [[0.0, 0.0]], labs + [-1]
    side = p.model.prompt_encoder.mask_input_size[0]
    return {
        "image_embeddings": p.features.numpy(),
        "interm_embeddings": p.decoder_inputs["interm_embeddings"][None].numpy(),
        "point_coords": np.array([pts], np.float32),
        "point_labels": np.array([labs], np.float32),
        "mask_input": (np.zeros((1, 1, side, side)) if mask_input is None else mask_input[None]).astype(np.float32),
        "has_mask_input": np.array([0.0 if mask_input is None else 1.0], np.float32),
        "orig_im_size": np.array([H, W], np.float32),
    }


PROMPTS = [
    {"point_coords": [[60.0, 40.0]], "point_labels": [1]},
    {"point_coords": [[60.0, 40.0], [100.0, 70.0]], "point_labels": [1, 0], "multimask_output": False},
    {"box": [20.0, 15.0, 110.0, 80.0], "multimask_output": False},
    {"point_coords": [[30.0, 60.0]], "point_labels": [1], "box": [10.0, 30.0, 70.0, 85.0]},
]


@pytest.mark.parametrize("hq_token_only", [False, True])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_decoder_matches_the_predictor(case, prompt, hq_token_only):
    _, _, sessions, p, _ = case
    multimask = prompt.get("multimask_output", True)
    kw = {k: np.asarray(v) for k, v in prompt.items() if k != "multimask_output"}
    ref, ref_iou, ref_low = p.predict(**kw, multimask_output=multimask, return_logits=True, hq_token_only=hq_token_only)
    feeds = _feeds(p, prompt.get("point_coords"), prompt.get("point_labels"), prompt.get("box"))
    masks, iou, low = sessions["hq_only" if hq_token_only else "plain"].run(None, feeds)
    assert masks.shape == (1, 4, H, W) and iou.shape == (1, 4) and low.shape == (1, 4, 32, 32)
    k = 1 + int(np.argmax(iou[0, 1:])) if multimask else 0  # upstream's rule for one result
    assert np.abs(masks[0, k] - ref[0]).max() <= LOGIT_TOL
    assert np.abs(low[0, k] - ref_low[0]).max() <= LOGIT_TOL
    assert abs(iou[0, k] - ref_iou[0]) <= IOU_TOL
    assert 0 < (ref[0] > 0).sum() < H * W  # real masks compared, not two empty ones


def test_refinement_with_mask_input_and_single_mask_rule(case):
    """An earlier call's low-res logits as ``mask_input``; ``return_single_mask`` applies SAM's rule."""
    _, _, sessions, p, _ = case
    _, _, first_low = p.predict(np.array([[60.0, 40.0]]), np.array([1]))
    pts, labs = np.array([[60.0, 40.0], [20.0, 70.0]]), np.array([1, 0])
    ref, ref_iou, _ = p.predict(pts, labs, mask_input=first_low, multimask_output=False, return_logits=True)
    feeds = _feeds(p, pts, labs, mask_input=first_low)
    masks, iou, _ = sessions["plain"].run(None, feeds)
    assert np.abs(masks[0, 0] - ref[0]).max() <= LOGIT_TOL and abs(iou[0, 0] - ref_iou[0]) <= IOU_TOL
    single, single_iou, _ = sessions["single"].run(None, feeds)  # 3 tokens: output 0
    assert single.shape == (1, 1, H, W) and np.abs(single[0, 0] - ref[0]).max() <= LOGIT_TOL
    one = _feeds(p, [[60.0, 40.0]], [1])  # 1 point + padding: the best multimask output
    ref1, ref1_iou, _ = p.predict(np.array([[60.0, 40.0]]), np.array([1]), return_logits=True)
    single, single_iou, _ = sessions["single"].run(None, one)
    assert np.abs(single[0, 0] - ref1[0]).max() <= LOGIT_TOL and abs(single_iou[0, 0] - ref1_iou[0]) <= IOU_TOL


def test_encoder_and_upstream_layer_stack(case):
    """The encoder's two outputs are the predictor's; a stack of several layers (upstream's encoder gives
    one per global-attention block) reads the first, as upstream's decoder does."""
    model, paths, sessions, p, _ = case
    x = torch.randn(1, 3, model.image_size, model.image_size)
    emb, interm = sessions["encoder"].run(None, {"image": x.numpy()})
    ref_emb, ref_inputs = model.embed_image(x)
    assert interm.shape == (1, 1, 8, 8, 32)
    assert np.abs(emb - ref_emb.detach().numpy()).max() <= 1e-4
    assert np.abs(interm[0] - ref_inputs["interm_embeddings"].detach().numpy()).max() <= 1e-4
    feeds = _feeds(p, [[60.0, 40.0]], [1])
    scale = np.array([1.0, 5.0, 9.0], np.float32).reshape(3, 1, 1, 1, 1)  # layers 1, 2 differ from layer 0
    stacked = feeds | {"interm_embeddings": np.concatenate([feeds["interm_embeddings"]] * 3) * scale}
    a, b = sessions["plain"].run(None, feeds)[0], sessions["plain"].run(None, stacked)[0]
    assert np.array_equal(a, b)
    meta = read_metadata(paths["hq_only"])
    assert meta["segany_family"] == "sam_hq" and meta["segany_hq_token_only"] == "1"


def test_cli_export_and_clear_errors(tmp_path):
    from segany import cli
    from segany.checkpoint import save_model

    save_model(_hq_model(), tmp_path / "hq.safetensors")
    args = ["export-onnx", "--model", str(tmp_path / "hq.safetensors"), "-o", str(tmp_path / "d.onnx")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main([*args, "--encoder", str(tmp_path / "e.onnx"), "--hq-token-only"]) == 0
    names = [i.name for i in ort.InferenceSession(str(tmp_path / "d.onnx")).get_inputs()]
    assert names[:2] == ["image_embeddings", "interm_embeddings"] and (tmp_path / "e.onnx").stat().st_size > 0
    torch.manual_seed(0)
    save_model(build_sam(get_config("tiny_test")).eval(), tmp_path / "sam.safetensors")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(
            [
                "export-onnx",
                "--model",
                str(tmp_path / "sam.safetensors"),
                "-o",
                str(tmp_path / "x.onnx"),
                "--hq-token-only",
            ]
        )
    assert code == 2 and "hq_token_only needs a SAM-HQ model" in err.getvalue()
    assert "Traceback" not in err.getvalue() and not (tmp_path / "x.onnx").exists()


def test_hq_features_input_variant(case, tmp_path):
    """The server's variant takes the fused ``hq_features`` (computed once per image) and answers as the
    ``interm_embeddings`` decoder does."""
    model, _, sessions, p, _ = case
    path = export_sam_hq_decoder(model, tmp_path / "d_fused.onnx", hq_features_input=True)
    fused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in fused.get_inputs()][:2] == ["image_embeddings", "hq_features"]
    feeds = _feeds(p, [[60.0, 40.0], [100.0, 70.0]], [1, 0])
    with torch.inference_mode():
        hq = model.mask_decoder.hq_features(p.features, p.decoder_inputs["interm_embeddings"]).numpy()
    assert hq.shape == (1, 4, 32, 32)
    want = sessions["plain"].run(None, feeds)
    got = fused.run(None, {k: v for k, v in feeds.items() if k != "interm_embeddings"} | {"hq_features": hq})
    for a, b in zip(got, want):
        assert np.abs(a - b).max() <= 1e-5
