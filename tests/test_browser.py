"""The web page in a real browser: Debian's Chromium driven by Playwright, against the real server.

Upload an image, hover (the decoder runs in the page with onnxruntime-web), click, pick another
candidate, download the mask PNG. Skips with the reason when Playwright, Chromium or onnxruntime-web
(installed by scripts/setup.sh) is missing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import synthetic_image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")

from segany.serve.app import ServerSettings, create_app, ort_web_dir, swagger_dir  # noqa: E402
from segany.utils.masks import keep_parts_touching_box  # noqa: E402

H, W = 240, 320
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "segany" / "weights" / "segany_default.safetensors"


def chromium_path() -> str | None:
    for cand in (os.environ.get("SEGANY_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and Path(cand).is_file():
            return cand
    return None


def artifact_dir(tmp_path_factory) -> Path:
    """``$SEGANY_TEST_ARTIFACTS`` when set (CI keeps it), else a pytest temporary folder."""
    env = os.environ.get("SEGANY_TEST_ARTIFACTS")
    path = Path(env) if env else tmp_path_factory.mktemp("browser-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real server (uvicorn, loopback, own thread) on the default model if it has been trained, else
    on the default architecture with random weights (same decoder size and speed)."""
    if not (ort_web_dir() / "ort.wasm.min.js").is_file():
        pytest.skip(f"onnxruntime-web is not installed in {ort_web_dir()} (scripts/setup.sh installs it with npm)")
    from segany.checkpoint import load_model
    from segany.modeling import build_sam, get_config

    if DEFAULT_WEIGHTS.is_file():
        model, name = load_model(DEFAULT_WEIGHTS), "default"
    else:
        torch.manual_seed(0)
        model, name = build_sam(get_config("segany_default_v3")).eval(), "segany_default_v3 (random weights)"
    datasets = tmp_path_factory.mktemp("datasets")
    with running_server(create_app(model, ServerSettings(cache_mb=64, dataset_dir=datasets), model_name=name)) as url:
        yield url, name, datasets


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port in its own thread; yields its URL."""
    if not (ort_web_dir() / "ort.wasm.min.js").is_file():
        pytest.skip(f"onnxruntime-web is not installed in {ort_web_dir()} (scripts/setup.sh installs it with npm)")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip("Chromium not found (apt-get install -y chromium, or set SEGANY_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        except Exception as e:  # noqa: BLE001 - a browser that cannot start is an environment problem
            pytest.skip(f"Chromium at {exe} did not start: {e}")
        yield b
        b.close()


def overlay_alpha(page) -> int:
    """Non-transparent pixels on the overlay canvas (masks, points, box)."""
    return page.evaluate(
        """() => { const c = document.getElementById('overlay');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }"""
    )


def test_page_segments_in_the_browser(browser, server, tmp_path, tmp_path_factory):
    url, model_name, datasets = server
    image_path = tmp_path / "scene.png"
    Image.fromarray(synthetic_image(H, W, seed=5)).save(image_path)
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.set_input_files("#file", str(image_path))
    page.wait_for_function("document.body.dataset.ready === '1' && window.segany.embedding !== null",
                           timeout=60_000)
    assert page.evaluate("window.segany.session !== null"), page.inner_text("#status")
    assert page.evaluate("[window.segany.width, window.segany.height]") == [W, H]

    # Hover: the decoder runs in the page; time one call (performance.now around session.run).
    box = page.locator("#overlay").bounding_box()
    for i in range(8):
        page.mouse.move(box["x"] + box["width"] * (0.2 + 0.08 * i), box["y"] + box["height"] * 0.4)
        page.wait_for_function(f"window.segany.stats.hoverRuns >= {i + 1}", timeout=30_000)
    ms = page.evaluate("window.segany.stats.decoderMs")
    print(f"\nin-browser decoder ({model_name}, onnxruntime-web wasm, 1 thread): "
          f"first call {ms[0]:.1f} ms, then median {float(np.median(ms[1:])):.1f} ms over {len(ms) - 1} calls")

    # Click: a positive point -> 3 candidates from the server, the best one drawn.
    page.mouse.move(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.35)
    before = overlay_alpha(page)
    page.mouse.click(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.35)
    page.wait_for_function("window.segany.candidates.length === 3", timeout=30_000)
    page.mouse.move(box["x"] - 20, box["y"] - 20)  # leave the canvas: the hover preview goes away
    page.wait_for_timeout(100)
    after = overlay_alpha(page)
    selected = page.evaluate("window.segany.selected")
    areas = page.evaluate("window.segany.candidates.map(c => c.area)")
    assert after != before and after > 0
    assert page.locator("#candidates button").count() == 3

    # Pick another candidate: the overlay shows that mask instead.
    other = next(i for i in range(3) if i != selected and areas[i] != areas[selected]) if len(set(areas)) > 1 \
        else (selected + 1) % 3
    page.locator(f"#candidates button[data-index='{other}']").click()
    assert page.evaluate("window.segany.selected") == other
    if areas[other] != areas[selected]:
        assert overlay_alpha(page) != after

    out = artifact_dir(tmp_path_factory) / "web_tool.png"
    page.screenshot(path=str(out))
    print(f"screenshot: {out}")

    # Download the selected mask as PNG: it is the server's mask, pixel for pixel.
    with page.expect_download() as dl:
        page.click("#dl-mask")
    png = np.asarray(Image.open(io.BytesIO(Path(dl.value.path()).read_bytes())).convert("L"))
    assert png.shape == (H, W) and set(np.unique(png)) <= {0, 255}
    from segany.io.rle import decode_rle

    rle = page.evaluate(f"window.segany.candidates[{other}].segmentation")
    assert np.array_equal(png == 255, decode_rle(rle))

    # Annotation mode: accept the selected mask, save -> SA-1B JSON + image in the dataset folder.
    page.click("#accept")
    page.fill("#dataset", "browser_test")
    page.click("#save")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Saved')", timeout=30_000)
    from segany.io.sa1b import read_sa1b

    (saved,) = (datasets / "browser_test").glob("*.json")
    info, anns = read_sa1b(saved)
    assert (info["width"], info["height"], len(anns)) == (W, H, 1)
    assert np.array_equal(decode_rle(anns[0]["segmentation"]), decode_rle(rle))

    # Drag a box -> a box prompt, one mask (the official guidance for a box), with no part wholly outside
    # the box; undo brings back the state before it.
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.3, steps=5)
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    page.wait_for_function("window.segany.box !== null && window.segany.candidates.length >= 1", timeout=30_000)
    assert page.evaluate("window.segany.candidates.length") == 1
    x0, y0, x1, y1 = page.evaluate("window.segany.box")
    assert x0 == pytest.approx(0.2 * W, abs=2) and y1 == pytest.approx(0.5 * H, abs=2)
    mask = np.array(page.evaluate("Array.from(window.segany.candidates[0].mask)"), dtype=bool).reshape(H, W)
    assert np.array_equal(mask, keep_parts_touching_box(mask, [x0, y0, x1, y1]))
    page.click("#undo")
    assert page.evaluate("window.segany.box") is None

    # A second click refines the selected mask, zoomed in: the request carries the previous mask's logits
    # handle and zoom_in. The box starts ticked: the server advises it for the default architecture on a CPU
    # (a crop's embedding is cheap).
    assert page.is_checked("#zoom-in") and page.evaluate("window.segany.info.zoom_in_default") is True
    assert page.evaluate("window.segany.points.length") == 0
    page.mouse.click(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.35)
    page.wait_for_function("window.segany.points.length === 1 && window.segany.candidates.length === 3", timeout=30_000)
    with page.expect_request(lambda r: r.url.endswith("/predict")) as sent:
        page.mouse.click(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.55)
    body = json.loads(sent.value.post_data)
    assert body["zoom_in"] is True and len(body["points"]) == 2 and isinstance(body["mask_input"], str)
    page.wait_for_function("window.segany.points.length === 2 && window.segany.candidates.length === 3 && "
                           "!document.getElementById('status').textContent.startsWith('Predicting')", timeout=30_000)
    assert "failed" not in page.inner_text("#status")
    page.click("#reset")
    assert page.evaluate("window.segany.points.length + window.segany.candidates.length") == 0

    # Everything (server side), on a coarse grid to keep the test short. With thresholds no mask passes,
    # the status line says what each filter removed.
    page.select_option("#density", "16")
    page.fill("#pred-iou-thresh", "1")
    page.click("#everything")
    page.wait_for_function("document.getElementById('status').classList.contains('error')", timeout=120_000)
    assert "No masks: 0 of 768 candidates kept: pred_iou_thresh removed 768" in page.inner_text("#status")
    assert page.evaluate("window.segany.everything") is None
    page.fill("#pred-iou-thresh", "0.1")  # the README's thresholds for the default model
    page.fill("#stability-thresh", "0.6")
    page.click("#everything")
    page.wait_for_function("window.segany.everything !== null || "
                           "document.getElementById('status').classList.contains('error')", timeout=120_000)
    assert page.evaluate("window.segany.everything !== null"), page.inner_text("#status")

    # The text box: one mask for a text, then one per object; a model without a text head answers with
    # the server's message in the status line.
    page.click("#everything")  # back from the "everything" view
    page.fill("#text", "the red rectangle")
    page.click("#find")
    page.wait_for_function("window.segany.candidates.length >= 1 || "
                           "document.getElementById('status').classList.contains('error')", timeout=60_000)
    if page.evaluate("window.segany.candidates.length") >= 1:
        assert page.evaluate("window.segany.candidates.length") == 1
        assert page.evaluate("window.segany.text") == "the red rectangle"
        page.select_option("#instances", "5")
        page.fill("#text", "the red rectangles")
        page.click("#find")
        page.wait_for_function("window.segany.text === 'the red rectangles' && "
                               "!document.getElementById('status').textContent.startsWith('Predicting')",
                               timeout=60_000)
        assert page.evaluate("window.segany.candidates.length") <= 5
        assert "failed" not in page.inner_text("#status")
    else:
        assert "text head" in page.inner_text("#status")

    assert errors == [], errors

    # The API docs render offline (Swagger UI from the npm install, not from a CDN).
    if (swagger_dir() / "swagger-ui-bundle.js").is_file():
        page.goto(url + "/docs")
        page.wait_for_selector(".opblock", timeout=30_000)
        assert page.locator(".opblock").count() >= 6
    page.close()
