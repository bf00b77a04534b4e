"""Parity of ``segany.SamAutomaticMaskGenerator`` with the official one, plus our own options.

Both generators run on the same random weights: a small official ``Sam`` (``build_reference_vit``) saved
as an official ``.pth`` and loaded with ``segany.load_model``. Every reference mask must have one of ours
at IoU >= 0.99, the counts must agree and the other record fields must match.

Random weights alone give useless candidates for "segment everything": the random transposed convolutions
paint a fine checkerboard over every mask and each mask's logits are dominated by a per-mask constant, so
the masks are either empty, the whole image or speckle, and box NMS keeps one of them.
:func:`make_masks_visible` edits a few decoder weights (the models stay random everywhere else) so that
the candidates are small, smooth, varied blobs with a spread of stability scores and predicted IoUs; then
every filter of the generator (IoU, stability, crop edges, NMS within and across crops, small regions)
has work to do.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import segany  # noqa: E402
from segany.automatic.generator import SamAutomaticMaskGenerator  # noqa: E402
from segany.errors import SegAnyError  # noqa: E402
from tests.reference import build_reference_vit, import_reference, save_official_checkpoint  # noqa: E402

# A small ViT; the decoder has 64 channels and 4 heads (the head count is not stored in a checkpoint:
# the loader assumes one head per 16 channels below 256, as this config has).
SMALL_VIT = {
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "global_attn_indexes": (1,),
    "image_size": 256,
    "window_size": 8,
    "prompt_embed_dim": 64,
    "mask_in_chans": 8,
    "decoder_num_heads": 4,
    "decoder_mlp_dim": 64,
    "iou_head_hidden_dim": 32,
    "seed": 0,
}

# Thresholds that keep a dozen of the calibrated random model's masks (predicted IoUs lie in about
# [0.5, 1.2], stability scores at offset 0.3 spread over [0, 1]).
LOW_THRESHOLDS = {"pred_iou_thresh": 0.8, "stability_score_thresh": 0.85, "stability_score_offset": 0.3}


def shapes_image(h: int = 96, w: int = 128) -> np.ndarray:
    """Dark left half, light right half, and four coloured shapes (deterministic)."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 10.0)
    img[:, w // 2 :] = 245
    img[h // 12 : h * 5 // 12, w // 12 : w * 5 // 12] = (230, 40, 40)
    img[h * 5 // 8 : h * 15 // 16, w * 19 // 32 : w * 55 // 64] = (40, 200, 60)
    img[(yy - h * 5 // 16) ** 2 + (xx - w * 3 // 4) ** 2 < (min(h, w) * 3 // 16) ** 2] = (30, 40, 220)
    img[h * 35 // 48 : h * 11 // 12, w // 12 : w * 25 // 64] = (240, 230, 50)
    return img.astype(np.uint8)


@torch.no_grad()
def make_masks_visible(
    sam: torch.nn.Module,
    predictor_cls: type,
    image: np.ndarray,
    quantile: float = 0.85,
    spread: float = 1.5,
    logit_scale: float = 10.0,
    background: float = 0.3,
    iou_shift: float = 0.9,
    sparsity: float = 0.0,
) -> torch.nn.Module:
    """Edit a random SAM's mask decoder in place so that "segment everything" finds masks in ``image``.

    1. Both transposed convolutions of ``output_upscaling`` get the same weights at their 4 kernel
       positions (a nearest-neighbour upsampling plus a channel mix): no checkerboard.
    2. Each output channel of the last one is standardized over ``image`` (scaled to ``spread`` standard
       deviations, shifted so that only its top ``1 - quantile`` is positive): after its GELU each
       channel is ~0 except at its own peaks, so a mask (a weighted sum of channels) is a union of peaks.
    3. Channel 0 is made a constant and the hypernetworks give it the weight ``-background``: the
       background logit is clearly negative. Mask logits are scaled by ``logit_scale``.
    4. The IoU head's output bias is raised by ``iou_shift`` (random heads predict about -0.4).
    5. ``sparsity`` lowers the hypernetworks' outputs (each mask's channel weights) for the other
       channels: fewer channels count per mask, so masks are smaller and more varied (useful with many
       channels, e.g. ViT-B's 32).

    ``predictor_cls`` is the predictor class of ``sam``'s package (used once, to read the activations).
    """
    md = sam.mask_decoder
    md.iou_prediction_head.layers[-1].bias += iou_shift
    up1, up2 = md.output_upscaling[0], md.output_upscaling[3]
    for conv in (up1, up2):
        conv.weight.copy_(conv.weight.mean((2, 3), keepdim=True).expand_as(conv.weight))
    predictor = predictor_cls(sam)
    predictor.set_image(image)
    seen: dict[str, torch.Tensor] = {}
    hook = up2.register_forward_hook(lambda _m, _i, out: seen.__setitem__("pre", out))
    try:
        h, w = image.shape[:2]
        predictor.predict(np.array([[w / 2, h / 2]]), np.array([1]))
    finally:
        hook.remove()
    in_h, in_w = predictor.input_size
    pre = seen["pre"][0, :, : in_h // 4, : in_w // 4].flatten(1)  # C x pixels, padding excluded
    scale = spread / pre.std(1)
    up2.weight.mul_(scale[None, :, None, None])
    up2.bias.copy_(scale * (up2.bias - torch.quantile(pre, quantile, dim=1)))
    up2.weight[:, 0] = 0.0
    up2.bias[0] = 2.0
    for mlp in md.output_hypernetworks_mlps:
        last = mlp.layers[-1]
        last.weight.mul_(logit_scale)
        last.bias.mul_(logit_scale)
        last.weight[0] = 0.0
        last.bias[0] = -background * logit_scale
        last.bias[1:] -= sparsity * logit_scale
    return sam


# -- comparing records -----------------------------------------------------------------------------


def decode(seg, mode: str) -> np.ndarray:
    if mode == "binary_mask":
        assert isinstance(seg, np.ndarray) and seg.dtype == bool and seg.ndim == 2
        return seg
    h, w = seg["size"]
    if mode == "uncompressed_rle":
        assert isinstance(seg["counts"], list) and all(isinstance(c, int) for c in seg["counts"])
        return mask_utils.decode(mask_utils.frPyObjects(seg, h, w)).astype(bool)
    assert mode == "coco_rle" and isinstance(seg["counts"], str)
    return mask_utils.decode({"size": [h, w], "counts": seg["counts"].encode()}).astype(bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def match(ref: list[dict], ours: list[dict], mode: str) -> tuple[list[tuple[dict, dict]], float]:
    """Pair each reference record with our best-IoU record (one-to-one); returns pairs and the worst IoU."""
    rm = [decode(r["segmentation"], mode) for r in ref]
    om = [decode(o["segmentation"], mode) for o in ours]
    pairs, worst, used = [], 1.0, set()
    for i, a in enumerate(rm):
        ious = [(-1.0 if j in used else mask_iou(a, b)) for j, b in enumerate(om)]
        j = int(np.argmax(ious)) if ious else -1
        best = ious[j] if ious else 0.0
        worst = min(worst, best)
        if j >= 0:
            used.add(j)
            pairs.append((ref[i], ours[j]))
    return pairs, worst


def assert_same_records(ref: list[dict], ours: list[dict], mode: str) -> None:
    assert len(ours) == len(ref), f"{len(ours)} masks, the reference has {len(ref)}"
    pairs, worst = match(ref, ours, mode)
    assert worst >= 0.99, f"a reference mask has no match: best IoU {worst:.4f}"
    for r, o in pairs:
        assert set(o) == set(r)
        assert abs(o["area"] - r["area"]) <= max(2, 0.01 * r["area"])
        assert np.allclose(o["bbox"], r["bbox"], atol=1), (o["bbox"], r["bbox"])
        assert o["predicted_iou"] == pytest.approx(r["predicted_iou"], abs=1e-4)
        assert o["stability_score"] == pytest.approx(r["stability_score"], abs=1e-2)
        assert np.allclose(o["point_coords"], r["point_coords"], atol=1e-4)
        assert o["crop_box"] == r["crop_box"]
        assert isinstance(o["area"], int) and all(isinstance(v, int) for v in o["bbox"] + o["crop_box"])
        same_mask = np.array_equal(decode(o["segmentation"], mode), decode(r["segmentation"], mode))
        if mode == "uncompressed_rle" and same_mask:
            assert o["segmentation"] == r["segmentation"]


def assert_same_decode(got, want, iou_thresh: float = 0.8) -> None:
    """Decoder outputs ``(IoUs, kept, low-res logits)`` equal up to summation order: another thread split or
    batch size may sum in another order, which is not a failure (measured: IoUs 1.2e-7 apart, logits 5.5e-5,
    on logits of magnitude ~10). A real change moves them by far more than these tolerances."""
    iou, keep, low = got
    iou0, keep0, low0 = want
    torch.testing.assert_close(iou, iou0, rtol=0, atol=1e-5)
    at_threshold = (iou0 - iou_thresh).abs() <= 1e-5  # only these may be kept by one and not the other
    assert torch.equal(keep | at_threshold, keep0 | at_threshold)
    if torch.equal(keep, keep0):
        torch.testing.assert_close(low, low0, rtol=1e-5, atol=1e-3)


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: a second thread only adds overhead (and loses badly on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(reference Sam, our Sam loaded from its official .pth, the image, the reference package)."""
    sa = import_reference()
    image = shapes_image()
    ref = make_masks_visible(build_reference_vit(**SMALL_VIT), sa.SamPredictor, image)
    path = save_official_checkpoint(ref, tmp_path_factory.mktemp("amg") / "sam_small.pth")
    ours = segany.load_model(path)
    return ref, ours, image, sa


def run_both(models, **kwargs) -> tuple[list[dict], list[dict]]:
    ref, ours, image, sa = models
    with torch.no_grad():
        ref_records = sa.SamAutomaticMaskGenerator(ref, **kwargs).generate(image)
    return ref_records, SamAutomaticMaskGenerator(ours, **kwargs).generate(image)


# -- parity ----------------------------------------------------------------------------------------

SETTINGS = {
    "filters": ({**LOW_THRESHOLDS, "points_per_side": 16}, 8),
    "filters_off": ({"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "points_per_side": 12}, 8),
    "crop_layer": ({**LOW_THRESHOLDS, "points_per_side": 8, "crop_n_layers": 1}, 3),
    "small_regions": ({**LOW_THRESHOLDS, "points_per_side": 16, "min_mask_region_area": 60}, 5),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_parity_binary_masks(models, name):
    kwargs, at_least = SETTINGS[name]
    ref, ours = run_both(models, **kwargs)
    assert len(ref) >= at_least, f"the setting is too strict for a meaningful check ({len(ref)} masks)"
    assert_same_records(ref, ours, "binary_mask")


@pytest.mark.parametrize("mode", ["uncompressed_rle", "coco_rle"])
def test_parity_rle_modes(models, mode):
    ref, ours = run_both(models, **LOW_THRESHOLDS, points_per_side=16, output_mode=mode)
    assert len(ref) >= 8
    assert_same_records(ref, ours, mode)


def test_parity_explicit_point_grid(models):
    grid = np.random.default_rng(3).uniform(0.05, 0.95, (150, 2))
    ref, ours = run_both(models, **LOW_THRESHOLDS, points_per_side=None, point_grids=[grid], points_per_batch=40)
    assert len(ref) >= 5
    assert_same_records(ref, ours, "binary_mask")


def test_fast_decoder_matches_the_model(models):
    """The re-associated decoder of the generator gives the model's own logits and IoUs."""
    from segany.modeling.fast.decoder import ReassociatedDecoder

    _ref, ours, image, _sa = models
    pred = segany.SamPredictor(ours)
    pred.set_image(image)
    pts = torch.as_tensor(np.random.default_rng(0).uniform(0, 256, (20, 1, 2)), dtype=torch.float)
    with torch.inference_mode():
        sparse, dense = ours.prompt_encoder(points=(pts, torch.ones(20, 1, dtype=torch.int)), boxes=None, masks=None)
        want_low, want_iou = ours.mask_decoder.predict_masks(
            pred.features, ours.prompt_encoder.get_dense_pe(), sparse, dense
        )
        assert ReassociatedDecoder.supports(ours)
        dec = ReassociatedDecoder.for_model(ours, pred.features)
        iou, mask_tokens, keys = dec.tokens(sparse)
        low = dec.masks(keys, mask_tokens, [0, 1, 2, 3])
    assert torch.allclose(iou, want_iou, atol=1e-5)
    scale = float(want_low.abs().max())
    assert float((low - want_low).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize(
    ("input_size", "original_size"),
    [((192, 256), (96, 128)), ((171, 256), (100, 150)), ((256, 256), (64, 64)), ((256, 13), (512, 26))],
)
def test_upsampling_only_the_rows_read_is_exact(models, input_size, original_size):
    """The fast model's post-processing of the re-associated decoder's partial maps (the top-left rows and
    columns the input reads) equals the plain post-processing of the whole map, on both of its paths."""
    from segany.modeling.fast import FastSam, postprocess
    from segany.modeling.low_res import low_res_rows
    from segany.modeling.sam import Sam

    _ref, ours, _image, _sa = models
    assert isinstance(ours, FastSam)
    low = torch.randn(5, 64, 64)
    want = Sam.postprocess_masks(ours, low[:, None], input_size, original_size)[:, 0]
    rows, cols = (low_res_rows(n, 64, ours.image_size) for n in input_size)
    assert rows <= 64 and cols <= 64
    part = low[:, None, :rows, :cols]
    # the interpolation path (autograd on) is exact; OpenCV's (inference) is the same function
    assert torch.equal(ours.postprocess_masks(part, input_size, original_size)[:, 0], want)
    assert torch.equal(ours.postprocess_masks(low[:, None], input_size, original_size)[:, 0], want)
    with torch.inference_mode():
        assert postprocess.use_fast_path(part)
        got = ours.postprocess_masks(part, input_size, original_size)[:, 0]
        assert torch.equal(ours.postprocess_masks(low[:, None], input_size, original_size)[:, 0], got)
        # OpenCV places the source pixels in double precision, torch in float (tests/test_perf.py)
        torch.testing.assert_close(got, want, rtol=0, atol=5e-4)


def test_generate_reuses_a_given_embedding(models):
    """``generate(image, embedding=...)`` (the server's cache) skips the encoder for the whole-image crop,
    not for the zoomed ones, and gives the same masks."""
    from segany.predictor import SamPredictor

    _ref, ours, image, _sa = models
    p = SamPredictor(ours)
    p.set_image(image)
    cached = {"embedding": p.get_image_embedding(), "original_size": p.original_size, "input_size": p.input_size,
              "decoder_inputs": p.get_decoder_inputs()}
    calls = []
    hook = ours.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        for layers in (0, 1):
            gen = SamAutomaticMaskGenerator(ours, **LOW_THRESHOLDS, points_per_side=8, crop_n_layers=layers)
            calls.clear()
            want = gen.generate(image)
            n_plain = len(calls)
            calls.clear()
            got = gen.generate(image, embedding=cached)
            assert len(calls) == n_plain - 1 == 4 * layers  # the whole image's encoding only is skipped
            assert want and len(got) == len(want)
            for a, b in zip(got, want):
                assert np.array_equal(a["segmentation"], b["segmentation"]) and a["bbox"] == b["bbox"]
    finally:
        hook.remove()


def test_decode_chunking_does_not_change_results(models, monkeypatch):
    import segany.modeling.fast.decoder as fast_decoder

    _ref, ours, image, _sa = models
    kwargs = {**LOW_THRESHOLDS, "points_per_side": 8}
    results = []
    for chunk in (1, 3, 64):
        monkeypatch.setattr(fast_decoder, "DECODE_CHUNK", chunk)
        results.append(SamAutomaticMaskGenerator(ours, **kwargs, output_mode="coco_rle").generate(image))
    assert results[0]
    for other in results[1:]:
        assert len(other) == len(results[0])
        assert match(results[0], other, "coco_rle")[1] >= 0.99


def test_decode_workers_same_results_and_settings_kept(models):
    """Prompts shared among one-core worker threads: same outputs; the caller's thread count is kept."""
    import threading

    from segany.modeling.fast.decoder import ReassociatedDecoder

    _ref, ours, image, _sa = models
    pred = segany.SamPredictor(ours)
    pred.set_image(image)
    pts = torch.as_tensor(np.random.default_rng(1).uniform(0, 256, (21, 1, 2)), dtype=torch.float)
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            sparse, _ = ours.prompt_encoder(points=(pts, torch.ones(21, 1, dtype=torch.int)), boxes=None, masks=None)
            dec = ReassociatedDecoder.for_model(ours, pred.features)
            region = dec.region(pred.input_size)
            shared = dec.decode(sparse, [1, 2, 3], 0.8, region)
            # The caller's work on each part runs in the worker, on that part's outputs.
            def then(start, out):
                return start, threading.current_thread().name, out

            parts = dec.decode(sparse, [1, 2, 3], 0.8, region, then=then)
            tasks = dec.decode(sparse, [1, 2, 3], 0.8, region, then=then, part=7)  # rounded up to chunks of 4
        assert torch.get_num_threads() == 2
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [2]  # a new thread still gets the process-wide default
    finally:
        torch.set_num_threads(1)
    with torch.inference_mode():  # on one thread, as each worker (two threads may sum in another order)
        alone = dec._decode(sparse, [1, 2, 3], 0.8, region)
    assert_same_decode(shared, alone)
    assert 0 < len(shared[2]) < 63
    assert len(parts) == 2 and [p[0] for p in parts] == [0, parts[0][2][0].shape[0]]
    assert all(name.startswith("segany-worker") for _, name, _ in parts)
    assert_same_decode([torch.cat([p[2][i] for p in parts]) for i in range(3)], alone)
    assert [t[0] for t in tasks] == [0, 8, 16]
    assert_same_decode([torch.cat([t[2][i] for t in tasks]) for i in range(3)], alone)
    with torch.inference_mode():  # one thread: the same tasks, in the calling thread
        one = dec.decode(sparse, [1, 2, 3], 0.8, region, then=then, part=7)
    me = threading.current_thread().name
    assert [(t[0], t[1]) for t in one] == [(0, me), (8, me), (16, me)]
    assert_same_decode([torch.cat([t[2][i] for t in one]) for i in range(3)], alone)


def test_fast_decoder_same_records_as_the_model_decoder(models):
    _ref, ours, image, _sa = models
    kwargs = {**LOW_THRESHOLDS, "points_per_side": 12, "crop_n_layers": 1, "output_mode": "coco_rle"}
    fast = SamAutomaticMaskGenerator(ours, **kwargs)
    plain = SamAutomaticMaskGenerator(ours, **kwargs)
    plain.fast_decoder = False
    got, want = fast.generate(image), plain.generate(image)
    assert len(got) == len(want) > 3
    pairs, worst = match(want, got, "coco_rle")
    assert worst >= 0.99
    for w, g in pairs:
        assert g["predicted_iou"] == pytest.approx(w["predicted_iou"], abs=1e-5)


# -- our own options -------------------------------------------------------------------------------


def test_max_mask_region_fraction_drops_whole_image_mask(models):
    _ref, ours, image, _sa = models
    everything = copy.deepcopy(ours)
    with torch.no_grad():  # a positive background logit: every candidate covers the whole image
        for mlp in everything.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].bias[0] = 50.0
    kwargs = {**LOW_THRESHOLDS, "points_per_side": 4}
    kept = SamAutomaticMaskGenerator(everything, **kwargs).generate(image)
    h, w = image.shape[:2]
    assert kept and max(r["area"] for r in kept) == h * w
    assert SamAutomaticMaskGenerator(everything, **kwargs, max_mask_region_fraction=0.95).generate(image) == []


def test_max_mask_region_fraction_keeps_the_rest(models):
    _ref, ours, image, _sa = models
    kwargs = {**LOW_THRESHOLDS, "points_per_side": 16, "output_mode": "coco_rle"}
    every = SamAutomaticMaskGenerator(ours, **kwargs).generate(image)
    areas = sorted(r["area"] for r in every)
    cut = (areas[-1] + areas[-2]) / 2 / image[..., 0].size  # between the two largest masks
    some = SamAutomaticMaskGenerator(ours, **kwargs, max_mask_region_fraction=cut).generate(image)
    assert some == [r for r in every if r["area"] <= cut * image[..., 0].size]
    assert len(some) == len(every) - 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"points_per_side": 0},
        {"points_per_side": -3},
        {"points_per_side": None},
        {"points_per_side": 8, "point_grids": [np.zeros((4, 2))]},
        {"points_per_side": None, "point_grids": [np.zeros((4, 2))], "crop_n_layers": 1},
        {"points_per_batch": 0},
        {"pred_iou_thresh": 1.5},
        {"pred_iou_thresh": -0.1},
        {"stability_score_thresh": 2.0},
        {"stability_score_offset": -1.0},
        {"box_nms_thresh": -0.5},
        {"crop_nms_thresh": 1.01},
        {"crop_n_layers": -1},
        {"crop_overlap_ratio": 1.0},
        {"crop_n_points_downscale_factor": 0},
        {"min_mask_region_area": -1},
        {"output_mode": "png"},
        {"max_mask_region_fraction": 0.0},
        {"max_mask_region_fraction": 1.5},
    ],
)
def test_bad_arguments(tiny_model, kwargs):
    with pytest.raises(SegAnyError):
        SamAutomaticMaskGenerator(tiny_model, **kwargs)


@pytest.mark.parametrize(
    "image",
    [np.zeros((32, 32, 3), np.float32), np.zeros((32, 32), np.uint8), np.zeros((32, 32, 4), np.uint8), "x.png"],
)
def test_bad_image(tiny_model, image):
    with pytest.raises(SegAnyError):
        SamAutomaticMaskGenerator(tiny_model, points_per_side=2).generate(image)


def test_records_are_plain_python(models):
    _ref, ours, image, _sa = models
    gen = SamAutomaticMaskGenerator(ours, **LOW_THRESHOLDS, points_per_side=8, output_mode="coco_rle")
    records = gen.generate(image)
    assert records
    for r in records:
        assert type(r["area"]) is int and type(r["predicted_iou"]) is float and type(r["stability_score"]) is float
        assert all(type(v) is int for v in r["bbox"] + r["crop_box"])
        assert all(type(v) is float for v in r["point_coords"][0])
