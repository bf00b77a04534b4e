"""The re-associated decoder's factored image tokens (``modeling/fast/factored.py``) are the plain transformer's
tokens, block by block, also with clicks drawn into the dense embedding (``modeling/fast/dense_cells.py``);
the thresholded fast post-processing and the NumPy stability score are the plain computations."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from segany.modeling import build_sam, get_config
from segany.modeling.dense_prompt_encoder import DensePromptEncoder
from segany.modeling.fast.decoder import ReassociatedDecoder
from segany.modeling.fast.dense_cells import cell_size, constant_dense
from segany.modeling.fast.factored import FactoredDecoderSide, FactoredTokens
from segany.modeling.fast.postprocess import postprocess_masks
from segany.utils.masks import calculate_stability_score


def _model(depth: int) -> torch.nn.Module:
    """The tiny test model with ``depth`` decoder blocks and random values everywhere (the default
    LayerNorm weights of one and biases of zero would hide mistakes in the LayerNorm algebra)."""
    torch.manual_seed(depth)
    cfg = get_config("tiny_test")
    cfg.decoder_depth = depth
    model = build_sam(cfg).eval()
    g = torch.Generator().manual_seed(depth)
    with torch.no_grad():
        for name, p in model.mask_decoder.named_parameters():
            scale = 0.5 if "norm" in name and name.endswith("weight") else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm4.weight") else 0.0))
    return model


def _materialize(side: FactoredDecoderSide, x: FactoredTokens) -> torch.Tensor:
    """``diag(s) K M + coef^T R``: ``B x N x C``."""
    base = side.image.tokens(x.level)[None]
    if x.s is not None:
        base = base * x.s[..., None]
    return base + x.coef.transpose(1, 2) @ x.rows(side.plan)


def _prompts(model: torch.nn.Module, kind: str) -> torch.Tensor:
    pe = model.prompt_encoder
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(3, 2, 2, generator=g) * model.image_size
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
    box = torch.tensor([[10.0, 20.0, 90.0, 100.0]] * 3)
    with torch.inference_mode():
        if kind == "points":
            return pe(points=(pts, labels), boxes=None, masks=None)[0]
        return pe(points=(pts[:, :1], labels[:, :1]), boxes=box, masks=None)[0]


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("kind", ["points", "box"])
def test_factored_tokens_are_the_plain_transformers(depth, kind):
    model = _model(depth)
    md, tr = model.mask_decoder, model.mask_decoder.transformer
    sparse = _prompts(model, kind)
    features = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(2))
    pe = model.prompt_encoder
    with torch.inference_mode():
        dense_pe = pe.get_dense_pe()
        dec = ReassociatedDecoder.for_model(model, features)
        side = dec.side
        # The plain transformer, block by block, next to the factored one.
        b = sparse.shape[0]
        out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0)
        qpe = torch.cat([out_tokens[None].expand(b, -1, -1), sparse], 1)
        keys = (features + pe.no_mask_embed.weight.view(1, -1, 1, 1)).flatten(2).transpose(1, 2).expand(b, -1, -1)
        key_pe = dense_pe.flatten(2).transpose(1, 2)
        queries, x_queries, x = qpe, qpe, None
        for j, layer in enumerate(tr.layers):
            queries, keys = layer(queries, keys, qpe, key_pe)
            # The same block with the image tokens factored (the token side is the plain code's).
            x_queries, x = dec.block(j, layer, x_queries, qpe, x)
            assert x.level == j + 1
            assert float((x_queries - queries).abs().max()) < 1e-4
            assert float((_materialize(side, x) - keys).abs().max()) < 1e-4 * float(keys.abs().max())
        # The whole decoder: tokens, IoUs and masks.
        iou, _mask_tokens, x = dec.tokens(sparse)
        want_masks, want_iou = md.predict_masks(features, dense_pe, sparse, pe.no_mask_embed.weight.view(1, -1, 1, 1))
        got = dec.masks(x, _mask_tokens, list(range(md.num_mask_tokens)))
        assert float((_materialize(side, x) - keys).abs().max()) < 1e-4 * float(keys.abs().max())
    assert torch.allclose(iou, want_iou, atol=1e-5)
    assert float((got - want_masks).abs().max()) <= 1e-5 * float(want_masks.abs().max())


def test_factored_tokens_of_one_prompt_of_a_batch():
    model = _model(2)
    sparse = _prompts(model, "points")
    features = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        dec = ReassociatedDecoder.for_model(model, features)
        iou, mask_tokens, x = dec.tokens(sparse)
        batch = dec.masks(x, mask_tokens, [1, 2, 3], region=(5, 7))
        for i in range(sparse.shape[0]):
            alone = ReassociatedDecoder.for_model(model, features)
            iou_i, mask_tokens_i, x_i = alone.tokens(sparse[i : i + 1])
            assert torch.allclose(iou_i, iou[i : i + 1], atol=1e-6)
            one = dec.masks(x.select(i), mask_tokens[i : i + 1], [1, 2, 3], region=(5, 7))
            assert torch.allclose(one, batch[i : i + 1], atol=1e-5)
            assert torch.allclose(alone.masks(x_i, mask_tokens_i, [1, 2, 3], region=(5, 7)), one, atol=1e-5)


def test_positional_encoding_products_are_shared_by_images_and_renewed_with_the_weights():
    model = _model(2)
    md, pe = model.mask_decoder, model.prompt_encoder
    sparse = _prompts(model, "points")
    dense = pe.no_mask_embed.weight.view(1, -1, 1, 1)
    g = torch.Generator().manual_seed(4)

    def decode_new_image() -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.randn(1, 32, 8, 8, generator=g)
        with torch.inference_mode():
            dec = ReassociatedDecoder.for_model(model, features)
            iou, mask_tokens, x = dec.tokens(sparse)
            got = dec.masks(x, mask_tokens, list(range(md.num_mask_tokens)))
            want, want_iou = md.predict_masks(features, pe.get_dense_pe(), sparse, dense)
        assert torch.allclose(iou, want_iou, atol=1e-5)
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
        return got

    decode_new_image()
    products = {k: v[2] for k, v in md._pe_products[1].items()}
    assert products  # the blocks after the first read the encoding through its products
    decode_new_image()  # another image: the same product tensors
    assert all(md._pe_products[1][k][2] is v for k, v in products.items())
    with torch.no_grad():  # new weights (as a fine-tune or load_state_dict would write them in place)
        for layer in md.transformer.layers[1:]:
            layer.cross_attn_token_to_image.k_proj.weight.mul_(1.5)
    decode_new_image()  # matches the plain decoder with the new weights
    assert any(md._pe_products[1][k][2] is not v for k, v in products.items())


@pytest.mark.parametrize(
    ("low", "image_size", "input_size", "original_size"),
    [
        (256, 1024, (683, 1024), (681, 1024)),
        (256, 1024, (683, 1024), (341, 512)),  # 4x up then 2x down
        (256, 1024, (1024, 683), (1024, 681)),
        (32, 128, (96, 128), (96, 128)),  # no second resize
        (64, 256, (171, 256), (100, 150)),
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_thresholded_fast_postprocessing(low, image_size, input_size, original_size, threads):
    masks = torch.randn(1, 3, low, low, generator=torch.Generator().manual_seed(4)) * 5
    x = F.interpolate(masks, (image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    want = F.interpolate(x, original_size, mode="bilinear", align_corners=False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # one or two: the same answers
    try:
        with torch.inference_mode():
            logits = postprocess_masks(masks, image_size, input_size, original_size)
            binary = postprocess_masks(masks, image_size, input_size, original_size, threshold=0.0)
    finally:
        torch.set_num_threads(before)
    assert float((logits - want).abs().max()) < 5e-4  # OpenCV's source positions (tests/test_perf.py)
    assert binary.dtype == torch.bool and binary.shape == want.shape
    sure = want.abs() > 1e-3
    assert torch.equal(binary[sure], (want > 0)[sure])
    assert torch.equal(binary, logits > 0)


def test_numpy_stability_score_is_the_torch_one():
    logits = torch.randn(5, 37, 53, generator=torch.Generator().manual_seed(5)) * 3
    logits[2] = -10.0  # all background: NaN, as the official code
    got = calculate_stability_score(logits, 0.0, 1.0)
    want = calculate_stability_score(logits.double(), 0.0, 1.0)  # float64 takes the torch path
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got.isnan(), want.isnan()) and bool(got.isnan()[2])
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


# -- clicks drawn into the dense embedding (DensePromptEncoder, modeling/fast/dense_cells.py) -----------


def _dense_model(depth: int) -> torch.nn.Module:
    """The tiny test model with clicks drawn into its dense embedding (4 input pixels per map pixel, 16 per
    embedding cell, click radius 10: a click touches up to 3 x 3 cells, as in the default model), random values
    in the decoder and in the downscaler too."""
    torch.manual_seed(depth)
    cfg = dataclasses.replace(get_config("tiny_test"), dense_prompts=True, decoder_depth=depth)
    model = build_sam(cfg).eval()
    g = torch.Generator().manual_seed(depth)
    with torch.no_grad():
        for name, p in [*model.mask_decoder.named_parameters(), *model.prompt_encoder.named_parameters()]:
            scale = 0.5 if "norm" in name and name.endswith("weight") else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm4.weight") else 0.0))
    return model


# Two clicks per prompt (label -1: padding): at the corners and the borders of the 128-pixel input, two in
# one embedding cell, a positive and a negative one, on a cell corner (the most cells), far apart.
DENSE_CLICKS = (
    torch.tensor(
        [
            [[0.0, 0.0], [127.9, 127.9]],
            [[127.5, 3.0], [0.0, 0.0]],
            [[35.0, 33.0], [38.5, 36.0]],
            [[48.0, 48.0], [90.0, 20.0]],
            [[64.0, 127.0], [5.0, 70.0]],
        ]
    ),
    torch.tensor([[1, 1], [1, -1], [1, 1], [1, 0], [0, 1]]),
)


def test_dense_cells_are_the_encoders_dense_embedding():
    """The per-image vector plus each prompt's cells is the encoder's whole dense embedding, and only a
    click's nearby cells are listed (at most 3 x 3 per click here)."""
    pe = _dense_model(2).prompt_encoder
    with torch.inference_mode():
        want = DensePromptEncoder.dense_embedding(pe, DENSE_CLICKS, None, None, 5)  # the maps: B x C x 8 x 8
        sparse, cells = ReassociatedDecoder.embed_points(pe, DENSE_CLICKS)
        got = constant_dense(pe)[None, :, None].repeat(5, 1, 64)  # B x C x N
        got.scatter_add_(2, cells.index[:, None].expand(-1, got.shape[1], -1), cells.delta.transpose(1, 2))
        assert torch.equal(sparse, pe(points=DENSE_CLICKS, boxes=None, masks=None)[0])
    assert float((got.view_as(want) - want).abs().max()) < 1e-5 * float(want.abs().max())
    changed = (want - want[:, :, :1, :1]).abs().amax(1).flatten(1) > 0  # cells unlike the top left one
    listed = torch.zeros_like(changed)
    listed.scatter_(1, cells.index, cells.delta.abs().amax(-1) > 0)
    assert torch.equal(listed[1:], changed[1:])  # (prompt 0 clicks the top left cell itself)
    assert cells.index.shape[1] <= 18
    for index, delta in zip(cells.index, cells.delta):  # each cell once (the two clicks of prompt 2 share one)
        index = index[delta.abs().amax(-1) > 0].tolist()
        assert len(set(index)) == len(index)
    assert 18 in cells.index[2].tolist()  # that cell, (2, 2)


