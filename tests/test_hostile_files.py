"""Hostile and broken inputs (issue 10), part 2: files. Malformed RLE, SA-1B and COCO documents,
checkpoints carrying code (refused without running it), of the wrong architecture, truncated or
corrupt, and malformed config metadata: each is answered by a SegAnyError naming the problem, nothing
else. Part 1 (images, prompts, the CLI) is tests/test_hostile_inputs.py.

Each case is tallied per class in ``CASES`` of tests/reliability_tally.py (through ``expect_error``);
the hooks in tests/conftest.py print the table at the end of the session and write it as JSON to
``$SEGANY_RELIABILITY_JSON`` when set, for docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from segany.errors import SegAnyError
from tests.reliability_tally import expect_error

# ------------------------------------------------------------------------------------------------
# malformed RLE / SA-1B / COCO


def test_malformed_rle():
    from segany.io.rle import decode_rle, encode_rle

    R = "format: RLE (decode_rle)"
    good = encode_rle(np.eye(6, dtype=bool))
    cases = [
        None,
        [],
        "counts",
        42,
        {"size": [6, 6]},
        {"counts": good["counts"]},
        {"size": [6], "counts": good["counts"]},
        {"size": [6, 6, 1], "counts": good["counts"]},
        {"size": [-1, 6], "counts": good["counts"]},
        {"size": ["6", 6], "counts": good["counts"]},
        {"size": [6.0, 6], "counts": good["counts"]},
        {"size": [True, 6], "counts": good["counts"]},
        {"size": "6x6", "counts": good["counts"]},
        {"size": [6, 6], "counts": 12},
        {"size": [6, 6], "counts": None},
        {"size": [6, 6], "counts": "\x00\x01"},
        {"size": [6, 6], "counts": "héllo"},
        {"size": [6, 6], "counts": "~~~~"},
        {"size": [6, 6], "counts": [1, 2, 3]},  # does not sum to 36
        {"size": [6, 6], "counts": [40]},
        {"size": [6, 6], "counts": [-4, 40]},
        {"size": [6, 6], "counts": [1.5, 34.5]},
        {"size": [6, 6], "counts": ["36"]},
        {"size": [6, 6], "counts": [True, 35]},
        {"size": [2, 2], "counts": good["counts"]},  # runs longer than the mask
        {"size": [100, 100], "counts": good["counts"]},  # runs shorter than the mask
        {"size": [6, 6], "counts": good["counts"][:-1]},
        {"size": [6, 6], "counts": "0"},
        {"size": [6, 6], "counts": "PPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPPP"},  # runs overflowing
    ]
    for rle in cases:
        expect_error(R, decode_rle, rle, match="RLE")


def sa1b_doc(h=6, w=6):
    from segany.io.rle import encode_rle

    m = np.zeros((h, w), bool)
    m[1:3, 1:4] = True
    return {
        "image": {"image_id": 1, "width": w, "height": h, "file_name": "a.jpg"},
        "annotations": [
            {
                "id": 1,
                "segmentation": encode_rle(m),
                "bbox": [1.0, 1.0, 3.0, 2.0],
                "area": 6,
                "predicted_iou": 0.9,
                "stability_score": 0.95,
                "point_coords": [[2.0, 2.0]],
                "crop_box": [0.0, 0.0, 6.0, 6.0],
            }
        ],
    }


def mutations_sa1b():
    """(description, document or raw bytes) pairs, each a different way to be wrong."""
    import copy

    def mut(fn):
        d = copy.deepcopy(sa1b_doc())
        fn(d)
        return d

    a = lambda d: d["annotations"][0]  # noqa: E731
    return [
        b"",
        b"{",
        b"\xff\xfe\x00garbage",
        b"[]",
        b"null",
        b'{"image": {}}',
        b"NaN",
        mut(lambda d: d.pop("image")),
        mut(lambda d: d.pop("annotations")),
        mut(lambda d: d.update(annotations={})),
        mut(lambda d: d.update(image=[])),
        mut(lambda d: d["image"].pop("width")),
        mut(lambda d: d["image"].update(width=0)),
        mut(lambda d: d["image"].update(height=-5)),
        mut(lambda d: d["image"].update(height=6.5)),
        mut(lambda d: d["image"].update(image_id="1")),
        mut(lambda d: d["image"].update(file_name=7)),
        mut(lambda d: d["annotations"].append(5)),
        mut(lambda d: d["annotations"].append(copy.deepcopy(a(d)))),  # repeated id
        mut(lambda d: a(d).pop("segmentation")),
        mut(lambda d: a(d).pop("id")),
        mut(lambda d: a(d).update(id=1.5)),
        mut(lambda d: a(d).update(segmentation=[[1, 2, 3, 4, 5, 6]])),
        mut(lambda d: a(d)["segmentation"].update(size=[7, 6])),
        mut(lambda d: a(d)["segmentation"].update(counts="~~~")),
        mut(lambda d: a(d)["segmentation"].update(counts=[1, 2])),
        mut(lambda d: a(d).update(bbox=[1, 2, 3])),
        mut(lambda d: a(d).update(bbox=[1, 2, -3, 4])),
        mut(lambda d: a(d).update(bbox=[1, 2, "3", 4])),
        mut(lambda d: a(d).update(area=-1)),
        mut(lambda d: a(d).update(area="6")),
        mut(lambda d: a(d).update(predicted_iou="high")),
        mut(lambda d: a(d).update(stability_score=None)),
        mut(lambda d: a(d).update(point_coords=[[1, 2, 3]])),
        mut(lambda d: a(d).update(point_coords="1,2")),
        mut(lambda d: a(d).update(crop_box=[0, 0, 6])),
    ]


def write_doc(path: Path, doc) -> Path:
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    return path


def test_malformed_sa1b(tmp_path):
    from segany.io.sa1b import read_sa1b

    S = "format: SA-1B JSON (read_sa1b)"
    read_sa1b(write_doc(tmp_path / "good.json", sa1b_doc()))  # the base document is valid
    for i, doc in enumerate(mutations_sa1b()):
        p = write_doc(tmp_path / f"bad{i}.json", doc)
        e = expect_error(S, read_sa1b, p)
        assert str(p) in str(e)
    # NaN / Infinity written by Python's json are refused where numbers are checked
    d = sa1b_doc()
    d["annotations"][0]["predicted_iou"] = float("nan")
    expect_error(S, read_sa1b, write_doc(tmp_path / "nan.json", d))
    d = sa1b_doc()
    d["annotations"][0]["bbox"][0] = float("inf")
    expect_error(S, read_sa1b, write_doc(tmp_path / "inf.json", d))
    expect_error(S, read_sa1b, tmp_path / "missing.json", match="no such file")
    expect_error(S, read_sa1b, tmp_path, match="no such file")


def coco_doc():
    from segany.io.rle import encode_rle

    m = np.zeros((6, 6), bool)
    m[1:3, 1:4] = True
    return {
        "images": [{"id": 1, "width": 6, "height": 6, "file_name": "a.jpg"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": encode_rle(m),
                "bbox": [1, 1, 3, 2],
                "area": 6,
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 1, "name": "object"}],
    }


def test_malformed_coco(tmp_path):
    import copy

    from segany.io.coco import read_coco

    C = "format: COCO JSON (read_coco)"
    read_coco(write_doc(tmp_path / "good.json", coco_doc()))

    def mut(fn):
        d = copy.deepcopy(coco_doc())
        fn(d)
        return d

    a = lambda d: d["annotations"][0]  # noqa: E731
    cases = [
        b"",
        b"{",
        b"[]",
        b"\x00\x01",
        mut(lambda d: d.pop("images")),
        mut(lambda d: d.pop("annotations")),
        mut(lambda d: d.update(images={})),
        mut(lambda d: d.update(categories={})),
        mut(lambda d: d.update(categories=[{"id": "1", "name": "x"}])),
        mut(lambda d: d.update(categories=[{"id": 1, "name": "x"}, {"id": 1, "name": "y"}])),
        mut(lambda d: d["images"].append(copy.deepcopy(d["images"][0]))),
        mut(lambda d: d["images"][0].pop("id")),
        mut(lambda d: d["images"][0].update(width=-1)),
        mut(lambda d: d["images"].append(None)),
        mut(lambda d: d["annotations"].append("x")),
        mut(lambda d: d["annotations"].append(copy.deepcopy(a(d)))),
        mut(lambda d: a(d).pop("bbox")),
        mut(lambda d: a(d).update(image_id=99)),
        mut(lambda d: a(d).update(image_id="1")),
        mut(lambda d: a(d).update(category_id=7)),
        mut(lambda d: a(d).update(iscrowd=2)),
        mut(lambda d: a(d).update(iscrowd=0.0)),
        mut(lambda d: a(d).update(segmentation=[[1, 2, 3, 4]])),  # a 2-point "polygon"
        mut(lambda d: a(d).update(segmentation=[[1, 2, 3, 4, 5, "6"]])),
        mut(lambda d: a(d).update(segmentation=[])),
        mut(lambda d: a(d).update(segmentation="RLE")),
        mut(lambda d: a(d).update(segmentation={"size": [6, 6], "counts": [1, 2]})),
        mut(lambda d: a(d).update(segmentation={"size": [5, 6], "counts": [30]})),
        mut(lambda d: a(d).update(bbox=[0, 0, 1])),
        mut(lambda d: a(d).update(area=None)),
    ]
    for i, doc in enumerate(cases):
        p = write_doc(tmp_path / f"bad{i}.json", doc)
        e = expect_error(C, read_coco, p)
        assert str(p) in str(e)


# ------------------------------------------------------------------------------------------------
# checkpoints


class _Evil:
    """Unpickling this runs ``open(marker, "w")``: the marker file proves code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _EvilExec:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickle_checkpoints_carrying_code_are_refused_without_running(tmp_path, tiny_model):
    from segany.checkpoint import load_model

    K = "checkpoint: pickle carrying code (refused, not run)"
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    makers = []
    for cls_ in (_Evil, _EvilExec):
        for fmt in ("torch-zip", "legacy-pickle", "pickle-protocol-0"):
            for wrap in ("bare", "in-state-dict", "in-model-key"):
                makers.append((cls_, fmt, wrap))
    for i, (cls_, fmt, wrap) in enumerate(makers):
        marker = tmp_path / f"marker{i}"
        evil = cls_(str(marker))
        obj = {"bare": evil, "in-state-dict": {**sd, "x": evil}, "in-model-key": {"model": {**sd, "x": evil}}}[wrap]
        path = tmp_path / f"evil{i}.pth"
        if fmt == "torch-zip":
            torch.save(obj, path)
        elif fmt == "legacy-pickle":
            torch.save(obj, path, _use_new_zipfile_serialization=False)
        else:
            path.write_bytes(pickle.dumps(evil, protocol=0))
        assert not marker.exists()
        e = expect_error(K, load_model, path)
        assert not marker.exists(), f"loading {fmt}/{wrap} ran code"
        assert str(path) in str(e)
        assert "refused" in str(e) or "not a valid" in str(e), str(e)


