"""Text prompts through the CLI (`segany segment --text`) and the server (`text` / `instances`)."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from segany.checkpoint import save_model
from segany.checkpoint_text import new_text_head, save_text_head, text_head_path
from segany.cli import main
from tests.conftest import synthetic_image
from tests.test_text import needs_minilm


@pytest.fixture(scope="module")
def text_model(tiny_model):
    """The tiny model with an (untrained) text head: the wiring, not the quality, is under test."""
    model = copy.deepcopy(tiny_model)
    torch.manual_seed(1)
    model.text_head = new_text_head(model).eval()
    return model


@pytest.fixture()
def checkpoint_with_head(tmp_path, text_model):
    path = tmp_path / "m.safetensors"
    save_model(text_model, path)
    save_text_head(text_model.text_head, text_model, text_head_path(path))
    return path


@needs_minilm
def test_cli_text_one_mask_and_instances(tmp_path, checkpoint_with_head, capsys) -> None:
    img = tmp_path / "img.png"
    Image.fromarray(synthetic_image(64, 80)).save(img)
    out = tmp_path / "out"
    args = ["segment", str(img), "--text", "the red box", "--model", str(checkpoint_with_head), "-o", str(out)]
    assert main(args) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["prompts"]["text"] == "the red box" and len(res["masks"]) == 1
    assert np.asarray(Image.open(out / "mask.png")).shape == (64, 80)
    out2 = tmp_path / "out2"
    code = main(["segment", str(img), "--text", "the red box", "--instances", "3",
                 "--model", str(checkpoint_with_head), "-o", str(out2)])
    assert code == 0
    res = json.loads((out2 / "result.json").read_text())
    assert len(res["masks"]) <= 3 and res["prompts"]["instances"] == 3
    scores = [m["predicted_iou"] for m in res["masks"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--instances", "2"], "go with --text"),
        (["--text", "cat", "--instances", "0"], "positive number"),
        (["--text", "cat", "--instances", "2", "--point", "3,3"], "text alone"),
        (["--text", "cat", "--detector", "/no/such/folder"], "no/such/folder"),
    ],
)
def test_cli_text_errors(tmp_path, checkpoint_with_head, capsys, args, message) -> None:
    img = tmp_path / "img.png"
    Image.fromarray(synthetic_image(32, 32)).save(img)
    code = main(["segment", str(img), *args, "--model", str(checkpoint_with_head), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_text_without_head_is_a_clear_error(tmp_path, tiny_checkpoint, capsys) -> None:
    img = tmp_path / "img.png"
    Image.fromarray(synthetic_image(32, 32)).save(img)
    code = main(["segment", str(img), "--text", "a cat", "--model", str(tiny_checkpoint), "-o", str(tmp_path / "o")])
    assert code == 2 and "no text head" in capsys.readouterr().err


@needs_minilm
def test_server_text_and_instances(text_model, tiny_model, tmp_path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from fastapi.testclient import TestClient
    from segany.serve.app import ServerSettings, create_app
    from tests.test_server import png_bytes, upload

    with TestClient(create_app(text_model, ServerSettings(max_upload_mb=1, max_pixels=200_000))) as c:
        image_id = upload(c, png_bytes())
        r = c.post(f"/api/images/{image_id}/predict", json={"text": "the red rectangle"})
        assert r.status_code == 200, r.text
        assert len(r.json()["masks"]) == 1 and "logits" in r.json()["masks"][0]
        body = {"text": "the red rectangle", "points": [[5, 5]], "labels": [1]}
        r = c.post(f"/api/images/{image_id}/predict", json=body)
        assert r.status_code == 200 and len(r.json()["masks"]) == 1
        r = c.post(f"/api/images/{image_id}/predict", json={"text": "the red rectangle", "instances": 4})
        assert r.status_code == 200 and len(r.json()["masks"]) <= 4
        for body, code in [
            ({"text": ""}, 422),
            ({"text": "x" * 201}, 422),
            ({"text": "cat", "instances": 0}, 422),
            ({"text": "cat", "instances": 2, "box": [0, 0, 5, 5]}, 400),
            ({"instances": 2}, 400),
            ({"text": 5}, 422),
        ]:
            assert c.post(f"/api/images/{image_id}/predict", json=body).status_code == code, body
    with TestClient(create_app(tiny_model, ServerSettings(max_upload_mb=1, max_pixels=200_000))) as c:
        image_id = upload(c, png_bytes())
        r = c.post(f"/api/images/{image_id}/predict", json={"text": "a cat"})
        assert r.status_code == 400 and "no text head" in r.json()["detail"]