def test_the_fast_dense_encoder_draws_clicks_cell_by_cell():
    """At inference the default's prompt encoder builds a clicks-only dense embedding from the clicks' cells
    (the maps' result) and hands those cells to the fast decoder; a box or a mask input takes the maps."""
    pe = _dense_model(2).prompt_encoder
    with torch.inference_mode():
        want = DensePromptEncoder.dense_embedding(pe, DENSE_CLICKS, None, None, 5)
        got = pe(points=DENSE_CLICKS, boxes=None, masks=None)[1]
        assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
        vec, cells = pe.cells_of(got)
        assert torch.equal(vec, constant_dense(pe)) and cells.index.shape[0] == 5
        assert pe.cells_of(got.clone()) is None  # only the tensor it made
        boxed = pe(points=DENSE_CLICKS, boxes=torch.tensor([[10.0, 10.0, 60.0, 60.0]] * 5), masks=None)[1]
        assert pe.cells_of(boxed) is None and pe.cells_of(got) is None  # forgotten after the next call
    with torch.no_grad():  # not an inference tensor: the decoder compares the cells itself
        assert pe.cells_of(pe(points=DENSE_CLICKS, boxes=None, masks=None)[1]) is None


def test_the_kept_empty_cell_follows_the_weights():
    """The downscaled empty patch is computed once per prompt encoder and again after its weights change in
    place (as a fine-tune or load_state_dict writes them), so the clicks' embedding stays the maps' result."""
    pe = _dense_model(2).prompt_encoder
    with torch.inference_mode():
        first = constant_dense(pe)
        assert constant_dense(pe) is first  # kept
    with torch.no_grad():
        pe.mask_downscaling[0].weight.mul_(1.5)
        pe.no_mask_embed.weight.add_(0.25)
    with torch.inference_mode():
        renewed = constant_dense(pe)
        assert renewed is not first and not torch.equal(renewed, first)
        want = DensePromptEncoder.dense_embedding(pe, DENSE_CLICKS, None, None, 5)
        got = pe(points=DENSE_CLICKS, boxes=None, masks=None)[1]
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


