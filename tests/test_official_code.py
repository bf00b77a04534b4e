"""Official code runs on segany with only its import changed, and gives the official outputs.

Each snippet below is code from the official ``segment_anything`` README and example notebooks
(``predictor_example``, ``automatic_mask_generator_example``, ``onnx_model_example``), with the model
sizes, image and prompt coordinates scaled to a small image and a tiny model. Each runs twice: as written,
against ``segment_anything`` (imported with the torchvision stand-ins of tests/reference/shim.py), and with
``segment_anything`` replaced by ``segany`` and nothing else, on the same random weights saved in the
official ``.pth`` layout. The values the snippet leaves behind are then compared.

Tolerances (as tests/test_parity.py): logits 1e-4 (max abs), predicted IoUs 1e-5, binary masks equal
except where the reference logit lies within 1e-4 of the threshold; automatic masks as tests/test_amg.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.reference import build_reference_vit, import_reference, save_official_checkpoint  # noqa: E402
from tests.test_amg import (  # noqa: E402
    SMALL_VIT,
    assert_same_records,
    make_masks_visible,
    one_thread,  # noqa: F401 - the module's autouse fixture: these tensors are small, one thread is faster
    shapes_image,
)

LOGIT_TOL = 1e-4
IOU_TOL = 1e-5
PACKAGES = ["segment_anything", "segany"]

# -- the official code ------------------------------------------------------------------------------

# A tiny SAM: tests/test_amg.py's small ViT at a 128-pixel input (the official generator's run time grows
# with the input size).
TINY_VIT = {**SMALL_VIT, "image_size": 128, "window_size": 4}

# segment_anything/build_sam.py's _build_sam, with TINY_VIT's sizes instead of ViT-B's.
BUILD_SAM = """
import torch
from functools import partial
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

prompt_embed_dim = 64
image_size = 128
vit_patch_size = 16
image_embedding_size = image_size // vit_patch_size
sam = Sam(
    image_encoder=ImageEncoderViT(
        depth=2,
        embed_dim=32,
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=2,
        patch_size=vit_patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=[1],
        window_size=4,
        out_chans=prompt_embed_dim,
    ),
    prompt_encoder=PromptEncoder(
        embed_dim=prompt_embed_dim,
        image_embedding_size=(image_embedding_size, image_embedding_size),
        input_image_size=(image_size, image_size),
        mask_in_chans=8,
    ),
    mask_decoder=MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2,
            embedding_dim=prompt_embed_dim,
            mlp_dim=64,
            num_heads=4,
        ),
        transformer_dim=prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=32,
    ),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
)
sam.eval()
if checkpoint is not None:
    with open(checkpoint, "rb") as f:
        state_dict = torch.load(f)
    sam.load_state_dict(state_dict)
"""

# The README's "Getting Started" and predictor_example.ipynb, in order.
PREDICTOR = """
from segment_anything import SamPredictor
import numpy as np
import torch

predictor = SamPredictor(sam)
predictor.set_image(image)

input_point = np.array([[40, 30]])
input_label = np.array([1])
masks, scores, logits = predictor.predict(
    point_coords=input_point,
    point_labels=input_label,
    multimask_output=True,
)

input_point2 = np.array([[40, 30], [100, 70]])
input_label2 = np.array([1, 1])
mask_input = logits[np.argmax(scores), :, :]  # Choose the model's best mask
masks2, scores2, logits2 = predictor.predict(
    point_coords=input_point2,
    point_labels=input_label2,
    mask_input=mask_input[None, :, :],
    multimask_output=False,
)

input_box = np.array([10, 8, 60, 40])
masks_box, scores_box, _ = predictor.predict(
    point_coords=None,
    point_labels=None,
    box=input_box[None, :],
    multimask_output=False,
)

input_point3 = np.array([[50, 30]])
input_label3 = np.array([0])
masks_box_point, _, _ = predictor.predict(
    point_coords=input_point3,
    point_labels=input_label3,
    box=input_box,
    multimask_output=False,
)

input_boxes = torch.tensor([
    [10, 8, 60, 40],
    [70, 40, 120, 90],
    [5, 60, 50, 90],
], device=predictor.device)
transformed_boxes = predictor.transform.apply_boxes_torch(input_boxes, image.shape[:2])
masks_batch, scores_batch, _ = predictor.predict_torch(
    point_coords=None,
    point_labels=None,
    boxes=transformed_boxes,
    multimask_output=False,
)

image_embedding = predictor.get_image_embedding()
"""

# predictor_example.ipynb, "End-to-end batched inference".
BATCHED = """
from segment_anything.utils.transforms import ResizeLongestSide
import torch

