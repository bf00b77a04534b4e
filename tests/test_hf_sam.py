"""Hugging Face ``SamModel`` folders (``config.json`` + ``model.safetensors``, written by transformers'
``save_pretrained`` from a small random model): ``load_model(folder)`` and ``segany convert`` give the
outputs of transformers' ``SamModel`` on the same inputs.

Tolerances: logits 1e-4 as the SAM 1 parity tests; IoUs 5e-5 rather than 1e-5, because transformers' two-way
transformer LayerNorms use eps 1e-6 where the official SAM (whose weights these folders hold, and which
segany follows) uses PyTorch's 1e-5."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

transformers = pytest.importorskip("transformers")

from segany.checkpoint import load_model  # noqa: E402
from segany.errors import SegAnyError  # noqa: E402
from segany.modeling.sam import Sam  # noqa: E402
from segany.predictor import SamPredictor  # noqa: E402
from tests.reference import randomize_  # noqa: E402

LOGIT_TOL = 1e-4
IOU_TOL = 5e-5  # see the module docstring
SIZE = 256


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from transformers import SamConfig, SamModel

    cfg = SamConfig(
        vision_config={
            "hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 3, "global_attn_indexes": [1],
            "image_size": SIZE, "window_size": 7, "output_channels": 256, "mlp_dim": 192,
        },
        prompt_encoder_config={"image_size": SIZE, "image_embedding_size": SIZE // 16},
    )
    torch.manual_seed(0)
    ref = randomize_(SamModel(cfg), seed=5, extra={"positional_embedding": 1.0}).eval()
    folder = tmp_path_factory.mktemp("hf") / "sam-vit-small"
    ref.save_pretrained(folder)
    return ref, folder, load_model(folder)


def test_folder_recognised(case):
    _, folder, ours = case
    assert isinstance(ours, Sam) and ours.image_size == SIZE
    enc = ours.config.encoder
    assert (enc.embed_dim, enc.depth, enc.num_heads, enc.global_attn_indexes, enc.window_size) == (48, 3, 3, (1,), 7)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("multimask", [True, False])
def test_parity_with_transformers(case, multimask):
    ref, _, ours = case
    x = torch.randn(1, 3, SIZE, SIZE)  # a normalized, padded image (both models' encoder input)
    points = torch.tensor([[[40.0, 60.0], [200.0, 120.0]]])  # in the model's input frame
    labels = torch.tensor([[1, 0]])
    boxes = torch.tensor([[30.0, 20.0, 180.0, 150.0]])
    with torch.inference_mode():
        emb_ref = ref.get_image_embeddings(x)
        emb_ours = ours.image_encoder(x)
        assert torch.allclose(emb_ours, emb_ref, atol=1e-4)
        for kw in ({"points": True}, {"boxes": True}, {"points": True, "boxes": True}):
            hf_kw = {}
            if "points" in kw:
                hf_kw.update(input_points=points[:, None], input_labels=labels[:, None])
            if "boxes" in kw:
                hf_kw.update(input_boxes=boxes[:, None])
            out = ref(image_embeddings=emb_ref, multimask_output=multimask, **hf_kw)
            sparse, dense = ours.prompt_encoder(
                (points, labels.int()) if "points" in kw else None, boxes if "boxes" in kw else None, None
            )
            low, iou = ours.mask_decoder(emb_ours, ours.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
            assert (low - out.pred_masks[:, 0]).abs().max() <= LOGIT_TOL
            assert (iou - out.iou_scores[:, 0]).abs().max() <= IOU_TOL


def test_predictor_and_convert(case, tmp_path):
    from segany import cli
    from tests.test_parity import smooth_image

    _, folder, ours = case
    assert cli.main(["convert", str(folder), str(tmp_path / "sam.safetensors")]) == 0
    converted = load_model(tmp_path / "sam.safetensors")
    image = smooth_image(100, 150, seed=14)
    prompt = {"point_coords": np.array([[60.0, 30.0]]), "point_labels": np.array([1])}
    a, b = SamPredictor(ours), SamPredictor(converted)
    a.set_image(image)
    b.set_image(image)
    for x, y in zip(a.predict(**prompt, return_logits=True), b.predict(**prompt, return_logits=True)):
        assert np.array_equal(x, y)


def test_bad_folders(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(SegAnyError, match="not transformers' 'sam'"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "sam", "vision_config": {}}')
    with pytest.raises(SegAnyError, match="no model.safetensors"):
        load_model(tmp_path)
