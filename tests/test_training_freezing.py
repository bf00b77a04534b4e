"""Training with parts of the model frozen: a frozen encoder with its embedding cache, ``train_only``, and
``frozen_stages`` of an EfficientNet trunk (tiny models, a few steps each)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segany.errors import SegAnyError
from segany.modeling import build_sam, get_config
from segany.training.config import TrainConfig
from segany.training.trainer import train
from tests.test_training import tiny_cfg


def test_frozen_encoder_with_embedding_cache(tmp_path):
    ckpt = tmp_path / "start.safetensors"
    from segany.checkpoint import save_model

    torch.manual_seed(0)
    start = build_sam(get_config("tiny_test"))
    save_model(start, ckpt)
    cfg = tiny_cfg(
        tmp_path,
        checkpoint=str(ckpt),
        freeze_image_encoder=True,
        cache_embeddings=True,
        freeze_prompt_encoder=True,
        max_steps=4,
        val_data=[],
    )
    res = train(cfg)
    cache = Path(cfg.out_dir) / "embeddings"
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 4 and (cache / "manifest.json").is_file()
    sd0, sd1 = start.state_dict(), res.model.cpu().state_dict()
    for k in sd0:
        same = torch.equal(sd0[k], sd1[k])
        if k.startswith(("image_encoder.", "prompt_encoder.")):
            assert same, k
    assert any(not torch.equal(sd0[k], sd1[k]) for k in sd0 if k.startswith("mask_decoder."))
    # the cached embedding is the encoder's output on the un-augmented image
    from safetensors.torch import load_file

    from segany.training.embeddings_cache import encoder_input
    from segany.training.loader import build_datasets

    ds = build_datasets(cfg.train_data, cfg, 128, None, cfg.seed)
    it = ds[0]
    with torch.no_grad():
        ref = start.image_encoder(encoder_input(start, it["image"][None], it["valid_hw"][None]))[0]
    assert torch.allclose(load_file(str(files[0]))["embedding"].float(), ref, atol=2e-3)
    # a second run reuses the cache
    mtimes = [f.stat().st_mtime_ns for f in files]
    train(cfg.replace(out_dir=str(tmp_path / "run2"), cache_dir=str(cache), max_steps=2))
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_train_only_trains_the_named_parameters_alone(tmp_path):
    from segany.checkpoint import save_model

    torch.manual_seed(0)
    start = build_sam(get_config("tiny_test"))
    ckpt = tmp_path / "start.safetensors"
    save_model(start, ckpt)
    head = "mask_decoder.iou_prediction_head."
    common = dict(checkpoint=str(ckpt), freeze_image_encoder=True, freeze_prompt_encoder=True, val_data=[])
    res = train(tiny_cfg(tmp_path, train_only=[head], max_steps=3, **common))
    sd0, sd1 = start.state_dict(), res.model.cpu().state_dict()
    assert any(not torch.equal(sd0[k], sd1[k]) for k in sd0 if k.startswith(head))
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if not k.startswith(head))
    # a prefix that names no trainable parameter (here: a frozen part's) is an error, before any step
    with pytest.raises(SegAnyError, match="train_only.*prompt_encoder"):
        train(tiny_cfg(tmp_path, out_dir=str(tmp_path / "frozen"), train_only=["prompt_encoder."], **common))
    with pytest.raises(SegAnyError, match="freeze_image_encoder"):
        TrainConfig(train_only=["mask_decoder."])
    with pytest.raises(SegAnyError, match="train_only"):
        TrainConfig(train_only=[], freeze_image_encoder=True)


def test_frozen_stages_keep_the_stem_and_first_stages_of_an_efficientnet(tmp_path):
    from segany.checkpoint import save_model
    from tests.test_efficientnet import tiny_config

    torch.manual_seed(0)
    start = build_sam(tiny_config(16))
    ckpt = tmp_path / "start.safetensors"
    save_model(start, ckpt)
    res = train(tiny_cfg(tmp_path, checkpoint=str(ckpt), frozen_stages=3, clicker_prob=1.0, max_steps=3, val_data=[]))
    sd0, sd1 = start.state_dict(), res.model.cpu().state_dict()
    frozen = ("image_encoder.stem.", "image_encoder.stages.0.", "image_encoder.stages.1.", "image_encoder.stages.2.")
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if k.startswith(frozen))
    for later in ("image_encoder.stages.3.", "image_encoder.neck."):
        assert any(not torch.equal(sd0[k], sd1[k]) for k in sd0 if k.startswith(later)), later
    # a ViT has no stages to freeze: a clear error, before any step
    with pytest.raises(SegAnyError, match="frozen_stages"):
        train(tiny_cfg(tmp_path, out_dir=str(tmp_path / "vit"), frozen_stages=1, max_steps=1))
    with pytest.raises(SegAnyError, match="frozen_stages"):
        train(tiny_cfg(tmp_path, out_dir=str(tmp_path / "many"), checkpoint=str(ckpt), frozen_stages=8))
    with pytest.raises(SegAnyError, match="clicker_prob"):
        TrainConfig(clicker_prob=1.5)
    with pytest.raises(SegAnyError, match="max_free_clicks"):
        TrainConfig(max_free_clicks=-1)
