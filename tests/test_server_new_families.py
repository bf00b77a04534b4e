"""The web tool's API with a SAM 2 and a SAM-HQ model (tiny random models): predictions equal the
predictor's, "everything" runs, and their ONNX decoders (as the page runs them) read the image features
the server hands out besides the embedding."""

from __future__ import annotations

import dataclasses
import io
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import synthetic_image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
with warnings.catch_warnings():  # newer starlette asks for httpx2; httpx still works
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from segany.io.rle import decode_rle  # noqa: E402
from segany.modeling.build import build_sam  # noqa: E402
from segany.modeling.config import ViTConfig, get_config  # noqa: E402
from segany.modeling.sam_hq import SamHQConfig  # noqa: E402
from segany.predictor import SamPredictor  # noqa: E402
from segany.serve.app import create_app  # noqa: E402

H, W = 96, 128


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "sam2":
        return build_sam(get_config("sam2_tiny_test")).eval()
    if kind == "sam_high_res":  # segany's EfficientNet model with SAM 2's high-resolution features
        from tests.test_efficientnet import tiny_config

        return build_sam(dataclasses.replace(tiny_config(16), high_res_features=True)).eval()
    cfg = SamHQConfig(**vars(get_config("tiny_test")))
    cfg.encoder = ViTConfig(embed_dim=32, depth=2, num_heads=2, window_size=4, global_attn_indexes=(1,))
    return build_sam(cfg).eval()


def _upload(c) -> str:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(H, W)).save(buf, format="PNG")
    r = c.post("/api/images", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()["image_id"]


@pytest.mark.parametrize("kind", ["sam2", "sam_hq", "sam_high_res"])
def test_predict_and_everything(kind):
    model = _model(kind)
    with TestClient(create_app(model)) as c:
        image_id = _upload(c)
        r = c.post(f"/api/images/{image_id}/predict", json={"points": [[60, 40]], "labels": [1]})
        assert r.status_code == 200, r.text
        p = SamPredictor(model)
        p.set_image(synthetic_image(H, W))
        ref_masks, ref_scores, _ = p.predict(point_coords=np.array([[60, 40]]), point_labels=np.array([1]))
        masks = r.json()["masks"]
        assert len(masks) == len(ref_masks)
        for m, ref, score in zip(masks, ref_masks, ref_scores):
            assert np.array_equal(decode_rle(m["segmentation"]), ref)
            assert m["score"] == pytest.approx(float(score), abs=1e-6)
        body = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
        r = c.post(f"/api/images/{image_id}/everything", json=body)
        assert r.status_code == 200, r.text
        # 4 x 4 points, 3 masks each (SAM-HQ: one, its upstream semantics).
        assert r.json()["filters"]["candidates"] == 16 * (1 if kind == "sam_hq" else 3)


@pytest.mark.parametrize(
    ("kind", "extra", "input_size"),
    [
        ("sam2", ["high_res_feats_0", "high_res_feats_1"], (128, 128)),
        ("sam_hq", ["hq_features"], (96, 128)),
        ("sam_high_res", ["high_res_feats_0", "high_res_feats_1"], (96, 128)),
    ],
)
def test_onnx_decoder_as_the_page_runs_it(kind, extra, input_size):
    """The decoder's extra image inputs (SAM 2: high-resolution features; SAM-HQ: fused HQ features) come
    from the server; the page's call (one point + padding, best of outputs 1-3) gives the predictor's mask."""
    ort = pytest.importorskip("onnxruntime")
    model = _model(kind)
    with TestClient(create_app(model)) as c:
        image_id = _upload(c)
        info = c.get("/api/info").json()
        assert info["extra_decoder_inputs"] == extra
        feeds = {}
        for name in ["image_embeddings", *info["extra_decoder_inputs"]]:
            r = c.get(f"/api/images/{image_id}/embedding", params={"part": name})
            assert r.status_code == 200, r.text
            shape = tuple(int(v) for v in r.headers["X-Embedding-Shape"].split(","))
            feeds[name] = np.frombuffer(r.content, dtype="<f4").reshape(shape)
        assert c.get(f"/api/images/{image_id}/embedding", params={"part": "nope"}).status_code == 404
        h, w = (int(v) for v in r.headers["X-Input-Size"].split(","))
        assert (h, w) == input_size  # SAM 2 stretches the image to the model's square, SAM-HQ keeps its shape
        r = c.get("/api/decoder.onnx")
        assert r.status_code == 200, r.text
        sess = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
        side = info["low_res_side"]
        x, y = 60, 40
        feeds |= {
            "point_coords": np.array([[[x * w / W, y * h / H], [0, 0]]], np.float32),
            "point_labels": np.array([[1, -1]], np.float32),
            "mask_input": np.zeros((1, 1, side, side), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array([H, W], np.float32),
        }
        masks, iou, _low = sess.run(None, feeds)
    p = SamPredictor(model)
    p.set_image(synthetic_image(H, W))
    ref_masks, ref_iou, _ = p.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]), return_logits=True)
    if kind == "sam_hq":  # one mask: SAM's best multimask output plus the HQ mask, as the page picks it
        best = 1 + int(np.argmax(iou[0, 1:]))
        masks, iou = masks[:, best : best + 1], iou[:, best : best + 1]
    else:
        masks, iou = masks[:, 1:], iou[:, 1:]
    assert np.abs(masks[0] - ref_masks).max() < 1e-4 and np.abs(iou[0] - ref_iou).max() < 1e-5


