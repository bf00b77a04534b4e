"""The open-vocabulary detector path (text -> boxes -> SAM masks) on tiny random detectors.

The detectors (OWLv2, OWL-ViT, Grounding DINO) are built from tiny configs with tokenizers made from a
few-entry vocabulary, saved with ``save_pretrained`` and loaded back through
``OpenVocabularyDetector.from_pretrained``: no download. Random weights give arbitrary boxes, so the
end-to-end tests check structure and wiring, and the mapping tests replace the raw model outputs with
known boxes to check, exactly, how they come back in a non-square image's pixels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from segany import SamPredictor, SegAnyError  # noqa: E402
from segany.text.grounding import Detections, OpenVocabularyDetector, masks_from_detections  # noqa: E402
from tests.conftest import synthetic_image  # noqa: E402

H, W = 60, 100  # non-square on purpose: OWLv2 pads to a square, the others do not
TEXT = "a cat"


# -- tiny detectors, saved like real ones -------------------------------------------------------------


def _clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single byte-level characters (no merges): every text encodes."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=16)


def _save_owl(folder: Path, tmp: Path, v2: bool) -> Path:
    import transformers as tf

    tok = _clip_tokenizer(tmp / "clip_vocab")
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=64, patch_size=16)
    torch.manual_seed(0)
    if v2:
        model = tf.Owlv2ForObjectDetection(tf.Owlv2Config(text_config=text, vision_config=vision, projection_dim=32))
        processor = tf.Owlv2Processor(tf.Owlv2ImageProcessor(size={"height": 64, "width": 64}), tok)
    else:
        model = tf.OwlViTForObjectDetection(tf.OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32))
        side = {"height": 64, "width": 64}
        processor = tf.OwlViTProcessor(tf.OwlViTImageProcessor(size=side, crop_size=side), tok)
    # Random box heads saturate the sigmoid into zero-size boxes; a zero last layer leaves the boxes
    # at the model's per-patch prior, so the end-to-end test sees real, non-empty boxes.
    torch.nn.init.zeros_(model.box_head.dense2.weight)
    torch.nn.init.zeros_(model.box_head.dense2.bias)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _save_grounding_dino(folder: Path, tmp: Path) -> Path:
    import transformers as tf

    vocab = tmp / "bert_vocab"
    vocab.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "cat", "dog", "the", "people"]
    (vocab / "vocab.txt").write_text("\n".join(words + list("bcdefghijklmnopqrstuvwxyz")) + "\n")
    tok = tf.BertTokenizer.from_pretrained(vocab)
    backbone = tf.SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                             window_size=2, out_features=["stage2", "stage3", "stage4"])
    text = tf.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
    # decoder_layers=2: with one layer there is no box head to tie to the first one.
    config = tf.GroundingDinoConfig(
        backbone_config=backbone, text_config=text, use_timm_backbone=False, use_pretrained_backbone=False,
        d_model=32, num_queries=10, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2, max_text_len=32,
    )
    torch.manual_seed(0)
    model = tf.GroundingDinoForObjectDetection(config)
    image_processor = tf.GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    processor = tf.GroundingDinoProcessor(image_processor, tok)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("detectors")
    return {
        "owlv2": _save_owl(tmp / "owlv2", tmp / "v2", v2=True),
        "owlvit": _save_owl(tmp / "owlvit", tmp / "v1", v2=False),
        "grounding_dino": _save_grounding_dino(tmp / "gdino", tmp),
    }


@pytest.fixture(scope="module")
def detectors(folders) -> dict[str, OpenVocabularyDetector]:
    return {kind: OpenVocabularyDetector.from_pretrained(path) for kind, path in folders.items()}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return synthetic_image(H, W)


@pytest.fixture()
def predictor(tiny_model, image) -> SamPredictor:
    p = SamPredictor(tiny_model)
    p.set_image(image)
    return p


def _fake_outputs(monkeypatch, detector: OpenVocabularyDetector, boxes_cxcywh, logits) -> None:
    """Make the model return these normalised boxes (``Q x 4``) with these logits (``Q``) for query 0...Q-1.

    The other queries get a very low logit. For Grounding DINO the logit goes on the token "cat" of "a
    cat." (position 2 after [CLS] and "a"), so the grounded label is "cat".
    """
    forward = detector.model.forward

    def fake(*args, **kwargs):
        out = forward(*args, **kwargs)
        new_logits = torch.full_like(out.logits, -10.0)
        new_boxes = out.pred_boxes.clone()
        n = len(logits)
        new_boxes[0, :n] = torch.tensor(boxes_cxcywh, dtype=new_boxes.dtype)
        if detector.kind == "grounding_dino":
            new_logits[0, :n, 2] = torch.tensor(logits, dtype=new_logits.dtype)
        else:
            new_logits[0, :n, 0] = torch.tensor(logits, dtype=new_logits.dtype)
        out.logits, out.pred_boxes = new_logits, new_boxes
        return out

    monkeypatch.setattr(detector.model, "forward", fake)


# Known raw outputs: (cx, cy, w, h) normalised, and logits.
KNOWN_BOXES = [
    (0.50, 0.25, 0.4, 0.2),  # the best
    (0.52, 0.25, 0.4, 0.2),  # IoU 0.9 with the best: removed by NMS
    (0.25, 0.50, 0.2, 0.2),
    (0.90, 0.55, 0.3, 0.2),  # reaches past the right edge: clipped
    (1.20, 0.85, 0.2, 0.1),  # outside the image (in OWLv2's padding, or beyond the frame): dropped
]
KNOWN_LOGITS = [3.0, 2.0, 1.0, 0.0, 2.5]
SIGMOID = 1 / (1 + np.exp(-np.array([3.0, 1.0, 0.0])))


# -- end to end on random weights ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["owlv2", "owlvit", "grounding_dino"])
def test_detect_then_segment_end_to_end(kind, detectors, image, predictor):
    det = detectors[kind]
    assert det.kind == kind
    found = det.detect(image, TEXT, box_threshold=0.0, max_detections=5)
    n = len(found)
    assert 1 <= n <= 5
    assert found.boxes.shape == (n, 4) and found.boxes.dtype == np.float32
    assert found.scores.shape == (n,) and found.scores.dtype == np.float32
    assert len(found.labels) == n and all(isinstance(s, str) and s for s in found.labels)
    assert found.image_size == (H, W)
    b = found.boxes
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= W).all() and (b[:, 3] <= H).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert (np.diff(found.scores) <= 0).all()
    if kind != "grounding_dino":
        assert found.labels == [TEXT] * n

    masks, scores = masks_from_detections(predictor, found)
    assert masks.shape == (n, H, W) and masks.dtype == bool
    assert scores.shape == (n,) and (np.diff(scores) <= 0).all()
    masks3, _ = masks_from_detections(predictor, found, multimask_output=True)
    assert masks3.shape == (n, H, W)


def test_nothing_above_threshold_gives_empty_results(detectors, image, predictor, monkeypatch):
    det = detectors["owlv2"]
    _fake_outputs(monkeypatch, det, KNOWN_BOXES[:1], [-5.0])  # score 0.007, the rest lower
    found = det.detect(image, TEXT, box_threshold=0.5)
    assert len(found) == 0 and found.boxes.shape == (0, 4) and found.labels == []
    masks, scores = masks_from_detections(predictor, found)
    assert masks.shape == (0, H, W) and scores.shape == (0,)


# -- exact coordinate mapping -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # OWLv2: relative to the padded max(H, W) = 100 square, both axes scaled by 100.
        ("owlv2", [[30, 15, 70, 35], [15, 40, 35, 60], [75, 45, 100, 60]]),
        # OWL-ViT and Grounding DINO: relative to the image, x by W = 100 and y by H = 60.
        ("owlvit", [[30, 9, 70, 21], [15, 24, 35, 36], [75, 27, 100, 39]]),
        ("grounding_dino", [[30, 9, 70, 21], [15, 24, 35, 36], [75, 27, 100, 39]]),
    ],
)
def test_known_boxes_map_to_the_original_frame(kind, expected, detectors, image, monkeypatch):
    det = detectors[kind]
    _fake_outputs(monkeypatch, det, KNOWN_BOXES, KNOWN_LOGITS)
    found = det.detect(image, TEXT, box_threshold=0.1)
    np.testing.assert_allclose(found.boxes, np.array(expected, np.float32), atol=1e-3)
    np.testing.assert_allclose(found.scores, SIGMOID, rtol=1e-5)
    assert found.labels == (["cat"] * 3 if kind == "grounding_dino" else [TEXT] * 3)

    top = det.detect(image, TEXT, box_threshold=0.1, max_detections=2)
    np.testing.assert_allclose(top.boxes, found.boxes[:2])
    # A looser NMS keeps the near-duplicate box (second best, 0.88).
    loose = det.detect(image, TEXT, box_threshold=0.1, nms_iou_threshold=0.95)
    assert len(loose) == 4 and loose.scores[1] == pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-5)


def test_masks_are_sams_answer_to_each_box(detectors, image, predictor, monkeypatch):
    det = detectors["owlv2"]
    _fake_outputs(monkeypatch, det, KNOWN_BOXES, KNOWN_LOGITS)
    found = det.detect(image, TEXT)
    for multi in (False, True):
        masks, scores, order = masks_from_detections(predictor, found, multimask_output=multi, return_order=True)
        assert sorted(order.tolist()) == list(range(len(found)))
        for i, j in enumerate(order):
            ref_masks, ref_iou, _ = predictor.predict(box=found.boxes[j], multimask_output=multi)
            best = int(np.argmax(ref_iou))
            np.testing.assert_array_equal(masks[i], ref_masks[best])
            assert scores[i] == pytest.approx(found.scores[j] * ref_iou[best], rel=1e-4, abs=1e-6)


# -- errors -------------------------------------------------------------------------------------------


def test_loading_errors(tmp_path, folders, monkeypatch):
    with pytest.raises(SegAnyError, match="not found"):
        OpenVocabularyDetector.from_pretrained(tmp_path / "missing")
    with pytest.raises(SegAnyError, match="no config.json"):
        OpenVocabularyDetector.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SegAnyError, match="'bert' is not a supported"):
        OpenVocabularyDetector.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SegAnyError, match="not a readable JSON"):
        OpenVocabularyDetector.from_pretrained(tmp_path)
    # A right config without weights or processor files: a SegAnyError naming the folder, no download.
    (tmp_path / "config.json").write_text((folders["owlv2"] / "config.json").read_text())
    with pytest.raises(SegAnyError, match="could not load the owlv2 detector"):
        OpenVocabularyDetector.from_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(SegAnyError, match=r'pip install "segany\[text\]"'):
        OpenVocabularyDetector.from_pretrained(folders["owlv2"])


def test_unsupported_model_is_refused():
    with pytest.raises(SegAnyError, match="unsupported detector"):
        OpenVocabularyDetector(torch.nn.Linear(2, 2), processor=None)


@pytest.mark.parametrize(
    ("image_arg", "text", "kwargs", "match"),
    [
        (None, "", {}, "non-empty"),
        (None, "   ", {}, "non-empty"),
        (None, None, {}, "non-empty"),
        (np.zeros((H, W), np.uint8), TEXT, {}, "H x W x 3"),
        (np.zeros((H, W, 4), np.uint8), TEXT, {}, "H x W x 3"),
        (np.zeros((H, W, 3), np.float32), TEXT, {}, "uint8"),
        (np.zeros((0, W, 3), np.uint8), TEXT, {}, "no pixels"),
        (None, TEXT, {"box_threshold": 1.5}, "box_threshold"),
        (None, TEXT, {"max_detections": 0}, "max_detections"),
        (None, TEXT, {"nms_iou_threshold": -0.1}, "nms_iou_threshold"),
    ],
)
def test_detect_validates_inputs(detectors, image, image_arg, text, kwargs, match):
    with pytest.raises(SegAnyError, match=match):
        detectors["owlv2"].detect(image if image_arg is None else image_arg, text, **kwargs)


def test_masks_from_detections_checks_the_predictor(tiny_model, predictor):
    dets = Detections(np.array([[10, 10, 40, 30]], np.float32), np.array([0.9], np.float32), ["x"], (H, W))
    with pytest.raises(SegAnyError, match="set the image"):
        masks_from_detections(SamPredictor(tiny_model), dets)
    other = Detections(dets.boxes, dets.scores, dets.labels, (H + 1, W))
    with pytest.raises(SegAnyError, match="61x100 image"):
        masks_from_detections(predictor, other)


def test_predictor_text_goes_through_the_detector(tiny_model, detectors, image, monkeypatch):
    """`SamPredictor(text_detector=...)`: predict(text) = SAM's answer to the best box; predict_instances
    = one mask per detected box, best first."""
    det = detectors["owlv2"]
    p = SamPredictor(tiny_model, text_detector=det)
    p.set_image(image)
    h, w = image.shape[:2]
    boxes = np.array([[5, 6, 40, 30], [20, 10, 55, 45]], np.float32)
    fixed = Detections(boxes, np.array([0.9, 0.6], np.float32), ["cat", "cat"], (h, w))
    monkeypatch.setattr(det, "detect", lambda img, text, **kw: Detections(
        fixed.boxes[: kw.get("max_detections", 20)], fixed.scores[: kw.get("max_detections", 20)],
        fixed.labels[: kw.get("max_detections", 20)], (h, w)))
    masks, iou, _ = p.predict(text="a cat")
    ref = SamPredictor(tiny_model)
    ref.set_image(image)
    ref_masks, ref_iou, _ = ref.predict(box=boxes[0], multimask_output=False)
    assert np.array_equal(masks, ref_masks) and np.allclose(iou, ref_iou)
    inst, scores = p.predict_instances("a cat", max_instances=2)
    assert inst.shape == (2, h, w) and np.all(np.diff(scores) <= 0)
    with pytest.raises(SegAnyError, match="not both"):
        p.predict(text="a cat", box=boxes[1])
    monkeypatch.setattr(det, "detect", lambda img, text, **kw: Detections(
        np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [], (h, w)))
    masks, iou, _ = p.predict(text="a cat")
    assert masks.shape == (1, h, w) and not masks.any() and iou[0] == 0
