"""SAM-HQ: parity with the ``segment-anything-hq`` package (random weights in its ``.pth`` layout, loaded
by ``segany.load_model`` with no model type). Small ViT (width 48, 4 blocks, 256-pixel input) with the
official 256-wide decoder. Tolerances as the SAM 1 parity tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if importlib.util.find_spec("segment_anything_hq") is None:  # imported below only with the stand-ins
    pytest.skip("segment-anything-hq is not installed", allow_module_level=True)

from segany.checkpoint import load_model, save_model  # noqa: E402
from segany.errors import SegAnyError  # noqa: E402
from segany.modeling.sam_hq import SamHQ, SamHQConfig  # noqa: E402
from segany.predictor import SamPredictor  # noqa: E402
from tests.reference import save_official_checkpoint  # noqa: E402
from tests.reference.sam_hq_reference import build_reference_sam_hq, import_sam_hq  # noqa: E402
from tests.test_parity import smooth_image  # noqa: E402

LOGIT_TOL = 1e-4
IOU_TOL = 1e-5
HQ_KW = {"embed_dim": 48, "depth": 4, "num_heads": 3, "global_attn_indexes": (1, 3), "image_size": 256,
         "window_size": 7}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    ref = build_reference_sam_hq(**HQ_KW, seed=4)
    path = save_official_checkpoint(ref, tmp_path_factory.mktemp("hq") / "sam_hq_vit_small.pth")
    return ref, path, load_model(path)


def test_checkpoint_recognised(case):
    ref, _, ours = case
    assert isinstance(ours, SamHQ) and isinstance(ours.config, SamHQConfig)
    assert ours.config.encoder.embed_dim == 48 and ours.config.encoder.global_attn_indexes == (1, 3)
    assert set(ours.state_dict()) == set(ref.state_dict())


@pytest.mark.parametrize("hq_token_only", [False, True])
@pytest.mark.parametrize(
    "prompt",
    [
        {"point_coords": [[60.0, 50.0]], "point_labels": [1]},
        {"point_coords": [[60.0, 50.0], [150.0, 100.0]], "point_labels": [1, 0], "multimask_output": False},
        {"box": [20.0, 15.0, 170.0, 120.0]},
    ],
)
def test_predictor_parity(case, prompt, hq_token_only):
    ref, _, ours = case
    image = smooth_image(140, 200, seed=12)
    rp, op = import_sam_hq().SamPredictor(ref), SamPredictor(ours)
    rp.set_image(image)
    op.set_image(image)
    kw = {k: np.asarray(v) if k != "multimask_output" else v for k, v in prompt.items()}
    rm, ri, rl = rp.predict(**kw, return_logits=True, hq_token_only=hq_token_only)
    om, oi, ol = op.predict(**kw, return_logits=True, hq_token_only=hq_token_only)
    assert om.shape == rm.shape == (1, 140, 200) and oi.shape == ri.shape == (1,)
    assert np.abs(ol - rl).max() <= LOGIT_TOL
    assert np.abs(om - rm).max() <= LOGIT_TOL
    assert np.abs(oi - ri).max() <= IOU_TOL
    near = np.abs(rm) <= LOGIT_TOL
    assert ((om > 0) == (rm > 0))[~near].all()


def test_embedding_reuse_and_hq_token_only_needs_hq(case, tmp_path):
    _, path, ours = case
    image = smooth_image(100, 120, seed=13)
    p = SamPredictor(ours)
    p.set_image(image)
    prompt = {"point_coords": np.array([[50.0, 40.0]]), "point_labels": np.array([1])}
    first = p.predict(**prompt, return_logits=True)
    q = SamPredictor(ours)
    with pytest.raises(SegAnyError, match="interm_embeddings"):
        q.set_embedding(p.get_image_embedding(), (100, 120))
    q.set_embedding(p.get_image_embedding(), (100, 120), decoder_inputs=p.get_decoder_inputs())
    for a, b in zip(first, q.predict(**prompt, return_logits=True)):
        assert np.array_equal(a, b)
    save_model(ours, tmp_path / "hq.safetensors")
    again = load_model(tmp_path / "hq.safetensors")
    assert isinstance(again, SamHQ) and again.config == ours.config
    from segany.modeling.build import build_sam
    from segany.modeling.config import get_config

    plain = SamPredictor(build_sam(get_config("tiny_test")).eval())
    plain.set_image(image)
    with pytest.raises(SegAnyError, match="SAM-HQ"):
        plain.predict(**prompt, hq_token_only=True)


def test_plain_and_fast_encoders_agree(case):
    """The early features are taken from the fast encoder's in-place blocks too (copied, not aliased)."""
    from segany.modeling.build import build_sam

    _, _, ours = case
    plain = build_sam(ours.config, fast=False).eval()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        (e1, d1), (e2, d2) = ours.embed_image(x), plain.embed_image(x)
    assert torch.allclose(e1, e2, atol=1e-4)
    assert torch.allclose(d1["interm_embeddings"], d2["interm_embeddings"], atol=1e-4)
