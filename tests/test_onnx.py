"""ONNX export: the decoder and encoder match the torch model; the ONNX predictor has SamPredictor's API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import synthetic_image

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from segany.export.onnx import (  # noqa: E402
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    export_decoder,
    export_encoder,
    read_metadata,
)
from segany.export.onnx_predictor import OnnxSamPredictor  # noqa: E402
from segany.modeling import build_sam, get_config  # noqa: E402
from segany.predictor import SamPredictor  # noqa: E402

H, W = 96, 128
# Prompt sets in pixels of the H x W image: (points, labels, box).
PROMPTS = [
    ([[60, 40]], [1], None),
    ([[60, 40], [100, 70]], [1, 0], None),
    ([[20, 10], [60, 40], [100, 70], [30, 80]], [1, 1, 0, 0], None),
    (None, None, [20, 20, 70, 50]),
    ([[40, 30]], [1], [20, 20, 70, 50]),
]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.fixture(scope="module")
def default_arch():
    torch.manual_seed(1)
    return build_sam(get_config("segany_default")).eval()


@pytest.fixture(scope="module")
def v2_arch():
    """The EfficientNet + dense-prompt architecture (random weights): its clicks and box are drawn into the
    dense embedding inside the exported decoder."""
    torch.manual_seed(2)
    return build_sam(get_config("segany_default_v2")).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model, default_arch, v2_arch):
    """name -> (model, encoder path, decoder path) for the tiny model and the default architectures."""
    out = {}
    for name, model in (("tiny", tiny_model), ("default_arch", default_arch), ("v2_arch", v2_arch)):
        d = tmp_path_factory.mktemp(f"onnx_{name}")
        out[name] = (model, export_encoder(model, d / "encoder.onnx"), export_decoder(model, d / "decoder.onnx"))
    return out


def _predictors(model, enc, dec, image):
    torch_p = SamPredictor(model)
    torch_p.set_image(image)
    onnx_p = OnnxSamPredictor(enc, dec, threads=1)
    onnx_p.set_embedding(torch_p.get_image_embedding().numpy(), image.shape[:2])  # decoder alone
    return torch_p, onnx_p


def _compare(torch_p, onnx_p, multimask: bool, mask_input=None) -> list[float]:
    """Max |logit| differences per prompt; asserts IoU >= 0.99 and every output within 1e-3."""
    diffs = []
    for points, labels, box in PROMPTS:
        args = dict(
            point_coords=None if points is None else np.array(points, float),
            point_labels=None if labels is None else np.array(labels),
            box=None if box is None else np.array(box, float),
            mask_input=mask_input,
            multimask_output=multimask,
        )
        tm, ts, tl = torch_p.predict(**args, return_logits=True)
        om, os_, ol = onnx_p.predict(**args, return_logits=True)
        assert om.shape == tm.shape and os_.shape == ts.shape and ol.shape == tl.shape
        for a, b in zip(tm, om):
            assert iou(a > 0, b > 0) >= 0.99
        d = max(np.abs(tm - om).max(), np.abs(tl - ol).max(), np.abs(ts - os_).max())
        assert d < 1e-3, (points, labels, box, d)
        diffs.append(float(d))
    return diffs


@pytest.mark.parametrize("name", ["tiny", "default_arch", "v2_arch"])
@pytest.mark.parametrize("multimask", [True, False])
def test_decoder_matches_torch(exported, name, multimask):
    model, enc, dec = exported[name]
    torch_p, onnx_p = _predictors(model, enc, dec, synthetic_image(H, W))
    diffs = _compare(torch_p, onnx_p, multimask)
    print(f"\n{name} multimask={multimask}: max |onnx - torch| logit diff {max(diffs):.2e}")


@pytest.mark.parametrize("name", ["tiny", "default_arch", "v2_arch"])
def test_decoder_refinement_with_mask_input(exported, name):
    model, enc, dec = exported[name]
    torch_p, onnx_p = _predictors(model, enc, dec, synthetic_image(H, W))
    _m, scores, low_res = torch_p.predict(np.array([[60.0, 40.0]]), np.array([1]), multimask_output=True)
    _compare(torch_p, onnx_p, multimask=True, mask_input=low_res[int(np.argmax(scores))][None])


def test_decoder_interface(exported):
    model, _enc, dec = exported["tiny"]
    # Exporting must leave the model as it was: in eval mode (batch norms not training).
    assert not any(m.training for m in model.modules())
    sess = ort.InferenceSession(str(dec), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == DECODER_INPUTS
    assert [o.name for o in sess.get_outputs()] == DECODER_OUTPUTS
    assert sess.get_inputs()[1].shape[1] == "num_points"  # dynamic number of points
    meta = read_metadata(dec)
    assert meta["segany_image_size"] == "128" and meta["segany_return_single_mask"] == "0"


def test_decoder_output_size_follows_orig_im_size(exported):
    """The graph is not frozen to the example size used at export: odd and thin images work."""
    model, enc, dec = exported["tiny"]
    for h, w in [(1, 300), (333, 77), (1500, 2250)]:
        torch_p = SamPredictor(model)
        emb = torch.randn(1, 32, 8, 8)
        torch_p.set_embedding(emb, (h, w))
        onnx_p = OnnxSamPredictor(enc, dec)
        onnx_p.set_embedding(emb.numpy(), (h, w))
        tm, _, _ = torch_p.predict(np.array([[w / 2, h / 2]]), np.array([1]), return_logits=True)
        om, _, _ = onnx_p.predict(np.array([[w / 2, h / 2]]), np.array([1]), return_logits=True)
        assert om.shape == tm.shape == (3, h, w)
        assert np.abs(tm - om).max() < 1e-3


def test_single_mask_export_follows_the_official_rule(tmp_path, tiny_model):
    dec = export_decoder(tiny_model, tmp_path / "single.onnx", return_single_mask=True)
    enc = export_encoder(tiny_model, tmp_path / "enc.onnx")
    torch_p, onnx_p = _predictors(tiny_model, enc, dec, synthetic_image(H, W))
    assert onnx_p.single_mask_decoder
    # One click (2 tokens with the padding point): the best of the 3 multimask outputs.
    pts, labs = np.array([[60.0, 40.0]]), np.array([1])
    tm, ts, _ = torch_p.predict(pts, labs, multimask_output=True, return_logits=True)
    om, os_, _ = onnx_p.predict(pts, labs, return_logits=True)
    best = int(np.argmax(ts))
    assert om.shape == (1, H, W) and abs(float(os_[0]) - float(ts[best])) < 1e-4
    assert np.abs(om[0] - tm[best]).max() < 1e-3
    # Two clicks (3 tokens): the single-mask output.
    pts, labs = np.array([[60.0, 40.0], [100.0, 70.0]]), np.array([1, 0])
    tm, ts, _ = torch_p.predict(pts, labs, multimask_output=False, return_logits=True)
    om, os_, _ = onnx_p.predict(pts, labs, return_logits=True)
    assert np.abs(om - tm).max() < 1e-3 and abs(float(os_[0]) - float(ts[0])) < 1e-4


@pytest.mark.parametrize("name", ["tiny", "default_arch"])
def test_encoder_export_matches(exported, name):
    model, enc, dec = exported[name]
    image = synthetic_image(H, W, seed=3)
    torch_p = SamPredictor(model)
    torch_p.set_image(image)
    onnx_p = OnnxSamPredictor(enc, dec, threads=1)
    onnx_p.set_image(image)
    t, o = torch_p.get_image_embedding().numpy(), onnx_p.get_image_embedding()
    assert o.shape == t.shape
    diff = float(np.abs(t - o).max())
    print(f"\n{name} encoder: max |onnx - torch| embedding diff {diff:.2e}")
    assert diff < 1e-3 * max(1.0, float(np.abs(t).max()))
    # End to end (encoder + decoder in ONNX) against torch.
    tm, _, _ = torch_p.predict(np.array([[60.0, 40.0]]), np.array([1]))
    om, _, _ = onnx_p.predict(np.array([[60.0, 40.0]]), np.array([1]))
    assert all(iou(a, b) >= 0.99 for a, b in zip(tm, om))


@pytest.mark.parametrize("name", ["tiny", "default_arch"])
def test_quantized_decoder_runs_and_stays_close(tmp_path, exported, name):
    model, enc, dec = exported[name]
    # a half-written temporary file of an earlier, killed export of the same file goes; others stay
    stale, other = tmp_path / ".decoder.q.onnx.99999q.tmp", tmp_path / ".other.onnx.99999.tmp"
    for f in (stale, other):
        f.write_bytes(b"half an onnx file")
    qdec = export_decoder(model, tmp_path / "decoder.q.onnx", quantize=True)
    assert read_metadata(qdec)["segany_quantized"] == "dynamic_uint8"
    assert not stale.exists() and other.exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == [".other.onnx.99999.tmp", "decoder.q.onnx"]
    size_ratio = qdec.stat().st_size / dec.stat().st_size
    torch_p, onnx_p = _predictors(model, enc, qdec, synthetic_image(H, W))
    ious, diffs = [], []
    for points, labels, box in PROMPTS:
        p = None if points is None else np.array(points, float)
        lab = None if labels is None else np.array(labels)
        b = None if box is None else np.array(box, float)
        tm, ts, _ = torch_p.predict(p, lab, b, return_logits=True)
        om, os_, _ = onnx_p.predict(p, lab, b, return_logits=True)
        assert om.shape == tm.shape and np.isfinite(om).all()
        ious += [iou(x > 0, y > 0) for x, y in zip(tm, om)]
        diffs.append(float(np.abs(ts - os_).max()))
    print(f"\n{name} quantized decoder: size x{size_ratio:.2f}, mask IoU vs torch mean {np.mean(ious):.4f} "
          f"min {np.min(ious):.4f}, max |score diff| {max(diffs):.3f}")
    assert np.mean(ious) >= 0.9


def test_onnx_predictor_validates_prompts(exported):
    model, enc, dec = exported["tiny"]
    _t, onnx_p = _predictors(model, enc, dec, synthetic_image(H, W))
    from segany.errors import SegAnyError

    with pytest.raises(SegAnyError, match="labels"):
        onnx_p.predict(np.array([[1.0, 2.0]]), np.array([1, 0]))
    with pytest.raises(SegAnyError, match="point_labels must be 1"):
        onnx_p.predict(np.array([[1.0, 2.0]]), np.array([7]))
    with pytest.raises(SegAnyError, match="mask_input"):
        onnx_p.predict(np.array([[1.0, 2.0]]), np.array([1]), mask_input=np.zeros((1, 5, 5)))
    with pytest.raises(RuntimeError):
        OnnxSamPredictor(enc, dec).predict(np.array([[1.0, 2.0]]), np.array([1]))


def test_export_onnx_command(tmp_path, tiny_checkpoint, capsys):
    from segany.cli import main

    dec, enc = tmp_path / "d.onnx", tmp_path / "e.onnx"
    rc = main(["export-onnx", "--model", str(tiny_checkpoint), "-o", str(dec), "--encoder", str(enc),
               "--quantize", "--return-single-mask"])
    assert rc == 0, capsys.readouterr().err
    assert read_metadata(dec)["segany_return_single_mask"] == "1"
    p = OnnxSamPredictor(enc, dec)
    p.set_image(synthetic_image(H, W))
    masks, scores, low_res = p.predict(np.array([[60.0, 40.0]]), np.array([1]))
    assert masks.shape == (1, H, W) and masks.dtype == bool and low_res.shape == (1, 32, 32)
    assert not list(tmp_path.glob(".*tmp*")), "temporary export files were left behind"
    assert main(["export-onnx", "--model", str(tmp_path / "missing.safetensors"), "-o", str(dec)]) == 2


@pytest.mark.parametrize("single", [False, True])
def test_decoder_matches_the_official_onnx_model(tmp_path, single):
    """Same weights, same inputs: our ONNX decoder against the official ``SamOnnxModel`` (run in torch)."""
    from segany.checkpoint import load_model
    from tests.reference import build_reference_vit, import_reference, save_official_checkpoint

    import_reference()
    from segment_anything.utils.onnx import SamOnnxModel

    ref = build_reference_vit(embed_dim=48, depth=2, num_heads=3, global_attn_indexes=(1,), image_size=256,
                              window_size=8, mask_in_chans=8, decoder_mlp_dim=256, iou_head_hidden_dim=64, seed=4)
    ours = load_model(save_official_checkpoint(ref, tmp_path / "sam_small.pth"))
    sess = ort.InferenceSession(str(export_decoder(ours, tmp_path / "d.onnx", return_single_mask=single)))
    official = SamOnnxModel(ref, return_single_mask=single).eval()
    g = torch.Generator().manual_seed(0)
    for coords, labels, has_mask, size in [
        ([[30.5, 80.0], [0.0, 0.0]], [1, -1], 0.0, (300, 400)),
        ([[30.0, 80.0], [120.0, 40.0], [0.0, 0.0]], [1, 0, -1], 1.0, (640, 480)),
        ([[10.0, 20.0], [200.0, 150.0]], [2, 3], 0.0, (256, 256)),
        ([[60.0, 70.0], [10.0, 20.0], [200.0, 150.0]], [1, 2, 3], 1.0, (77, 333)),
    ]:
        feed = {
            "image_embeddings": torch.randn(1, 256, 16, 16, generator=g),
            "point_coords": torch.tensor([coords], dtype=torch.float32),
            "point_labels": torch.tensor([labels], dtype=torch.float32),
            "mask_input": torch.randn(1, 1, 64, 64, generator=g),
            "has_mask_input": torch.tensor([has_mask]),
            "orig_im_size": torch.tensor(size, dtype=torch.float32),
        }
        want = official(**feed)
        got = sess.run(None, {k: v.numpy() for k, v in feed.items()})
        for name, w, o in zip(DECODER_OUTPUTS, want, got):
            assert o.shape == tuple(w.shape), name
            assert np.abs(o - w.numpy()).max() < 1e-3, (name, labels, float(np.abs(o - w.numpy()).max()))
