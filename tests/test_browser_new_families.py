"""The web page with SAM 2.1 and SAM-HQ checkpoints in a real browser (Debian's Chromium, Playwright).

The checkpoint is a tiny SAM 2.1 in the official ``{"model": ...}`` layout (random weights, the
``sam2_tiny_test`` config at 128 pixels) loaded by ``load_model`` with no model type. The page downloads
SAM 2's ONNX decoder and, besides the embedding, the two high-resolution feature maps it reads
(``extra_decoder_inputs``); the mask it decodes for a click must be the server's (the torch predictor's)
for the same click. The same for a tiny SAM-HQ in upstream's ``.pth`` layout, whose decoder reads the HQ
features fused from the early ViT features (once per image, on the server). Skips as tests/test_browser.py
does when Playwright, Chromium or onnxruntime-web is missing.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from PIL import Image

from segany.checkpoint import load_model
from segany.io.rle import decode_rle
from segany.modeling.build import build_sam
from segany.modeling.config import ViTConfig, get_config
from segany.modeling.sam2 import Sam2
from segany.modeling.sam_hq import SamHQ, SamHQConfig
from segany.predictor import SamPredictor
from tests.conftest import synthetic_image

# Skips the module when Playwright / FastAPI / uvicorn are missing, before segany.serve is imported.
from tests.test_browser import browser, running_server  # noqa: F401 - `browser` is a fixture used below

H, W = 240, 320
#: onnxruntime-web (wasm, float32) against torch on the same inputs: summation order differs.
LOGIT_TOL = 1e-4
IOU_TOL = 1e-4


def official_sam2_layout(model: Sam2) -> dict[str, torch.Tensor]:
    """Our SAM 2 state dict under the official names (``sam_mask_decoder.*``, two-way MLPs as
    ``mlp.layers.{0,1}``): the image part of a ``sam2.1_hiera_*.pt``."""
    prefixes = {"prompt_encoder.": "sam_prompt_encoder.", "mask_decoder.": "sam_mask_decoder."}
    out = {}
    for key, value in model.state_dict().items():
        for ours, official in prefixes.items():
            if key.startswith(ours):
                key = official + key[len(ours) :]
        key = re.sub(r"(transformer\.layers\.\d+\.mlp\.)lin([12])\.", lambda m: f"{m[1]}layers.{int(m[2]) - 1}.", key)
        out[key] = value.detach().clone()
    return out


def sam2_model(tmp_path) -> Sam2:
    """A tiny SAM 2.1 written in the official layout, loaded back with no model type."""
    torch.manual_seed(0)
    built = build_sam(get_config("sam2_tiny_test")).eval()
    path = tmp_path / "sam2.1_hiera_tiny_test.pt"
    torch.save({"model": official_sam2_layout(built)}, path)
    detected = load_model(path).config  # read off the tensors; the input size is the official 1024
    model = load_model(path, config=dataclasses.replace(detected, image_size=128))
    assert isinstance(model, Sam2)
    ref = built.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    return model


def sam_hq_model(tmp_path) -> SamHQ:
    """A tiny SAM-HQ written as upstream's ``.pth`` (SAM's layout plus the HQ tensors), loaded back."""
    torch.manual_seed(0)
    cfg = SamHQConfig(**vars(get_config("tiny_test")))
    cfg.encoder = ViTConfig(embed_dim=32, depth=3, num_heads=2, window_size=4, global_attn_indexes=(1, 2))
    built = build_sam(cfg).eval()
    torch.save(built.state_dict(), tmp_path / "sam_hq_vit_tiny_test.pth")
    model = load_model(tmp_path / "sam_hq_vit_tiny_test.pth")
    assert isinstance(model, SamHQ)
    return model


#: kind -> (model, the decoder's extra inputs and their shapes, the resized frame, candidates per click)
CASES = {
    "sam2.1": (sam2_model, {"high_res_feats_0": [1, 4, 32, 32], "high_res_feats_1": [1, 8, 16, 16]}, [128, 128], 3),
    "sam_hq": (sam_hq_model, {"hq_features": [1, 4, 32, 32]}, [96, 128], 1),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_page_decodes_in_the_browser(browser, kind, tmp_path):  # noqa: F811 - `browser` is the fixture
    from segany.serve.app import ServerSettings, create_app

    make, extra_shapes, input_size, n_candidates = CASES[kind]
    model = make(tmp_path)
    image = synthetic_image(H, W, seed=5)
    Image.fromarray(image).save(tmp_path / "scene.png")
    app = create_app(model, ServerSettings(cache_mb=64), model_name=f"{kind} tiny (test)")
    with running_server(app) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.set_input_files("#file", str(tmp_path / "scene.png"))
        page.wait_for_function(
            "document.body.dataset.ready === '1' && window.segany.embedding !== null", timeout=60_000
        )
        assert page.evaluate("window.segany.session !== null"), page.inner_text("#status")
        # The decoder's extra image inputs came from the server (SAM 2: stride 4 and 8 maps of C/8 and C/4
        # channels; SAM-HQ: the fused HQ features, C/8 channels at stride 4).
        extra = page.evaluate(
            "Object.fromEntries(Object.entries(window.segany.extraInputs).map(([k, t]) => [k, t.dims]))"
        )
        assert extra == extra_shapes
        assert page.evaluate("window.segany.inputSize") == input_size  # SAM 2 stretches to its square
        # "Everything"'s IoU threshold: the official generator's default for the family.
        assert page.input_value("#pred-iou-thresh") == ("0.8" if kind == "sam2.1" else "0.88")

        # Hover: the page's own decoder runs on every move.
        box = page.locator("#overlay").bounding_box()
        for i in range(4):
            page.mouse.move(box["x"] + box["width"] * (0.3 + 0.1 * i), box["y"] + box["height"] * 0.4)
            page.wait_for_function(f"window.segany.stats.hoverRuns >= {i + 1}", timeout=30_000)
        ms = page.evaluate("window.segany.stats.decoderMs")

        # Click: the server's candidates (SAM-HQ: one); then the page decodes the same point in the image frame.
        page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.375)
        page.wait_for_function(f"window.segany.candidates.length === {n_candidates}", timeout=30_000)
        x, y, label = page.evaluate("window.segany.points[0]")
        selected = page.evaluate("window.segany.selected")
        server_mask = decode_rle(page.evaluate(f"window.segany.candidates[{selected}].segmentation"))
        got = page.evaluate(
            f"""async () => {{ const m = await window.segany.decode({x}, {y}, [{H}, {W}]);
                return {{ logits: Array.from(m.logits), best: m.best, iou: m.iou, w: m.w, h: m.h }}; }}"""
        )
        assert errors == [], errors
        page.close()

    assert label == 1 and (got["h"], got["w"]) == (H, W)
    p = SamPredictor(model)
    p.set_image(image)
    ref_logits, ref_iou, _ = p.predict(np.array([[x, y]]), np.array([1]), return_logits=True)
    logits = np.asarray(got["logits"], dtype=np.float32).reshape(H, W)
    # The ONNX decoder's outputs 1..3 are the multimask outputs: SAM 2's predictor returns all three,
    # SAM-HQ's the best of them (plus the HQ mask), as the page picks it.
    best = got["best"] - 1 if n_candidates == 3 else 0
    ref = ref_logits[best]
    diff = float(np.abs(logits - ref).max())
    print(
        f"\n{kind} (tiny, random) in Chromium: decoder {np.median(ms):.1f} ms median over {len(ms)} hovers; "
        f"max |logit - torch| {diff:.2e} (max |logit| {np.abs(ref).max():.2f}), "
        f"|IoU - torch| {abs(got['iou'] - ref_iou[best]):.2e}, mask area {server_mask.mean():.3f} of the image"
    )
    assert best == int(np.argmax(ref_iou)) == selected  # the page's pick is the server's best candidate
    assert diff <= LOGIT_TOL * max(1.0, float(np.abs(ref).max()))
    assert abs(got["iou"] - ref_iou[best]) <= IOU_TOL
    near = np.abs(ref) <= LOGIT_TOL
    assert ((logits > 0) == server_mask)[~near].all()
    assert np.array_equal(server_mask, ref > 0)
    assert 0 < server_mask.sum() < H * W  # a comparison of real masks, not of two empty ones