def test_export_onnx_cli_with_sam2(tmp_path):
    """``segany export-onnx`` with a SAM 2 model: its decoder and encoder; options it lacks are one-line errors."""
    import contextlib

    from segany import cli
    from segany.checkpoint import save_model

    pytest.importorskip("onnxruntime")
    save_model(_model("sam2"), tmp_path / "sam2.safetensors")
    args = ["export-onnx", "--model", str(tmp_path / "sam2.safetensors"), "-o", str(tmp_path / "d.onnx")]
    assert cli.main([*args, "--encoder", str(tmp_path / "e.onnx")]) == 0
    assert (tmp_path / "d.onnx").stat().st_size > 0 and (tmp_path / "e.onnx").stat().st_size > 0
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main([*args, "--use-stability-score"]) == 2
    assert "no use_stability_score" in err.getvalue() and "Traceback" not in err.getvalue()


def _fixed_iou_model(kind: str, iou: float = 0.84):
    """A tiny model whose predicted IoUs are all ``iou`` (the IoU head's last layer: zero weights, a bias;
    SAM 2's head ends in a sigmoid)."""
    torch.manual_seed(0)
    model = _model("sam2") if kind == "sam2" else build_sam(get_config("tiny_test")).eval()
    last = model.mask_decoder.iou_prediction_head.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(math.log(iou / (1 - iou)) if kind == "sam2" else iou)
    return model


@pytest.mark.parametrize(("kind", "default"), [("sam2", 0.8), ("sam", 0.88)])
def test_everything_iou_threshold_follows_the_family(kind, default, tmp_path):
    """Without --pred-iou-thresh (or the request's field), "everything" keeps the official generator's
    default for the model: SAM 2's 0.8, SAM's 0.88. Every predicted IoU is 0.84 here, so SAM 2's masks are
    kept and SAM's removed; a threshold the user gives wins."""
    import contextlib
    import json

    from segany import cli
    from segany.checkpoint import save_model

    model = _fixed_iou_model(kind)
    body = {"points_per_side": 4, "stability_score_thresh": 0.0}
    with TestClient(create_app(model)) as c:
        assert c.get("/api/info").json()["pred_iou_thresh"] == default  # the page fills its field with it
        image_id = _upload(c)
        r = c.post(f"/api/images/{image_id}/everything", json=body)
        assert r.status_code == 200, r.text
        f = r.json()["filters"]
        assert f["candidates"] > 0 and f["pred_iou_thresh"] == (0 if kind == "sam2" else f["candidates"])
        for given, removed_all in ((0.88, True), (0.8, False)):
            f = c.post(f"/api/images/{image_id}/everything", json=body | {"pred_iou_thresh": given}).json()["filters"]
            assert f["pred_iou_thresh"] == (f["candidates"] if removed_all else 0)

    save_model(model, tmp_path / "m.safetensors")
    Image.fromarray(synthetic_image(H, W)).save(tmp_path / "img.png")
    base = ["everything", str(tmp_path / "img.png"), "--model", str(tmp_path / "m.safetensors"),
            "--points-per-side", "4", "--stability-score-thresh", "0"]
    for name, extra, kept in (("auto", [], kind == "sam2"), ("given", ["--pred-iou-thresh", "0.88"], False)):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert cli.main([*base, "-o", str(tmp_path / name), *extra]) == 0
        records = json.loads((tmp_path / name / "img.json").read_text())["annotations"]
        assert bool(records) == kept, err.getvalue()
        if not kept:  # the message names the threshold that was used
            threshold = "0.88" if extra else str(default)
            assert f"lower --pred-iou-thresh {threshold} " in err.getvalue()
