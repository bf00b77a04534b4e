"""SAM 2's inference fast paths (segany.modeling.fast: FastHiera, FastSam2, FastSam2PromptEncoder) compute
the plain modules' function: same weights, outputs equal up to float rounding, on small configs in the
official trunk layouts (tiny's windows and global blocks; large's 16-token windows that tile the grid).
Parity of the fast model with the official ``sam2`` package: tests/test_sam2.py (``load_model`` builds the
fast classes)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from segany.modeling.build import build_sam
from segany.modeling.config import get_config
from segany.modeling.fast import FastHiera, FastSam2, FastSam2PromptEncoder
from segany.modeling.hiera import Hiera
from segany.modeling.sam2 import Sam2
from segany.modeling.sam2_config import Sam2Config, hiera_config
from segany.predictor import SamPredictor


def _config(stages: tuple[int, ...], size: int) -> Sam2Config:
    base = get_config("sam2_tiny_test")
    return dataclasses.replace(base, encoder=hiera_config(stages, 16), image_size=size)


def _pair(cfg: Sam2Config, seed: int = 0) -> tuple[Sam2, Sam2]:
    torch.manual_seed(seed)
    plain = build_sam(cfg, fast=False).eval()
    with torch.no_grad():  # weights of a trained model's scale everywhere (zero-initialised ones too)
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fast = build_sam(cfg).eval()
    fast.load_state_dict(plain.state_dict())
    return plain, fast


@pytest.fixture(params=[((1, 2, 7, 2), 256), ((2, 6, 36, 4), 256), ((1, 2, 7, 2), 160)], ids=["t256", "l256", "t160"])
def pair(request):
    return _pair(_config(*request.param))


def test_builder_picks_the_fast_classes():
    cfg = get_config("sam2_tiny_test")
    fast, plain = build_sam(cfg), build_sam(cfg, fast=False)
    assert type(fast) is FastSam2 and type(fast.image_encoder.trunk) is FastHiera
    assert type(fast.prompt_encoder) is FastSam2PromptEncoder
    assert type(plain) is Sam2 and type(plain.image_encoder.trunk) is Hiera


@pytest.mark.parametrize("threads", [1, 2])
def test_embedding_equals_the_plain_one(pair, threads):
    plain, fast = pair
    x = torch.randn(1, 3, plain.image_size, plain.image_size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # 2: the bands and chunks on one-core workers
    try:
        with torch.inference_mode():
            emb_p, inputs_p = plain.embed_image(x)
            emb_f, inputs_f = fast.embed_image(x)
            again, _ = fast.embed_image(x)  # the kept positional embedding
    finally:
        torch.set_num_threads(before)
    scale = float(emb_p.abs().max())
    assert scale > 0.1
    assert emb_f.shape == emb_p.shape and emb_f.is_contiguous()
    assert float((emb_f - emb_p).abs().max()) <= 1e-5 * scale
    assert torch.equal(again, emb_f)
    for a, b in zip(inputs_p["high_res_features"], inputs_f["high_res_features"]):
        assert b.shape == a.shape and b.is_contiguous()
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    with torch.no_grad():
        trunk_p, trunk_f = plain.image_encoder.trunk(x), fast.image_encoder.trunk(x)
    for a, b in zip(trunk_p, trunk_f):  # every stage output, including those the neck's top-down reads
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


def test_plain_forward_where_the_fast_path_does_not_run(pair):
    plain, fast = pair
    x = torch.randn(1, 3, plain.image_size, plain.image_size)
    a = plain.image_encoder.trunk(x)
    b = fast.image_encoder.trunk(x)  # autograd on: the plain code, the same operations
    assert b[-1].requires_grad and all(torch.equal(u, v) for u, v in zip(a, b))


def test_positional_embedding_follows_the_weights(pair):
    plain, fast = pair
    x = torch.randn(1, 3, plain.image_size, plain.image_size)
    with torch.no_grad():
        fast.embed_image(x)
        for m in (plain, fast):
            m.image_encoder.trunk.pos_embed.mul_(3.0)
        a, _ = plain.embed_image(x)
        b, _ = fast.embed_image(x)
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


def _prompts(h: int, w: int, low: np.ndarray) -> list[dict]:
    one = {"point_coords": np.array([[0.37 * w, 0.55 * h]]), "point_labels": np.array([1])}
    box = {"box": np.array([0.1 * w, 0.2 * h, 0.8 * w, 0.75 * h])}
    return [
        {**one, "multimask_output": True},
        {**one, "multimask_output": False},
        {**box, "multimask_output": False},
        {**one, "mask_input": low, "multimask_output": True},
    ]


@pytest.mark.parametrize("hw", [(120, 200), (256, 256), (300, 180)])
def test_predictor_outputs_equal_the_plain_ones(hw):
    plain, fast = _pair(_config((1, 2, 7, 2), 256), seed=1)
    rng = np.random.default_rng(0)
    image = (rng.random((*hw, 3)) * 255).astype(np.uint8)
    pp, pf = SamPredictor(plain), SamPredictor(fast)
    pp.set_image(image)
    pf.set_image(image)
    low = pp.predict(point_coords=np.array([[10.0, 20.0]]), point_labels=np.array([1]))[2][:1]
    for prompt in _prompts(*hw, low):
        (mp, ip, lp), (mf, if_, lf) = pp.predict(**prompt), pf.predict(**prompt)
        (gp, _, _), (gf, _, _) = (p.predict(**prompt, return_logits=True) for p in (pp, pf))
        scale = float(np.abs(lp).max())
        assert mf.dtype == mp.dtype == bool and mf.shape == mp.shape
        assert np.abs(lf - lp).max() <= 1e-5 * scale and np.abs(if_ - ip).max() <= 1e-5
        assert np.abs(gf - gp).max() <= 1e-5 * scale
        near = np.abs(gp) <= 1e-5 * scale
        assert (mf == mp)[~near].all()
