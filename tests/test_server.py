"""The web tool's HTTP API (fastapi TestClient, tiny random model)."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
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
from segany.io.sa1b import read_sa1b  # noqa: E402
from segany.predictor import SamPredictor  # noqa: E402
from segany.serve.app import MB, ServerSettings, create_app, swagger_dir  # noqa: E402
from segany.utils.masks import keep_parts_touching_box  # noqa: E402

H, W = 96, 128


def png_bytes(seed: int = 0, h: int = H, w: int = W) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(h, w, seed=seed)).save(buf, format="PNG")
    return buf.getvalue()


def upload(c, data: bytes) -> str:
    r = c.post("/api/images", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()["image_id"]


@pytest.fixture(scope="module")
def client(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    app = create_app(tiny_model, ServerSettings(max_upload_mb=1, max_pixels=200_000, dataset_dir=root / "data"))
    with TestClient(app) as c:
        c.dataset_root = root / "data"
        yield c


@pytest.fixture(scope="module")
def image_id(client) -> str:
    r = client.post("/api/images", content=png_bytes(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()["image_id"]


def reference(tiny_model, **kwargs):
    p = SamPredictor(tiny_model)
    p.set_image(synthetic_image(H, W))
    return p.predict(**kwargs)


def test_upload_returns_the_hash_and_size(client, image_id):
    data = png_bytes()
    assert image_id == hashlib.sha256(data).hexdigest()
    r = client.post("/api/images", content=data, headers={"Content-Type": "image/png"})
    assert r.json() == {"image_id": image_id, "width": W, "height": H, "cached": True}
    # The same file as a multipart form (what /docs sends).
    r = client.post("/api/images", files={"file": ("x.png", data, "image/png")})
    assert r.status_code == 200 and r.json()["image_id"] == image_id


def test_predict_point_multimask_matches_the_predictor(client, image_id, tiny_model):
    r = client.post(f"/api/images/{image_id}/predict", json={"points": [[60, 40]], "labels": [1]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["width"], out["height"]) == (W, H) and len(out["masks"]) == 3
    ref_masks, ref_scores, _ = reference(tiny_model, point_coords=np.array([[60, 40]]), point_labels=np.array([1]))
    for m, ref, score in zip(out["masks"], ref_masks, ref_scores):
        mask = decode_rle(m["segmentation"])
        assert mask.shape == (H, W) and np.array_equal(mask, ref)
        assert m["area"] == int(ref.sum()) and len(m["bbox"]) == 4
        assert m["score"] == pytest.approx(float(score), abs=1e-6)
        assert isinstance(m["logits"], str)


def test_predict_box_single_mask_and_png(client, image_id, tiny_model):
    body = {"box": [20, 20, 70, 50], "multimask": False, "format": "png"}
    r = client.post(f"/api/images/{image_id}/predict", json=body)
    assert r.status_code == 200, r.text
    (m,) = r.json()["masks"]
    png = Image.open(io.BytesIO(base64.b64decode(m["segmentation"]["png_base64"])))
    assert png.size == (W, H)
    ref, _, _ = reference(tiny_model, box=np.array([20, 20, 70, 50]), multimask_output=False)
    # The model's mask without the parts wholly outside the box (as `segany segment --box`).
    assert np.array_equal(np.asarray(png) > 127, keep_parts_touching_box(ref[0], [20, 20, 70, 50]))


def test_refine_with_previous_logits(client, image_id, tiny_model):
    first = client.post(f"/api/images/{image_id}/predict", json={"points": [[60, 40]], "labels": [1]}).json()
    best = max(first["masks"], key=lambda m: m["score"])
    body = {"points": [[60, 40], [100, 70]], "labels": [1, 0], "mask_input": best["logits"], "multimask": False}
    r = client.post(f"/api/images/{image_id}/predict", json=body)
    assert r.status_code == 200, r.text
    # The same refinement with the torch predictor directly.
    p = SamPredictor(tiny_model)
    p.set_image(synthetic_image(H, W))
    _m, scores, low = p.predict(np.array([[60, 40]]), np.array([1]))
    ref, _, _ = p.predict(np.array([[60, 40], [100, 70]]), np.array([1, 0]), mask_input=low[np.argmax(scores)][None],
                          multimask_output=False)
    assert np.array_equal(decode_rle(r.json()["masks"][0]["segmentation"]), ref[0])
    r = client.post(f"/api/images/{image_id}/predict", json={**body, "mask_input": "0123456789abcdef"})
    assert r.status_code == 404 and "logits" in r.json()["detail"]
    # A handle belongs to its image: another image cannot use it.
    other = upload(client, png_bytes(seed=7))
    r = client.post(f"/api/images/{other}/predict", json=body)
    assert r.status_code == 404 and "logits" in r.json()["detail"]


@pytest.mark.parametrize(
    "body, status",
    [
        ({}, 400),  # no prompt
        ({"points": [[1, 2]], "labels": [1, 0]}, 400),
        ({"points": [[1, 2]], "labels": [5]}, 400),
        ({"points": [[1, 2]] * 65, "labels": [1] * 65}, 422),
        ({"points": [["a", 2]], "labels": [1]}, 422),
        ({"box": [1, 2, 3]}, 422),
    ],
)
def test_predict_rejects_bad_prompts(client, image_id, body, status):
    r = client.post(f"/api/images/{image_id}/predict", json=body)
    assert r.status_code == status, r.text
    assert "detail" in r.json()


def test_everything(client, image_id):
    body = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "max_masks": 5}
    r = client.post(f"/api/images/{image_id}/everything", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert 1 <= len(out["masks"]) <= 5 and out["total"] >= len(out["masks"])
    areas = [m["area"] for m in out["masks"]]
    assert areas == sorted(areas, reverse=True)
    assert decode_rle(out["masks"][0]["segmentation"]).shape == (H, W)
    assert client.post(f"/api/images/{image_id}/everything", json={"points_per_side": 1000}).status_code == 422
    counts = out["filters"]
    assert counts["candidates"] == 4 * 4 * 3 and counts["kept"] == out["total"]
    assert counts["pred_iou_thresh"] == counts["stability_score_thresh"] == 0  # both off


def test_everything_says_why_no_mask_was_kept(client, image_id):
    body = {"points_per_side": 4, "pred_iou_thresh": 1.0}
    out = client.post(f"/api/images/{image_id}/everything", json=body).json()
    assert out["masks"] == [] and out["total"] == 0
    assert out["filters"]["pred_iou_thresh"] == out["filters"]["candidates"] == 48
    assert out["summary"] == "0 of 48 candidates kept: pred_iou_thresh removed 48"


@pytest.mark.parametrize("dtype, np_dtype", [("float32", "<f4"), ("float16", "<f2")])
def test_embedding_download(client, image_id, tiny_model, dtype, np_dtype):
    r = client.get(f"/api/images/{image_id}/embedding", params={"dtype": dtype})
    assert r.status_code == 200
    shape = tuple(int(v) for v in r.headers["X-Embedding-Shape"].split(","))
    assert shape == (1, 32, 8, 8) and r.headers["X-Image-Size"] == f"{H},{W}"
    assert r.headers["X-Input-Size"] == "96,128"
    emb = np.frombuffer(r.content, dtype=np_dtype).reshape(shape)
    p = SamPredictor(tiny_model)
    p.set_image(synthetic_image(H, W))
    np.testing.assert_allclose(emb.astype(np.float32), p.get_image_embedding().numpy(),
                               atol=1e-6 if dtype == "float32" else 2e-3, rtol=1e-3)


def test_decoder_download_is_built_once(client):
    ort = pytest.importorskip("onnxruntime")
    r1 = client.get("/api/decoder.onnx")
    assert r1.status_code == 200, r1.text
    sess = ort.InferenceSession(r1.content, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()][:3] == ["image_embeddings", "point_coords", "point_labels"]
    r2 = client.get("/api/decoder.onnx")
    assert r2.headers["ETag"] == r1.headers["ETag"] and r2.content == r1.content
    # Exporting must not have left the served model in training mode.
    assert not any(m.training for m in client.app.state.served.model.modules())
    # the page's graph: a model without a correction decoder has one graph for both, exported once
    r3 = client.get("/api/decoder.onnx?first_prompt_only=true")
    assert r3.status_code == 200 and r3.headers["ETag"] == r1.headers["ETag"]
    assert list(client.app.state.served._decoders) == [False]


def test_annotations_are_saved_inside_the_dataset_dir(client, image_id):
    masks = client.post(f"/api/images/{image_id}/predict", json={"points": [[60, 40]], "labels": [1]}).json()["masks"]
    body = {"image_id": image_id, "masks": [
        {"segmentation": m["segmentation"], "predicted_iou": m["score"], "point_coords": [[60, 40]]} for m in masks[:2]
    ]}
    r = client.post("/api/datasets/cats_v1/annotations", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    folder = client.dataset_root / "cats_v1"
    info, anns = read_sa1b(folder / out["annotations"])
    assert (info["width"], info["height"], len(anns)) == (W, H, 2)
    assert (folder / out["image"]).read_bytes() == png_bytes()
    assert out["image"] == f"sa_{image_id[:16]}.png"


@pytest.mark.parametrize("name", ["..", "...", ".hidden", "a.b", "a b", "x" * 65, "%2E%2E", "..%2Fx", "%2E%2E%2Fx"])
def test_annotation_names_cannot_escape(client, image_id, name):
    r = client.post(f"/api/datasets/{name}/annotations", json={"image_id": image_id, "masks": []})
    # Either no route matches (an encoded "/" makes two path segments), or the name is refused.
    assert r.status_code in (400, 404), (name, r.status_code)
    if r.status_code == 400:
        assert "invalid dataset name" in r.json()["detail"]
    else:
        assert r.json()["detail"] == "Not Found"
    root = client.dataset_root
    outside = [p for p in root.parent.rglob("*") if root not in p.parents and p != root]
    assert outside == []


def test_annotation_with_a_wrong_size_mask_is_refused(client, image_id):
    seg = {"size": [5, 5], "counts": "0e0"}  # 25 background pixels: valid RLE, wrong size
    r = client.post("/api/datasets/ok/annotations", json={"image_id": image_id, "masks": [{"segmentation": seg}]})
    assert r.status_code == 400 and "does not match the image" in r.json()["detail"]
    assert str(client.dataset_root) not in r.json()["detail"]  # no server paths in messages


def test_annotation_mode_off_without_dataset_dir(tiny_model, image_id):
    with TestClient(create_app(tiny_model)) as c:
        r = c.post("/api/datasets/x/annotations", json={"image_id": image_id, "masks": []})
        assert r.status_code == 403 and "--dataset-dir" in r.json()["detail"]


def test_upload_limits(client):
    big = b"\x89PNG" + bytes(2 * MB)
    r = client.post("/api/images", content=big, headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    # Streamed without a Content-Length: refused while reading.
    r = client.post("/api/images", content=iter([big[:MB], big[MB:]]), headers={"Content-Type": "image/png"})
    assert r.status_code == 413
    r = client.post("/api/images", files={"file": ("x.png", big, "image/png")})
    assert r.status_code == 413
    r = client.post("/api/images", content=png_bytes(h=500, w=500), headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]


@pytest.mark.parametrize(
    "content, ctype, status",
    [
        (b"hello", "text/plain", 415),
        (b"hello", "", 415),
        (b"not an image at all", "image/png", 400),
        (png_bytes()[:200], "image/png", 400),  # truncated
        (b"", "image/png", 400),
    ],
)
def test_bad_uploads(client, content, ctype, status):
    r = client.post("/api/images", content=content, headers={"Content-Type": ctype} if ctype else {})
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str)


def test_multipart_without_a_file_or_with_a_wrong_type(client):
    assert client.post("/api/images", data={"x": "1"}, files={"other": ("a", b"1", "image/png")}).status_code == 400
    r = client.post("/api/images", files={"file": ("a.txt", b"hello", "text/plain")})
    assert r.status_code == 415


def test_unknown_image_id(client):
    unknown = "0" * 64
    for r in (
        client.post(f"/api/images/{unknown}/predict", json={"points": [[1, 1]], "labels": [1]}),
        client.post(f"/api/images/{unknown}/everything", json={}),
        client.get(f"/api/images/{unknown}/embedding"),
    ):
        assert r.status_code == 404 and "upload" in r.json()["detail"]
    assert client.get("/api/images/not-a-hash/embedding").status_code == 422


def test_lru_eviction_under_a_small_cache(tiny_model):
    per_image = len(png_bytes()) + 32 * 8 * 8 * 4  # the file + the float32 embedding
    settings = ServerSettings(cache_mb=3 * per_image / MB)  # 3/4 of it for images: room for 2
    with TestClient(create_app(tiny_model, settings)) as c:
        ids = [upload(c, png_bytes(seed=s)) for s in range(3)]
        assert len(set(ids)) == 3
        cache = c.app.state.cache
        assert cache.keys() == ids[1:] and cache.nbytes <= cache.max_bytes and cache.evictions == 1
        r = c.post(f"/api/images/{ids[0]}/predict", json={"points": [[5, 5]], "labels": [1]})
        assert r.status_code == 404
        # Using an image refreshes it: uploading a 4th evicts ids[2], not ids[1].
        assert c.post(f"/api/images/{ids[1]}/predict", json={"points": [[5, 5]], "labels": [1]}).status_code == 200
        upload(c, png_bytes(seed=9))
        assert ids[1] in cache and ids[2] not in cache
        info = c.get("/api/info").json()["cache"]
        assert info["images"] == 2 and info["bytes"] <= info["max_bytes"]


def test_concurrent_clients(client, image_id):
    errors: list[str] = []

    def worker(i: int) -> None:
        for k in range(4):
            body = {"points": [[10 + i * 9, 10 + k * 15]], "labels": [1]}
            r = client.post(f"/api/images/{image_id}/predict", json=body)
            if r.status_code != 200:
                errors.append(r.text)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_page_docs_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and "segany" in r.text and "/static/app.js" in r.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/package.json").status_code == 404
    assert client.get("/static/..%2Fapp.py").status_code == 404
    assert client.get("/vendor/ort/..%2F..%2Fapp.py").status_code == 404
    assert client.get("/vendor/ort/not-ort.js").status_code == 404
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text
    if (swagger_dir() / "swagger-ui-bundle.js").is_file():  # offline docs: nothing from a CDN
        assert "/vendor/swagger/swagger-ui-bundle.js" in docs.text and "cdn" not in docs.text
        assert client.get("/vendor/swagger/swagger-ui.css").status_code == 200
    assert client.get("/vendor/swagger/package.json").status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/images", "/api/images/{image_id}/predict", "/api/decoder.onnx"} <= set(paths)


def test_cors_closed_by_default_and_opt_in(client, tiny_model):
    headers = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    r = client.options("/api/images", headers=headers)
    assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(tiny_model, ServerSettings(cors_origins=["http://ok.example"]))) as c:
        r = c.options("/api/images", headers={**headers, "Origin": "http://ok.example"})
        assert r.headers.get("access-control-allow-origin") == "http://ok.example"


def test_serve_command_checks_its_options(capsys):
    from segany.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--cache-mb", "0"]) == 2


def test_model_left_in_eval_mode(client):
    assert not client.app.state.served.model.training
    assert torch.is_tensor(client.app.state.served.model.pixel_mean)


def test_page_declares_its_icon(client):
    """The page names its icon inline, so the browser asks for no /favicon.ico (a 404 otherwise)."""
    html = client.get("/").text
    assert 'rel="icon" href="data:image/svg+xml,' in html