@pytest.mark.parametrize("depth", [2, 3])
def test_factored_tokens_with_dense_cells_are_the_plain_transformers(depth):
    model = _dense_model(depth)
    md, tr, pe = model.mask_decoder, model.mask_decoder.transformer, model.prompt_encoder
    features = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(2))
    assert ReassociatedDecoder.supports(model)
    with torch.inference_mode():
        sparse, dense = pe(points=DENSE_CLICKS, boxes=None, masks=None)
        _, cells = ReassociatedDecoder.embed_points(pe, DENSE_CLICKS)
        dense_pe = pe.get_dense_pe()
        dec = ReassociatedDecoder.for_model(model, features)
        b = sparse.shape[0]
        out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0)
        qpe = torch.cat([out_tokens[None].expand(b, -1, -1), sparse], 1)
        keys = (features + dense).flatten(2).transpose(1, 2)
        key_pe = dense_pe.flatten(2).transpose(1, 2)
        queries, x_queries, x = qpe, qpe, None
        for j, layer in enumerate(tr.layers):
            queries, keys = layer(queries, keys, qpe, key_pe)
            x_queries, x = dec.block(j, layer, x_queries, qpe, x, cells if j == 0 else None)
            assert float((x_queries - queries).abs().max()) < 1e-4
            assert float((_materialize(dec.side, x) - keys).abs().max()) < 1e-4 * float(keys.abs().max())
        iou, mask_tokens, x = dec.tokens(sparse, cells)
        got = dec.masks(x, mask_tokens, list(range(md.num_mask_tokens)))
        want_masks, want_iou = md.predict_masks(features, dense_pe, sparse, dense)
        # decode(): prompt by prompt through the workers' chunks, the same outputs
        iou2, _keep, low = dec.decode(sparse, [1, 2, 3], 0.0, cells=cells)
    assert torch.allclose(iou, want_iou, atol=1e-5)
    assert float((got - want_masks).abs().max()) <= 1e-5 * float(want_masks.abs().max())
    assert torch.allclose(iou2, want_iou[:, 1:], atol=1e-5)
    assert float((low.view(b, 3, 32, 32) - want_masks[:, 1:]).abs().max()) <= 1e-5 * float(want_masks.abs().max())
    # Without its cells a prompt is decoded as if its clicks were not drawn: the cells matter.
    with torch.inference_mode():
        iou3 = dec.tokens(sparse)[0]
    assert float((iou3 - want_iou).abs().max()) > 1e-3


def test_dense_model_whose_downscaler_is_not_local_keeps_the_plain_decoder():
    model = _dense_model(2)
    pe = model.prompt_encoder
    assert cell_size(pe) == 4
    pe.mask_downscaling[3] = torch.nn.Conv2d(2, 8, kernel_size=3, stride=2, padding=1)  # cells see their neighbours
    assert cell_size(pe) is None
    assert not ReassociatedDecoder.supports(model)