resize_transform = ResizeLongestSide(sam.image_encoder.img_size)

def prepare_image(image, transform, device):
    image = transform.apply_image(image)
    image = torch.as_tensor(image, device=device.device)
    return image.permute(2, 0, 1).contiguous()

image1_boxes = torch.tensor([[10, 8, 60, 40], [70, 40, 120, 90]], device=sam.device)
image2_boxes = torch.tensor([[20, 10, 90, 60]], device=sam.device)
batched_input = [
    {
        "image": prepare_image(image1, resize_transform, sam),
        "boxes": resize_transform.apply_boxes_torch(image1_boxes, image1.shape[:2]),
        "original_size": image1.shape[:2],
    },
    {
        "image": prepare_image(image2, resize_transform, sam),
        "boxes": resize_transform.apply_boxes_torch(image2_boxes, image2.shape[:2]),
        "original_size": image2.shape[:2],
    },
]
batched_output = sam(batched_input, multimask_output=False)
"""

# automatic_mask_generator_example.ipynb, unchanged.
AUTOMATIC = """
from segment_anything import SamAutomaticMaskGenerator

mask_generator = SamAutomaticMaskGenerator(sam)
masks = mask_generator.generate(image)

mask_generator_2 = SamAutomaticMaskGenerator(
    model=sam,
    points_per_side=32,
    pred_iou_thresh=0.86,
    stability_score_thresh=0.92,
    crop_n_layers=1,
    crop_n_points_downscale_factor=2,
    min_mask_region_area=100,  # Requires open-cv to run post-processing
)
masks2 = mask_generator_2.generate(image)
"""

# onnx_model_example.ipynb (``dynamo=False``: torch >= 2.9 otherwise uses its newer exporter, which needs
# onnxscript; the notebook predates it).
ONNX = """
import warnings
import numpy as np
import onnxruntime
import torch
from segment_anything import SamPredictor
from segment_anything.utils.onnx import SamOnnxModel

onnx_model = SamOnnxModel(sam, return_single_mask=True)

dynamic_axes = {
    "point_coords": {1: "num_points"},
    "point_labels": {1: "num_points"},
}

embed_dim = sam.prompt_encoder.embed_dim
embed_size = sam.prompt_encoder.image_embedding_size
mask_input_size = [4 * x for x in embed_size]
dummy_inputs = {
    "image_embeddings": torch.randn(1, embed_dim, *embed_size, dtype=torch.float),
    "point_coords": torch.randint(low=0, high=1024, size=(1, 5, 2), dtype=torch.float),
    "point_labels": torch.randint(low=0, high=4, size=(1, 5), dtype=torch.float),
    "mask_input": torch.randn(1, 1, *mask_input_size, dtype=torch.float),
    "has_mask_input": torch.tensor([1], dtype=torch.float),
    "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
}
output_names = ["masks", "iou_predictions", "low_res_masks"]

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with open(onnx_model_path, "wb") as f:
        torch.onnx.export(
            onnx_model,
            tuple(dummy_inputs.values()),
            f,
            export_params=True,
            verbose=False,
            opset_version=17,
            do_constant_folding=True,
            input_names=list(dummy_inputs.keys()),
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            dynamo=False,
        )

ort_session = onnxruntime.InferenceSession(onnx_model_path, providers=["CPUExecutionProvider"])

predictor = SamPredictor(sam)
predictor.set_image(image)
image_embedding = predictor.get_image_embedding().cpu().numpy()

input_point = np.array([[40, 30]])
input_label = np.array([1])
onnx_coord = np.concatenate([input_point, np.array([[0.0, 0.0]])], axis=0)[None, :, :]
onnx_label = np.concatenate([input_label, np.array([-1])], axis=0)[None, :].astype(np.float32)
onnx_coord = predictor.transform.apply_coords(onnx_coord, image.shape[:2]).astype(np.float32)
onnx_mask_input = np.zeros((1, 1, *mask_input_size), dtype=np.float32)
onnx_has_mask_input = np.zeros(1, dtype=np.float32)
ort_inputs = {
    "image_embeddings": image_embedding,
    "point_coords": onnx_coord,
    "point_labels": onnx_label,
    "mask_input": onnx_mask_input,
    "has_mask_input": onnx_has_mask_input,
    "orig_im_size": np.array(image.shape[:2], dtype=np.float32),
}
onnx_masks, onnx_scores, low_res_logits = ort_session.run(None, ort_inputs)
onnx_masks = onnx_masks > predictor.model.mask_threshold

