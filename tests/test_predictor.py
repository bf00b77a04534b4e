"""SamPredictor semantics on a tiny random model (parity with the reference is in test_parity.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segany import SamPredictor, SegAnyError
from tests.conftest import synthetic_image


@pytest.fixture()
def predictor(tiny_model):
    p = SamPredictor(tiny_model)
    p.set_image(synthetic_image(96, 128))
    return p


def test_shapes_for_every_prompt_kind(predictor):
    side = predictor.model.prompt_encoder.mask_input_size[0]
    pt, lab = np.array([[30.0, 40.0]]), np.array([1])
    cases = [
        dict(point_coords=pt, point_labels=lab),
        dict(point_coords=np.array([[30.0, 40], [100, 70]]), point_labels=np.array([1, 0])),
        dict(box=np.array([10, 10, 60, 50])),
        dict(point_coords=pt, point_labels=lab, box=np.array([10, 10, 60, 50])),
        dict(mask_input=np.zeros((1, side, side), np.float32)),
        dict(point_coords=pt, point_labels=lab, mask_input=np.zeros((1, side, side), np.float32)),
    ]
    for kwargs in cases:
        for multi in (True, False):
            masks, iou, low = predictor.predict(**kwargs, multimask_output=multi)
            c = 3 if multi else 1
            assert masks.shape == (c, 96, 128) and masks.dtype == bool
            assert iou.shape == (c,)
            assert low.shape == (c, side, side)


def test_return_logits_thresholds_to_masks(predictor):
    pt, lab = np.array([[30.0, 40.0]]), np.array([1])
    masks, _, _ = predictor.predict(pt, lab)
    logits, _, _ = predictor.predict(pt, lab, return_logits=True)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(masks, logits > 0)


def test_predict_torch_batches_match_single_calls(predictor):
    boxes = np.array([[10, 10, 60, 50], [50, 20, 120, 90]], np.float64)
    single = [predictor.predict(box=b, multimask_output=False)[2] for b in boxes]
    tb = torch.as_tensor(predictor.transform.apply_boxes(boxes, predictor.original_size), dtype=torch.float)
    _, _, low = predictor.predict_torch(None, None, boxes=tb, multimask_output=False)
    for i in range(2):
        np.testing.assert_allclose(low[i].numpy(), single[i], atol=1e-5)


def test_bgr_input_equals_rgb(tiny_model):
    img = synthetic_image()
    a, b = SamPredictor(tiny_model), SamPredictor(tiny_model)
    a.set_image(img)
    b.set_image(np.ascontiguousarray(img[..., ::-1]), image_format="BGR")
    torch.testing.assert_close(a.get_image_embedding(), b.get_image_embedding())


def test_embedding_reuse(tiny_model, predictor):
    other = SamPredictor(tiny_model)
    other.set_embedding(predictor.get_image_embedding(), predictor.original_size)
    pt, lab = np.array([[30.0, 40.0]]), np.array([1])
    np.testing.assert_array_equal(other.predict(pt, lab)[2], predictor.predict(pt, lab)[2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(point_coords=np.array([[np.nan, 1.0]]), point_labels=np.array([1])), "NaN"),
        (dict(point_coords=np.array([[np.inf, 1.0]]), point_labels=np.array([1])), "NaN or infinite"),
        (dict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([1, 0])), "labels"),
        (dict(point_coords=np.array([1.0, 2.0]), point_labels=np.array([1])), "shape"),
        (dict(point_coords=np.array([[1.0, 2.0]])), "point_labels"),
        (dict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([7])), "point_labels"),
        (dict(box=np.array([1.0, 2.0, 3.0])), "box"),
        (dict(mask_input=np.zeros((1, 10, 10))), "mask_input"),
    ],
)
def test_bad_prompts_raise_clear_errors(predictor, kwargs, message):
    with pytest.raises(SegAnyError, match=message):
        predictor.predict(**kwargs)


def test_bad_images_and_unset_image(tiny_model):
    p = SamPredictor(tiny_model)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(box=np.array([0, 0, 5, 5]))
    with pytest.raises(SegAnyError, match="H x W x 3"):
        p.set_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(SegAnyError, match="uint8"):
        p.set_image(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(SegAnyError, match="no pixels"):
        p.set_image(np.zeros((0, 10, 3), np.uint8))


def test_modules_are_trainable(tiny_model):
    """No torch.no_grad baked into forward: gradients reach every part of the model."""
    import copy

    model = copy.deepcopy(tiny_model).train()
    x = model.preprocess(torch.rand(1, 3, 128, 128) * 255)
    emb = model.image_encoder(x)
    sparse, dense = model.prompt_encoder((torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]])), None, None)
    low, iou = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, True)
    (low.mean() + iou.mean()).backward()
    assert model.image_encoder.patch_embed.proj.weight.grad is not None
    assert model.mask_decoder.iou_token.weight.grad is not None
    assert model.prompt_encoder.point_embeddings[1].weight.grad is not None
