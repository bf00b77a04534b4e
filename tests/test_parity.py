"""Parity with the official implementations: random weights in the official checkpoint layouts, loaded
by ``segany.load_model`` with no model type, must give the outputs of the reference ``SamPredictor``
(``segment_anything`` for the ViT encoder, ``mobile_sam`` for TinyViT).

Tolerances: low-res logits 1e-4 (max abs), IoU predictions 1e-5, embeddings 1e-4; binary masks equal
except where the reference logit is within 1e-4 of the threshold.
"""

from __future__ import annotations

import os
import pickle
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import segany  # noqa: E402
from segany.errors import SegAnyError  # noqa: E402
from tests.reference import (  # noqa: E402
    build_reference_tiny_vit,
    build_reference_vit,
    import_mobile_sam,
    import_reference,
    save_official_checkpoint,
)

LOGIT_TOL = 1e-4
IOU_TOL = 1e-5
EMBED_TOL = 1e-4

# Small configs: a 256-pixel ViT (window 7 on a 16x16 grid, so windows are padded) and a TinyViT with
# MobileSAM's hard-coded constraints (1024 input, last stage 320 wide; everything else tiny). The
# TinyViT runs at 1024 because a TinyViT checkpoint does not record its input size, so a loader that
# is given no model type must assume MobileSAM's 1024.
VIT_KW = {
    "embed_dim": 48,
    "depth": 3,
    "num_heads": 3,
    "global_attn_indexes": (1,),
    "image_size": 256,
    "window_size": 7,
    "mask_in_chans": 8,
    "decoder_mlp_dim": 512,
    "iou_head_hidden_dim": 64,
    "seed": 1,
}
TINY_KW = {
    "embed_dims": (16, 32, 40, 320),
    "depths": (1, 1, 2, 1),
    "num_heads": (1, 2, 2, 10),
    "window_sizes": (7, 7, 14, 7),
    "image_size": 1024,
    "decoder_mlp_dim": 512,
    "seed": 2,
}


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (bicubic upsampling of coarse noise) plus a little fine noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-8, 9, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _make_case(kind: str, tmp_dir: Path) -> SimpleNamespace:
    if kind == "vit":
        ref_pkg = import_reference()
        ref = build_reference_vit(**VIT_KW)
        path = save_official_checkpoint(ref, tmp_dir / "sam_small.pth")
        image = smooth_image(150, 200, seed=3)  # landscape
    else:
        ref_pkg = import_mobile_sam()
        ref = build_reference_tiny_vit(**TINY_KW)
        path = save_official_checkpoint(ref, tmp_dir / "mobile_sam_small.pt")
        image = smooth_image(210, 160, seed=4)  # portrait
    ours = segany.load_model(path)  # no model type: detected from the tensors
    ref_pred = ref_pkg.SamPredictor(ref)
    our_pred = segany.SamPredictor(ours)
    with torch.no_grad():
        ref_pred.set_image(image)
    our_pred.set_image(image)
    h, w = image.shape[:2]
    return SimpleNamespace(
        kind=kind, ref=ref, ours=ours, path=path, image=image, h=h, w=w, ref_pred=ref_pred, our_pred=our_pred
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These models are small: one thread is as fast on an idle machine and several times faster on a
    # busy one (two OpenMP threads on two shared cores spin-wait). Restored for the other modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vit_case(tmp_path_factory):
    return _make_case("vit", tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    return _make_case("tiny_vit", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(params=["vit", "tiny_vit"])
def case(request):
    return request.getfixturevalue("vit_case" if request.param == "vit" else "tiny_case")


def _maxdiff(a, b) -> float:
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a - b).abs().max()) if a.numel() else 0.0


def _check_binary(ref_logits, our_masks, label: str) -> None:
    ref_logits = torch.as_tensor(np.asarray(ref_logits) if not isinstance(ref_logits, torch.Tensor) else ref_logits)
    our_masks = torch.as_tensor(np.asarray(our_masks) if not isinstance(our_masks, torch.Tensor) else our_masks)
    assert our_masks.dtype == torch.bool, f"{label}: masks dtype {our_masks.dtype}"
    assert our_masks.shape == ref_logits.shape
    differ = our_masks != (ref_logits > 0.0)
    near = ref_logits.abs() < LOGIT_TOL
    assert not (differ & ~near).any(), f"{label}: {int((differ & ~near).sum())} mask pixels differ"


def _compare_predict(case, label: str, **prompt) -> np.ndarray:
    """Run ``predict`` on both predictors (binary masks and logits) and compare everything.
    Returns the reference low-res logits."""
    with torch.no_grad():
        r_logits, r_iou, r_low = case.ref_pred.predict(**prompt, return_logits=True)
    o_logits, o_iou, o_low = case.our_pred.predict(**prompt, return_logits=True)
    o_masks, o_iou2, o_low2 = case.our_pred.predict(**prompt)
    n = 3 if prompt.get("multimask_output", True) else 1
    assert o_low.shape == r_low.shape == (n, case.ours.image_size // 4, case.ours.image_size // 4)
    assert o_logits.shape == r_logits.shape == (n, case.h, case.w)
    assert o_iou.shape == r_iou.shape == (n,)
    d_low, d_iou, d_full = _maxdiff(o_low, r_low), _maxdiff(o_iou, r_iou), _maxdiff(o_logits, r_logits)
    msg = f"{case.kind} {label}: low-res {d_low:.2e}, iou {d_iou:.2e}, full logits {d_full:.2e}"
    print(msg)
    assert d_low <= LOGIT_TOL, msg
    assert d_iou <= IOU_TOL, msg
    assert d_full <= LOGIT_TOL, msg
    assert _maxdiff(o_low2, o_low) == 0.0 and _maxdiff(o_iou2, o_iou) == 0.0  # return_logits changes nothing else
    _check_binary(r_logits, o_masks, f"{case.kind} {label}")
    return r_low


# ---------------------------------------------------------------------------------------------- embedding


def test_loaded_config_matches_reference(case):
    cfg = case.ours.config
    if case.kind == "vit":
        enc = cfg.encoder
        assert (enc.kind, enc.embed_dim, enc.depth, enc.num_heads, enc.window_size) == ("vit", 48, 3, 3, 7)
        assert tuple(enc.global_attn_indexes) == (1,)
        assert (cfg.image_size, cfg.mask_in_chans, cfg.decoder_mlp_dim, cfg.iou_head_hidden_dim) == (256, 8, 512, 64)
    else:
        enc = cfg.encoder
        assert enc.kind == "tiny_vit"
        assert tuple(enc.embed_dims) == TINY_KW["embed_dims"] and tuple(enc.depths) == TINY_KW["depths"]
        assert tuple(enc.num_heads)[1:] == TINY_KW["num_heads"][1:]
        assert tuple(enc.window_sizes)[1:] == TINY_KW["window_sizes"][1:]
        assert cfg.image_size == 1024
    ref_sd = case.ref.state_dict()
    for k, v in case.ours.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k


def test_image_embedding(case):
    assert case.our_pred.original_size == tuple(case.ref_pred.original_size)
    assert case.our_pred.input_size == tuple(case.ref_pred.input_size)
    r = case.ref_pred.get_image_embedding()
    o = case.our_pred.get_image_embedding()
    d = _maxdiff(o, r)
    print(f"{case.kind} embedding {tuple(r.shape)}: max abs diff {d:.2e} (ref max |x| {float(r.abs().max()):.2f})")
    assert d <= EMBED_TOL


def test_resized_input_identical(case):
    # The image the encoder sees: the official ResizeLongestSide (PIL bilinear through torchvision).
    r = case.ref_pred.transform.apply_image(case.image)
    o = case.our_pred.transform.apply_image(case.image)
    assert r.shape == o.shape and np.array_equal(r, o)


# ---------------------------------------------------------------------------------------------- predict


@pytest.mark.parametrize("multimask", [True, False])
def test_one_point(case, multimask):
    pts = np.array([[0.37 * case.w, 0.55 * case.h]])
    _compare_predict(
        case, f"one point mm={multimask}", point_coords=pts, point_labels=np.array([1]), multimask_output=multimask
    )


@pytest.mark.parametrize("multimask", [True, False])
def test_points_pos_neg(case, multimask):
    pts = np.array([[0.2 * case.w, 0.3 * case.h], [0.7 * case.w, 0.6 * case.h], [0.5 * case.w, 0.9 * case.h]])
    _compare_predict(
        case,
        f"points +-+ mm={multimask}",
        point_coords=pts,
        point_labels=np.array([1, 0, 1]),
        multimask_output=multimask,
    )


@pytest.mark.parametrize("multimask", [True, False])
def test_box(case, multimask):
    box = np.array([0.1 * case.w, 0.2 * case.h, 0.8 * case.w, 0.75 * case.h])
    _compare_predict(case, f"box mm={multimask}", box=box, multimask_output=multimask)


@pytest.mark.parametrize("multimask", [True, False])
def test_box_and_point(case, multimask):
    box = np.array([0.15 * case.w, 0.1 * case.h, 0.9 * case.w, 0.7 * case.h])
    pts = np.array([[0.4 * case.w, 0.4 * case.h]])
    _compare_predict(
        case,
        f"box+point mm={multimask}",
        box=box,
        point_coords=pts,
        point_labels=np.array([0]),
        multimask_output=multimask,
    )


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_input_feedback(case, multimask):
    pts = np.array([[0.6 * case.w, 0.35 * case.h]])
    labels = np.array([1])
    with torch.no_grad():
        _, iou, low = case.ref_pred.predict(point_coords=pts, point_labels=labels, multimask_output=True)
    mask_input = low[int(np.argmax(iou))][None]  # the official interactive loop feeds the best mask back
    pts2 = np.concatenate([pts, [[0.25 * case.w, 0.8 * case.h]]])
    _compare_predict(
        case,
        f"points+mask mm={multimask}",
        point_coords=pts2,
        point_labels=np.array([1, 0]),
        mask_input=mask_input,
        multimask_output=multimask,
    )
    _compare_predict(case, f"mask only mm={multimask}", mask_input=mask_input, multimask_output=multimask)


# ---------------------------------------------------------------------------------------------- predict_torch


def _compare_torch(case, label: str, **kw) -> None:
    with torch.no_grad():
        r_logits, r_iou, r_low = case.ref_pred.predict_torch(**kw, return_logits=True)
    o_logits, o_iou, o_low = case.our_pred.predict_torch(**kw, return_logits=True)
    o_masks, _, _ = case.our_pred.predict_torch(**kw)
    d_low, d_iou, d_full = _maxdiff(o_low, r_low), _maxdiff(o_iou, r_iou), _maxdiff(o_logits, r_logits)
    msg = f"{case.kind} {label}: low-res {d_low:.2e}, iou {d_iou:.2e}, full logits {d_full:.2e}"
    print(msg)
    assert d_low <= LOGIT_TOL and d_iou <= IOU_TOL and d_full <= LOGIT_TOL, msg
    _check_binary(r_logits, o_masks, f"{case.kind} {label}")


@pytest.mark.parametrize("multimask", [True, False])
def test_predict_torch_boxes(case, multimask):
    boxes = torch.tensor(
        [[0.1, 0.1, 0.6, 0.5], [0.3, 0.2, 0.95, 0.9], [0.0, 0.5, 0.4, 1.0]], dtype=torch.float
    ) * torch.tensor([case.w, case.h, case.w, case.h], dtype=torch.float)
    o_boxes = case.our_pred.transform.apply_boxes_torch(boxes, case.our_pred.original_size)
    boxes = case.ref_pred.transform.apply_boxes_torch(boxes, case.ref_pred.original_size)
    assert _maxdiff(o_boxes, boxes) == 0.0
    _compare_torch(
        case,
        f"predict_torch 3 boxes mm={multimask}",
        point_coords=None,
        point_labels=None,
        boxes=boxes,
        multimask_output=multimask,
    )


@pytest.mark.parametrize("multimask", [True, False])
def test_predict_torch_point_sets(case, multimask):
    rng = np.random.default_rng(7)
    coords = rng.uniform(0, 1, (4, 3, 2)) * np.array([case.w, case.h])
    labels = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, -1, -1]], dtype=torch.int)
    r_coords = case.ref_pred.transform.apply_coords_torch(
        torch.as_tensor(coords, dtype=torch.float), case.ref_pred.original_size
    )
    o_coords = case.our_pred.transform.apply_coords_torch(
        torch.as_tensor(coords, dtype=torch.float), case.our_pred.original_size
    )
    assert _maxdiff(o_coords, r_coords) == 0.0
    _compare_torch(
        case,
        f"predict_torch 4 point sets mm={multimask}",
        point_coords=r_coords,
        point_labels=labels,
        multimask_output=multimask,
    )


