"""Official names and helpers: every public name of ``segment_anything`` exists in segany (and the README
lists it), the registry's errors are clear, and ``segany.utils.amg`` gives the official functions' values.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.reference import import_reference  # noqa: E402

# -- names ------------------------------------------------------------------------------------------

#: Every public name of the official package, by module; README.md lists them as covered.
OFFICIAL_NAMES = {
    "": ["build_sam", "build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_b", "sam_model_registry",
         "SamPredictor", "SamAutomaticMaskGenerator"],
    ".build_sam": ["build_sam", "build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_b", "sam_model_registry"],
    ".predictor": ["SamPredictor"],
    ".automatic_mask_generator": ["SamAutomaticMaskGenerator"],
    ".modeling": ["Sam", "ImageEncoderViT", "MaskDecoder", "PromptEncoder", "TwoWayTransformer"],
    ".modeling.sam": ["Sam"],
    ".modeling.image_encoder": ["ImageEncoderViT"],
    ".modeling.mask_decoder": ["MaskDecoder"],
    ".modeling.prompt_encoder": ["PromptEncoder"],
    ".modeling.transformer": ["TwoWayTransformer"],
    ".modeling.common": ["LayerNorm2d", "MLPBlock"],
    ".utils.transforms": ["ResizeLongestSide"],
    ".utils.onnx": ["SamOnnxModel"],
    ".utils.amg": ["MaskData", "is_box_near_crop_edge", "box_xyxy_to_xywh", "batch_iterator",
                   "mask_to_rle_pytorch", "rle_to_mask", "area_from_rle", "calculate_stability_score",
                   "build_point_grid", "build_all_layer_point_grids", "generate_crop_boxes",
                   "uncrop_boxes_xyxy", "uncrop_points", "uncrop_masks", "remove_small_regions",
                   "coco_encode_rle", "batched_mask_to_box"],
}


@pytest.mark.parametrize("module", list(OFFICIAL_NAMES))
def test_official_names_exist(module):
    import importlib

    import_reference()
    ref = importlib.import_module("segment_anything" + module)
    ours = importlib.import_module("segany" + module)
    for name in OFFICIAL_NAMES[module]:
        assert hasattr(ref, name), f"the list is wrong: segment_anything{module}.{name}"
        assert hasattr(ours, name), f"segany{module}.{name} is missing"


def test_readme_lists_the_official_names():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for module, names in OFFICIAL_NAMES.items():
        for name in names:
            assert f"`{name}`" in readme, f"README.md does not list {name} (segany{module})"


def test_segany_build_sam_still_takes_a_config(tiny_model):
    from segany import build_sam, get_config

    model = build_sam(get_config("tiny_test"))
    assert model.config == get_config("tiny_test") and model.image_encoder.img_size == 128
    with pytest.raises(TypeError):
        build_sam(get_config("tiny_test"), checkpoint="x.pth")


def test_registry_checkpoint_errors_are_clear(tmp_path, tiny_checkpoint):
    from segany import SegAnyError, sam_model_registry

    with pytest.raises(SegAnyError, match="not a file"):
        sam_model_registry["vit_b"](checkpoint=str(tmp_path / "missing.pth"))
    with pytest.raises(SegAnyError, match="do not fit the model"):
        sam_model_registry["vit_b"](checkpoint=str(tiny_checkpoint))


def test_every_model_has_image_encoder_img_size():
    from segany.modeling import build_sam, get_config, list_configs

    for name in list_configs():
        cfg = get_config(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with torch.device("meta"):  # no memory, no initialisation: fast for the big ones
                    model = build_sam(cfg)
            except (RuntimeError, NotImplementedError):  # a builder that reads values (drop-path rates)
                if any(size in name for size in ("vit_b", "vit_l", "vit_h")):
                    continue  # slow to build (SAM, SAM-HQ); their encoder is tiny_test's ViT, which is covered
                model = build_sam(cfg)
        assert model.image_encoder.img_size == cfg.image_size == model.image_size, name


# -- utils.amg: the official functions, value for value ---------------------------------------------


def _amg_cases() -> list[tuple[str, tuple, dict]]:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 20, 30, generator=g) > 0.6
    masks[2] = False
    logits = torch.randn(3, 20, 30, generator=g) * 3
    boxes = torch.tensor([[0, 0, 10, 10], [5, 3, 29, 19], [12, 2, 20, 8]])
    island = np.zeros((20, 30), bool)
    island[2:12, 3:15] = True
    island[15:17, 20:22] = True
    island[5:7, 5:7] = False
    return [
        ("batched_mask_to_box", (masks,), {}),
        ("box_xyxy_to_xywh", (boxes[1],), {}),  # the official one takes one box
        ("calculate_stability_score", (logits, 0.0, 1.0), {}),
        ("build_point_grid", (5,), {}),
        ("build_all_layer_point_grids", (16, 2, 2), {}),
        ("generate_crop_boxes", ((600, 900), 2, 512 / 1500), {}),
        ("is_box_near_crop_edge", (boxes.float(), [0, 0, 20, 20], [0, 0, 30, 20]), {}),
        ("uncrop_boxes_xyxy", (boxes, [3, 4, 20, 20]), {}),
        ("uncrop_points", (boxes[:, :2], [3, 4, 20, 20]), {}),
        ("uncrop_masks", (masks, [3, 4, 33, 24], 30, 40), {}),
        ("remove_small_regions", (island, 10, "holes"), {}),
        ("remove_small_regions", (island, 10, "islands"), {}),
        ("mask_to_rle_pytorch", (masks,), {}),
        ("batch_iterator", (2, [1, 2, 3, 4, 5], "abcde"), {}),
    ]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a.double(), b.double())
    if isinstance(a, np.ndarray):
        return a.shape == np.asarray(b).shape and np.allclose(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name,args,kwargs", _amg_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_amg_function_gives_the_official_result(name, args, kwargs):
    ref = getattr(import_reference().utils.amg, name)(*args, **kwargs)
    import segany.utils.amg as amg

    ours = getattr(amg, name)(*args, **kwargs)
    if name == "batch_iterator":
        ref, ours = list(ref), list(ours)
    assert _same(ours, ref), (ours, ref)


def test_amg_rle_functions_and_mask_data():
    import segany.utils.amg as amg

    ref_amg = import_reference().utils.amg
    masks = torch.rand(2, 7, 9, generator=torch.Generator().manual_seed(1)) > 0.5
    for rle in ref_amg.mask_to_rle_pytorch(masks):
        assert np.array_equal(amg.rle_to_mask(rle), ref_amg.rle_to_mask(rle))
        assert amg.area_from_rle(rle) == ref_amg.area_from_rle(rle)
        assert amg.coco_encode_rle(rle) == ref_amg.coco_encode_rle(rle)
    columns = {"a": torch.arange(5), "b": np.arange(5) * 2, "c": list("abcde")}
    ref, ours = ref_amg.MaskData(**columns), amg.MaskData(**columns)
    for data in (ref, ours):
        data.filter(torch.tensor([True, False, True, True, False]))
        data.cat(type(data)(a=torch.tensor([9]), b=np.array([9]), c=["z"]))
        data.filter(torch.tensor([0, 3]))
        data["e"] = np.zeros(2)
        del data["e"]
        data.to_numpy()
    assert {k: list(v) for k, v in ours.items()} == {k: list(v) for k, v in ref.items()}
    with pytest.raises(TypeError):
        amg.MaskData(x=3)