def test_wrong_architecture_and_broken_checkpoints(tmp_path, tiny_model, tiny_checkpoint):
    from safetensors.torch import save_file

    from segany.checkpoint import load_model

    W = "checkpoint: wrong architecture / not SAM"
    sd = {k: v.clone().contiguous() for k, v in tiny_model.state_dict().items()}
    # a ResNet-ish state dict
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(10)}, tmp_path / "resnet.pth")
    expect_error(W, load_model, tmp_path / "resnet.pth", match="not a SAM checkpoint")
    # SAM keys, one tensor of the wrong shape
    bad = dict(sd)
    bad["mask_decoder.iou_token.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "shape.pth")
    expect_error(W, load_model, tmp_path / "shape.pth")
    # a missing tensor and an extra tensor, in .safetensors with the right config metadata
    from segany.checkpoint import CONFIG_METADATA_KEY

    meta = {CONFIG_METADATA_KEY: json.dumps(tiny_model.config.to_dict())}
    miss = {k: v for k, v in sd.items() if k != "mask_decoder.iou_token.weight"}
    save_file(miss, str(tmp_path / "miss.safetensors"), metadata=meta)
    expect_error(W, load_model, tmp_path / "miss.safetensors", match="missing keys")
    save_file({**sd, "extra.weight": torch.zeros(2)}, str(tmp_path / "extra.safetensors"), metadata=meta)
    expect_error(W, load_model, tmp_path / "extra.safetensors", match="unexpected keys")
    # weights of the tiny model declared as another architecture
    from segany.modeling import get_config

    other = get_config("tiny_test")
    od = other.to_dict()
    od["prompt_embed_dim"] = od["prompt_embed_dim"] * 2
    save_file(sd, str(tmp_path / "arch.safetensors"), metadata={CONFIG_METADATA_KEY: json.dumps(od)})
    expect_error(W, load_model, tmp_path / "arch.safetensors", match="do not fit")
    # not a state dict of tensors
    torch.save([1, 2, 3], tmp_path / "list.pth")
    expect_error(W, load_model, tmp_path / "list.pth", match="not a state dict")
    torch.save({"a": 1}, tmp_path / "ints.pth")
    expect_error(W, load_model, tmp_path / "ints.pth", match="not a state dict")

    T = "checkpoint: truncated / corrupt / empty"
    data = tiny_checkpoint.read_bytes()
    for frac in (0.0, 0.001, 0.01, 0.5, 0.99):
        p = tmp_path / f"trunc{frac}.safetensors"
        p.write_bytes(data[: int(len(data) * frac)])
        expect_error(T, load_model, p)
    torch.save(sd, tmp_path / "full.pth")
    pdata = (tmp_path / "full.pth").read_bytes()
    for frac in (0.01, 0.5, 0.99):
        p = tmp_path / f"trunc{frac}.pth"
        p.write_bytes(pdata[: int(len(pdata) * frac)])
        expect_error(T, load_model, p)
    for name, blob in (
        ("zeros.pth", b"\x00" * 4096),
        ("text.pth", b"hello world\n" * 100),
        ("header.safetensors", struct.pack("<Q", 2**40) + b"{}"),
        ("json.safetensors", struct.pack("<Q", 5) + b"{bad}"),
    ):
        (tmp_path / name).write_bytes(blob)
        expect_error(T, load_model, tmp_path / name)
    expect_error(T, load_model, tmp_path, match="not a file")
    expect_error(T, load_model, tmp_path / "nope.pth", match="unknown model")


def test_malformed_config_metadata_is_a_segany_error(tmp_path, tiny_model):
    from safetensors.torch import save_file

    from segany.checkpoint import CONFIG_METADATA_KEY, load_model

    sd = {k: v.clone().contiguous() for k, v in tiny_model.state_dict().items()}
    save_file(sd, str(tmp_path / "m.safetensors"), metadata={CONFIG_METADATA_KEY: "{not json"})
    with pytest.raises(SegAnyError):
        load_model(tmp_path / "m.safetensors")
