"""Zoom-in where users prompt: the server's ``zoom_in`` (a predictor rebuilt per request from the cached
embedding, the previous crop carried by the logits handle) and ``segany segment --zoom-in``, against the
in-process :class:`ZoomInPredictor` (tiny random model, small images)."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from segany.errors import SegAnyError
from segany.predictor import SamPredictor
from segany.zoom_in import ZoomInPredictor
from tests.conftest import synthetic_image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
with warnings.catch_warnings():  # newer starlette asks for httpx2; httpx still works
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from segany.io.rle import decode_rle  # noqa: E402
from segany.serve.app import ServerSettings, create_app  # noqa: E402
from segany.utils.masks import keep_parts_touching_box  # noqa: E402

H, W = 320, 400  # large enough that a box's crop enlarges it 3 times or more (ZoomInPredictor.box_min_zoom)
BOX = [40.0, 30.0, 90.0, 70.0]  # 51 x 41 pixels: its crop is 2x that, at least 100 a side -> 102 x 100


def _png(h: int = H, w: int = W) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(h, w)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tiny_model):
    with TestClient(create_app(tiny_model, ServerSettings(max_upload_mb=1, max_pixels=200_000))) as c:
        r = c.post("/api/images", content=_png(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        yield c, r.json()["image_id"]


def _agree(a: np.ndarray, b: np.ndarray) -> None:
    """Masks equal but for pixels at the threshold (the server keeps the logits as float16)."""
    assert a.shape == b.shape and (a != b).mean() < 0.002, (a != b).sum()


def test_server_zoom_in_is_the_zoom_in_predictor(served, tiny_model):
    client, image_id = served
    url = f"/api/images/{image_id}/predict"
    zoom = ZoomInPredictor(SamPredictor(tiny_model))
    zoom.set_image(synthetic_image(H, W))

    # A box: answered on a crop around it, reported with the answer and carried by its handle.
    r = client.post(url, json={"box": BOX, "multimask": False, "zoom_in": True})
    assert r.status_code == 200, r.text
    (boxed,) = r.json()["masks"]
    ref, ref_scores, low = zoom.predict(box=np.array(BOX), multimask_output=False)
    assert boxed["crop"] == list(zoom.last_crop) and boxed["crop"] != [0, 0, W, H]
    x0, y0, x1, y1 = boxed["crop"]
    assert (x1 - x0, y1 - y0) == (102, 100) and ref[0].any()
    _agree(decode_rle(boxed["segmentation"]), keep_parts_touching_box(ref[0], BOX))  # as without zoom-in
    assert boxed["score"] == pytest.approx(float(ref_scores[0]), abs=1e-4)

    # Two clicks refining it: the mask in the crop's frame is recognised and mapped into the next crop.
    pts, labels = [[60.0, 50.0], [80.0, 60.0]], [1, 0]
    body = {"points": pts, "labels": labels, "mask_input": boxed["logits"], "zoom_in": True}
    r = client.post(url, json=body)
    assert r.status_code == 200, r.text
    ref, _, _ = zoom.predict(np.array(pts), np.array(labels), mask_input=low, multimask_output=True)
    assert zoom.last_crop != zoom.full_box  # a crop again, around the mask and the clicks
    assert [m["crop"] for m in r.json()["masks"]] == [list(zoom.last_crop)] * 3
    for m, want in zip(r.json()["masks"], ref):
        _agree(decode_rle(m["segmentation"]), want)
    # The same request again: its crop's embedding comes from the server's bounded cache.
    info = client.get("/api/info").json()["cache"]
    assert 0 < info["crop_bytes"] <= info["crop_max_bytes"]
    again = client.post(url, json=body).json()["masks"]
    assert [m["segmentation"] for m in again] == [m["segmentation"] for m in r.json()["masks"]]

    # Without zoom_in, a zoomed mask is brought back to the whole image's frame and refined there.
    r = client.post(url, json={**body, "zoom_in": False})
    assert r.status_code == 200 and all(m["crop"] is None for m in r.json()["masks"])
    # A text prompt is answered on the whole image: with zoom_in, or a zoomed mask to refine, it is refused.
    for extra in ({"zoom_in": True}, {"zoom_in": False}):
        r = client.post(url, json={**body, **extra, "text": "the cat"})
        assert r.status_code == 400 and "whole image" in r.json()["detail"]


def test_server_zoom_in_first_click_keeps_three_candidates_or_refines_one(served, tiny_model):
    client, image_id = served
    url = f"/api/images/{image_id}/predict"
    plain = SamPredictor(tiny_model)
    plain.set_image(synthetic_image(H, W))
    click = {"points": [[60.0, 50.0]], "labels": [1], "zoom_in": True}
    # three candidates asked for: the whole image's, as without zoom-in (the page lets the user choose)
    three = client.post(url, json=click).json()["masks"]
    ref, _, _ = plain.predict(np.array([[60.0, 50.0]]), np.array([1]), multimask_output=True)
    assert len(three) == 3 and all(m["crop"] is None for m in three)
    for m, want in zip(three, ref):
        assert np.array_equal(decode_rle(m["segmentation"]), want)
    # one asked for: the best one refined on a crop around it (ZoomInPredictor's refine_first)
    (one,) = client.post(url, json={**click, "multimask": False}).json()["masks"]
    zoom = ZoomInPredictor(SamPredictor(tiny_model))
    zoom.set_image(synthetic_image(H, W))
    want, _, _ = zoom.predict(np.array([[60.0, 50.0]]), np.array([1]), multimask_output=False)
    _agree(decode_rle(one["segmentation"]), want[0])
    assert one["crop"] == (None if zoom.last_crop == zoom.full_box else list(zoom.last_crop))


def test_zoom_in_default_follows_the_embeddings_cost(served, tiny_model):
    from segany.modeling import build_sam, get_config
    from segany.serve.engine import ServedModel

    client, _ = served
    assert client.get("/api/info").json()["zoom_in_default"] is False  # a ViT on a CPU: a crop costs a ViT pass
    small = ServedModel(build_sam(get_config("segany_default_v3")))  # EfficientNet-Lite0 on a CPU: cheap
    try:
        assert small.info()["zoom_in_default"] is True
    finally:
        small.close()


def test_remember_checks_its_crop(tiny_model):
    zoom = ZoomInPredictor(SamPredictor(tiny_model))
    with pytest.raises(SegAnyError, match="image must be set"):
        zoom.remember((0, 0, 4, 4), np.zeros((1, 64, 64), np.float32))
    zoom.set_image(synthetic_image(32, 40))
    with pytest.raises(SegAnyError, match="not inside"):
        zoom.remember((0, 0, 41, 32), np.zeros((1, 64, 64), np.float32))


def test_segany_segment_zoom_in(tmp_path, tiny_checkpoint, capsys):
    from segany.cli import main

    image = tmp_path / "img.png"
    Image.fromarray(synthetic_image(H, W)).save(image)
    base = ["segment", str(image), "--model", str(tiny_checkpoint)]
    assert main([*base, "--box", ",".join(f"{v:g}" for v in BOX), "--zoom-in", "-o", str(tmp_path / "box")]) == 0
    (rec,) = json.loads((tmp_path / "box" / "result.json").read_text())["masks"]
    # the box's answer on its crop: nothing of it outside the crop (102 x 100 centred on the box, x 14-116)
    mask = np.asarray(Image.open(tmp_path / "box" / "mask.png")) > 0
    outside = np.ones((H, W), bool)
    outside[0:100, 14:116] = False
    assert rec["area"] == int(mask.sum()) and not (mask & outside).any()
    # with --multimask a click keeps the whole image's three candidates
    assert main([*base, "--point", "60,50", "--zoom-in", "--multimask", "-o", str(tmp_path / "three")]) == 0
    assert len(json.loads((tmp_path / "three" / "result.json").read_text())["masks"]) == 3
    capsys.readouterr()
    assert main([*base, "--point", "60,50", "--zoom-in", "--text", "cat", "-o", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--zoom-in answers points and boxes; a text prompt is answered on the whole image")