input_box = np.array([10, 8, 60, 40])
input_point2 = np.array([[50, 30]])
input_label2 = np.array([0])
onnx_box_coords = input_box.reshape(2, 2)
onnx_box_labels = np.array([2, 3])
onnx_coord2 = np.concatenate([input_point2, onnx_box_coords], axis=0)[None, :, :]
onnx_label2 = np.concatenate([input_label2, onnx_box_labels], axis=0)[None, :].astype(np.float32)
onnx_coord2 = predictor.transform.apply_coords(onnx_coord2, image.shape[:2]).astype(np.float32)
ort_inputs["point_coords"] = onnx_coord2
ort_inputs["point_labels"] = onnx_label2
onnx_masks2, onnx_scores2, _ = ort_session.run(None, ort_inputs)
onnx_masks2 = onnx_masks2 > predictor.model.mask_threshold

onnx_model_extra = SamOnnxModel(sam, return_single_mask=False, use_stability_score=True, return_extra_metrics=True)
extra = onnx_model_extra(*[torch.as_tensor(v) for v in ort_inputs.values()])
"""

# The README's registry line (ViT-B: the real architecture, so only the prompt side is run here).
REGISTRY = """
import torch
from segment_anything import sam_model_registry, build_sam_vit_b

sam = sam_model_registry["vit_b"](checkpoint=sam_checkpoint)
sam_b = build_sam_vit_b(checkpoint=sam_checkpoint)
image_size = sam.image_encoder.img_size
points = (torch.tensor([[[100.0, 200.0], [500.0, 600.0]]]), torch.tensor([[1, 0]]))
sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)
low_res, iou = sam.mask_decoder(
    image_embeddings=embedding,
    image_pe=sam.prompt_encoder.get_dense_pe(),
    sparse_prompt_embeddings=sparse,
    dense_prompt_embeddings=dense,
    multimask_output=True,
)
"""


def run_official(code: str, package: str, **inputs: Any) -> dict[str, Any]:
    """Run ``code`` against ``package``: as written for "segment_anything", with that name replaced by
    "segany" (the only change) otherwise. Returns the namespace the code leaves behind."""
    if package == "segment_anything":
        import_reference()  # into sys.modules, with the torchvision stand-ins
    else:
        code = code.replace("segment_anything", "segany")
    namespace: dict[str, Any] = dict(inputs)
    with torch.no_grad():
        exec(compile(code, f"<official code on {package}>", "exec"), namespace)
    return namespace


def assert_masks_match(ours: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, ref_logits=None) -> None:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    differ = ours != ref
    if ref_logits is not None:
        differ &= np.abs(np.asarray(ref_logits)) > LOGIT_TOL
    assert not differ.any(), f"{int(differ.sum())} mask pixels differ"


def assert_close(ours, ref, tol: float) -> None:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tol, equal_nan=True)  # NaN: 0/0 in both


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small SAM in the official layout whose random weights give visible masks (tests/test_amg.py)."""
    sa = import_reference()
    ref = make_masks_visible(build_reference_vit(**TINY_VIT), sa.SamPredictor, shapes_image())
    return save_official_checkpoint(ref, tmp_path_factory.mktemp("official") / "sam_small.pth")


@pytest.fixture(scope="module")
def built(checkpoint) -> dict[str, dict[str, Any]]:
    return {p: run_official(BUILD_SAM, p, checkpoint=str(checkpoint)) for p in PACKAGES}