# ---------------------------------------------------------------------------------------------- checkpoints


def test_mobile_sam_layout_carries_head_keys(tiny_case):
    sd = torch.load(tiny_case.path, map_location="cpu", weights_only=True)
    extra = [k for k in sd if k.startswith(("image_encoder.head.", "image_encoder.norm_head."))]
    assert sorted(extra) == [
        "image_encoder.head.bias",
        "image_encoder.head.weight",
        "image_encoder.norm_head.bias",
        "image_encoder.norm_head.weight",
    ]
    assert not any(k.startswith("image_encoder.head.") for k in tiny_case.ours.state_dict())


def test_safetensors_round_trip(vit_case, tmp_path):
    p = tmp_path / "small.safetensors"
    segany.save_model(vit_case.ours, p)
    again = segany.load_model(p)
    for k, v in vit_case.ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    pred = segany.SamPredictor(again)
    pred.set_image(vit_case.image)
    pts, labels = np.array([[50.0, 60.0]]), np.array([1])
    a = pred.predict(point_coords=pts, point_labels=labels)
    b = vit_case.our_pred.predict(point_coords=pts, point_labels=labels)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pickle_with_code_is_refused(vit_case, tmp_path, how):
    marker = tmp_path / "pwned"
    sd = {k: v for k, v in torch.load(vit_case.path, weights_only=True).items()}
    sd["evil"] = _RunsCode(marker)
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save(sd, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(sd, f, protocol=2)
    with pytest.raises(SegAnyError) as e:
        segany.load_model(path)
    assert str(path) in str(e.value)
    assert not marker.exists(), "unpickling ran code"
    # The payload is live: an unsafe load does run it (so the check above means something).
    if how == "torch.save":
        torch.load(path, map_location="cpu", weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)  # deliberately unsafe, in a temp dir
    assert marker.exists()


def test_truncated_file(vit_case, tmp_path):
    data = vit_case.path.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SegAnyError) as e:
        segany.load_model(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("key", ["mask_decoder.iou_token.weight", "image_encoder.neck.2.weight"])
def test_missing_key_is_named(vit_case, tmp_path, key):
    sd = torch.load(vit_case.path, weights_only=True)
    del sd[key]
    path = tmp_path / "missing.pth"
    torch.save(sd, path)
    with pytest.raises(SegAnyError) as e:
        segany.load_model(path)
    assert key in str(e.value)


def test_wrong_shape_is_named(vit_case, tmp_path):
    key = "image_encoder.blocks.0.mlp.lin2.weight"
    sd = torch.load(vit_case.path, weights_only=True)
    sd[key] = sd[key][:, :-4].clone()
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    with pytest.raises(SegAnyError) as e:
        segany.load_model(path)
    assert key in str(e.value)


def test_reference_outputs_not_degenerate(case):
    # Guards the parity tests themselves: random weights must give varied logits and mixed masks.
    pts = np.array([[0.37 * case.w, 0.55 * case.h]])
    with torch.no_grad():
        logits, iou, low = case.ref_pred.predict(point_coords=pts, point_labels=np.array([1]), return_logits=True)
    assert low.std() > 0.3
    frac = (logits > 0).mean(axis=(1, 2))
    assert ((frac > 0.02) & (frac < 0.98)).any(), frac
    assert np.ptp(iou) > 1e-3


def test_reference_binary_masks_are_thresholded_logits(vit_case):
    # The parity checks derive the reference's binary masks from its logits; that is what it does.
    pts = np.array([[0.5 * vit_case.w, 0.5 * vit_case.h]])
    with torch.no_grad():
        logits, _, _ = vit_case.ref_pred.predict(point_coords=pts, point_labels=np.array([1]), return_logits=True)
        masks, _, _ = vit_case.ref_pred.predict(point_coords=pts, point_labels=np.array([1]))
    assert masks.dtype == bool and np.array_equal(masks, logits > vit_case.ref.mask_threshold)


def test_batched_nms_stand_in():
    # The reference automatic mask generator relies on the stand-in's batched_nms being torchvision's.
    from tests.reference import batched_nms, box_area

    boxes = torch.tensor(
        [
            [0, 0, 10, 10],  # 0: best of category 0
            [1, 1, 11, 11],  # 1: IoU 81/119 = 0.68 with 0 -> suppressed at 0.5, kept at 0.7
            [0, 0, 10, 10],  # 2: same box as 0 but category 1 -> kept
            [20, 20, 30, 30],  # 3: disjoint -> kept
            [0, 0, 10, 5],  # 4: IoU 0.5 with 0 exactly -> kept (suppression needs IoU > thr)
        ],
        dtype=torch.float,
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.6])
    cats = torch.tensor([0, 0, 1, 0, 0])
    assert batched_nms(boxes, scores, cats, 0.5).tolist() == [3, 0, 2, 4]
    assert batched_nms(boxes, scores, cats, 0.7).tolist() == [3, 0, 1, 2, 4]
    assert batched_nms(boxes, scores, torch.zeros(5), 0.5).tolist() == [3, 0, 4]
    assert batched_nms(boxes[:0], scores[:0], cats[:0], 0.5).dtype == torch.int64
    assert box_area(boxes).tolist() == [100, 100, 100, 100, 50]