def run_both(built, code: str, **inputs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    ref, ours = (run_official(code, p, sam=built[p]["sam"], **inputs) for p in PACKAGES)
    return ref, ours


# -- tests ------------------------------------------------------------------------------------------


def test_build_gives_the_official_model(built):
    ref, ours = built["segment_anything"]["sam"], built["segany"]["sam"]
    assert type(ours).__module__.startswith("segany.")
    assert not ours.training
    assert ours.image_encoder.img_size == ref.image_encoder.img_size == 128
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    assert all(torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd)


def test_readme_and_predictor_notebook(built):
    ref, ours = run_both(built, PREDICTOR, image=shapes_image())
    assert ours["masks"].shape == (3, 96, 128) and ours["logits"].shape == ref["logits"].shape
    for logits in ("logits", "logits2"):
        assert_close(ours[logits], ref[logits], LOGIT_TOL)
    for scores in ("scores", "scores2", "scores_box"):
        assert_close(ours[scores], ref[scores], IOU_TOL)
    assert_close(ours["image_embedding"], ref["image_embedding"], LOGIT_TOL)
    assert_masks_match(ours["masks"], ref["masks"])
    for name in ("masks2", "masks_box", "masks_box_point"):
        assert_masks_match(ours[name], ref[name])
    assert_masks_match(ours["masks_batch"], ref["masks_batch"])
    assert_close(ours["scores_batch"], ref["scores_batch"], IOU_TOL)
    assert ref["masks"].any() and not ref["masks"].all()  # the comparison is not of empty masks


def test_batched_inference_notebook(built):
    image1 = shapes_image()
    image2 = np.ascontiguousarray(shapes_image(80, 64)[::-1])
    ref, ours = run_both(built, BATCHED, image1=image1, image2=image2)
    assert len(ours["batched_output"]) == 2
    for r, o in zip(ref["batched_output"], ours["batched_output"]):
        assert set(o) == set(r) == {"masks", "iou_predictions", "low_res_logits"}
        assert_close(o["low_res_logits"], r["low_res_logits"], LOGIT_TOL)
        assert_close(o["iou_predictions"], r["iou_predictions"], IOU_TOL)
        assert_masks_match(o["masks"], r["masks"])


def test_automatic_mask_generator_notebook(built):
    ref, ours = run_both(built, AUTOMATIC, image=shapes_image())
    assert len(ref["masks"]) >= 3 and len(ref["masks2"]) >= 5, "too few masks for a meaningful comparison"
    assert_same_records(ref["masks"], ours["masks"], "binary_mask")
    assert_same_records(ref["masks2"], ours["masks2"], "binary_mask")


def test_onnx_notebook(built, tmp_path):
    pytest.importorskip("onnxruntime")
    image = shapes_image()
    ref, ours = (
        run_official(ONNX, p, sam=built[p]["sam"], image=image, onnx_model_path=str(tmp_path / f"{p}.onnx"))
        for p in PACKAGES
    )
    assert ours["onnx_masks"].shape == (1, 1, 96, 128)
    assert_close(ours["low_res_logits"], ref["low_res_logits"], LOGIT_TOL)
    for name in ("onnx_scores", "onnx_scores2"):
        assert_close(ours[name], ref[name], IOU_TOL)
    # The official traced graph crops the padding with the size of its dummy input (a 1500 x 2250
    # image: ``int()`` of a tensor is a constant to the tracer), so its full-size masks are wrong for
    # other aspect ratios; ours follow ``orig_im_size``. They must equal the official predictor's.
    predictor = ref["predictor"]
    point, box = np.array([[40, 30]]), np.array([10, 8, 60, 40])
    logits, scores, _ = predictor.predict(point_coords=point, point_labels=np.array([1]), return_logits=True)
    best = logits[np.argmax(scores)]
    assert_masks_match(ours["onnx_masks"][0, 0], best > 0, ref_logits=best)
    logits2, _, _ = predictor.predict(
        point_coords=np.array([[50, 30]]), point_labels=np.array([0]), box=box, multimask_output=False,
        return_logits=True,
    )
    assert_masks_match(ours["onnx_masks2"][0, 0], logits2[0] > 0, ref_logits=logits2[0])
    assert ours["onnx_masks"].any()
    r_extra, o_extra = ref["extra"], ours["extra"]
    assert len(o_extra) == len(r_extra) == 5
    assert_close(o_extra[1], r_extra[1], 1e-3)  # stability scores (pixel counts of thresholded logits)
    assert_close(o_extra[2], r_extra[2], 1e-3)
    assert np.abs(o_extra[3].numpy() - r_extra[3].numpy()).max() <= 2  # areas in pixels
    assert_close(o_extra[4], r_extra[4], LOGIT_TOL)


@pytest.mark.slow
def test_registry_vit_b(tmp_path):
    """``sam_model_registry["vit_b"](checkpoint=...)``: the real ViT-B architecture and weights (the
    1024-pixel encoder is not run: 20 s a side on this CPU; the prompt encoder and decoder are)."""
    torch.manual_seed(0)
    sa = import_reference()
    path = save_official_checkpoint(sa.build_sam_vit_b(), tmp_path / "sam_vit_b_01ec64.pth")
    embedding = torch.randn(1, 256, 64, 64)
    ref, ours = (run_official(REGISTRY, p, sam_checkpoint=str(path), embedding=embedding) for p in PACKAGES)
    for ns in (ref, ours):
        assert ns["image_size"] == 1024
        assert ns["sam_b"].state_dict().keys() == ns["sam"].state_dict().keys()
    ref_sd, our_sd = ref["sam"].state_dict(), ours["sam"].state_dict()
    assert set(ref_sd) == set(our_sd) and all(torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd)
    assert_close(ours["low_res"], ref["low_res"], LOGIT_TOL)
    assert_close(ours["iou"], ref["iou"], IOU_TOL)
