"""The speed work keeps the outputs: the inference fast paths of ``segany.modeling.fast`` (in-place encoder
blocks, chunked relative-position attention, folded batch norms, the cached re-associated decoder, the
post-processing by OpenCV) against the plain modules, and the opt-in modes of ``segany.perf`` against fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segany
from segany import perf
from segany.errors import SegAnyError
from segany.modeling import build_sam, get_config
from segany.modeling.config import SamConfig, TinyViTConfig, ViTConfig
from segany.modeling.fast.postprocess import postprocess_masks
from tests.conftest import synthetic_image


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere (zero-initialised tables would hide bias bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and "pixel_" not in name:
                new = 0.3 * torch.randn(t.shape, generator=g)
                t.copy_(new.abs() + 0.5 if name.endswith("running_var") else new)
    return model.eval()


VIT = SamConfig(  # 5 x 5 grid in windows of 3: padded windows, and a global block
    ViTConfig(embed_dim=32, depth=3, num_heads=2, window_size=3, global_attn_indexes=(1,)),
    image_size=80,
    prompt_embed_dim=32,
    mask_in_chans=8,
    decoder_num_heads=2,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)
TINY = SamConfig(
    TinyViTConfig(embed_dims=(16, 24, 32, 40), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 2), window_sizes=(3, 3, 5, 3)),
    image_size=96,
    prompt_embed_dim=32,
    mask_in_chans=8,
    decoder_num_heads=2,
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)


@pytest.mark.parametrize("cfg", [VIT, TINY], ids=["vit", "tiny_vit"])
def test_encoder_inference_path_matches_the_plain_one(cfg):
    model = _randomize(build_sam(cfg))
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.enable_grad():
        want = model.image_encoder(x)  # autograd on: the plain code
    before = x.clone()
    with torch.inference_mode():
        got = model.image_encoder(x)
        plain = _randomize(build_sam(cfg, fast=False)).image_encoder(x)  # no fast paths at all
    assert torch.equal(x, before)
    assert torch.allclose(got, want.detach(), atol=1e-4, rtol=1e-4)
    assert torch.allclose(plain, want.detach(), atol=1e-4, rtol=1e-4)


def test_the_builder_chooses_the_fast_or_the_plain_modules():
    from segany.modeling import fast
    from segany.modeling.image_encoder import ImageEncoderViT
    from segany.modeling.mask_decoder import MaskDecoder

    model, plain = build_sam(VIT), build_sam(VIT, fast=False)
    assert isinstance(model, fast.FastSam) and isinstance(model.mask_decoder, fast.FastMaskDecoder)
    assert isinstance(model.image_encoder, fast.FastImageEncoderViT)
    assert isinstance(model.prompt_encoder, fast.FastPromptEncoder)
    assert isinstance(build_sam(TINY).image_encoder, fast.FastTinyViT)
    assert type(plain.image_encoder) is ImageEncoderViT and type(plain.mask_decoder) is MaskDecoder
    assert not any(type(m).__module__.startswith("segany.modeling.fast") for m in plain.modules())
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_vit_blocks_get_token_major_tensors(monkeypatch):
    """The patch embedding's channels-first layout does not reach the blocks (their LayerNorms and
    copies would all be strided)."""
    from segany.modeling.fast import image_encoder

    seen = []
    block_inplace = image_encoder.block_inplace

    def recording(block, x):
        seen.append(x.is_contiguous())
        return block_inplace(block, x)

    monkeypatch.setattr(image_encoder, "block_inplace", recording)
    model = _randomize(build_sam(VIT))
    with torch.inference_mode():
        model.image_encoder(torch.randn(1, 3, VIT.image_size, VIT.image_size))
    assert seen == [True] * len(model.image_encoder.blocks)


def test_in_place_vit_block_is_the_plain_block():
    from segany.modeling.fast.image_encoder import block_inplace

    model = _randomize(build_sam(VIT))
    for block in model.image_encoder.blocks:  # windowed with padding, global
        x = torch.randn(1, 5, 5, 32)
        with torch.no_grad():
            want = block(x)
            got = block_inplace(block, x.clone())
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("size", [(6, 6), (4, 9)])
def test_rel_pos_attention_chunks_give_the_same_result(monkeypatch, size):
    import segany.modeling.fast.image_encoder as fie
    import segany.modeling.image_encoder as ie

    h, w = size
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, h * w, 8) for _ in range(3))
    rel_h, rel_w = torch.randn(2 * h - 1, 8), torch.randn(2 * w - 1, 8)
    bias = ie.decomposed_rel_pos_bias(q, rel_h, rel_w, size)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)
    got = {}
    with torch.no_grad():
        got["plain"] = ie.rel_pos_attention(q, k, v, rel_h, rel_w, size)
        monkeypatch.setattr(fie, "QUERY_BLOCK", 10**6)  # the fused kernel with the bias as its mask
        got["whole"] = fie.rel_pos_attention(q, k, v, rel_h, rel_w, size)
        monkeypatch.setattr(fie, "REL_BIAS_CHUNK_BYTES", 1)  # one query row at a time
        got["bias rows"] = fie.rel_pos_attention(q, k, v, rel_h, rel_w, size)
        for block in (10, 36):  # query blocks by two matmuls (a partial last block; one block)
            monkeypatch.setattr(fie, "QUERY_BLOCK", block)
            got[f"query blocks of {block}"] = fie.rel_pos_attention(q, k, v, rel_h, rel_w, size)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 keeps the fused kernel
            got["bf16"] = fie.rel_pos_attention(q, k, v, rel_h, rel_w, size).float()
    for name, out in got.items():
        tol = 1e-5 if name != "bf16" else 0.1  # bf16 keeps about 3 digits
        assert out.shape == want.shape and torch.allclose(out, want, atol=tol, rtol=tol), name


@pytest.mark.parametrize(
    ("low", "image_size", "input_size", "original_size"),
    [
        (64, 256, (192, 256), (96, 128)),
        (64, 256, (171, 256), (100, 150)),
        (64, 256, (256, 13), (200, 10)),
        (256, 1024, (683, 1024), (681, 1024)),
        (32, 128, (128, 128), (128, 128)),
        (160, 640, (426, 640), (681, 1024)),  # a photo larger than the model's input
        (64, 256, (171, 256), (400, 600)),
    ],
)
def test_fast_postprocessing_matches_the_interpolations(low, image_size, input_size, original_size):
    masks = torch.randn(2, 3, low, low) * 5
    x = F.interpolate(masks, (image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    want = F.interpolate(x, original_size, mode="bilinear", align_corners=False)
    got = postprocess_masks(masks, image_size, input_size, original_size)
    assert got.shape == want.shape
    # OpenCV places the source pixels in double precision, torch in float: logits ~10 differ by ~1e-4
    assert float((got - want).abs().max()) < 5e-4


def test_fast_postprocessing_is_for_cpu_inference_at_any_size():
    """The fast model post-processes by OpenCV's resizes at inference on a CPU, whatever the photo's size;
    with autograd on it keeps the interpolations."""
    from segany.modeling.fast import postprocess

    low = torch.zeros(1, 3, 160, 160)
    with torch.inference_mode():
        assert postprocess.use_fast_path(low)
        assert not postprocess.use_fast_path(low[0])  # not B x M x h x w
    assert not postprocess.use_fast_path(low)  # autograd on: plain path
    with torch.inference_mode(), pytest.raises(ValueError, match="whole multiple"):
        postprocess_masks(low, 600, (600, 400), (60, 40))


@pytest.mark.parametrize("masks_per_call", [3, 24])
def test_fast_postprocessing_on_the_calling_thread_and_on_workers(monkeypatch, masks_per_call):
    """A few masks are post-processed on the calling thread, many on one-core workers: same results."""
    import threading

    from segany.modeling.fast import postprocess

    threads = set()
    resize = postprocess.cv2.resize

    def recording(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return resize(*args, **kwargs)

    monkeypatch.setattr(postprocess.cv2, "resize", recording)
    masks = torch.randn(masks_per_call // 3, 3, 64, 64) * 5
    x = F.interpolate(masks, (256, 256), mode="bilinear", align_corners=False)[..., :171, :]
    want = F.interpolate(x, (100, 150), mode="bilinear", align_corners=False)
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            got = postprocess_masks(masks, 256, (171, 256), (100, 150))
            binary = postprocess_masks(masks, 256, (171, 256), (100, 150), threshold=0.0)
    finally:
        torch.set_num_threads(1)
    assert float((got - want).abs().max()) < 5e-4  # see test_fast_postprocessing_matches_the_interpolations
    assert torch.equal(binary, got > 0.0)
    on_workers = masks_per_call >= postprocess.MIN_MASKS_FOR_WORKERS
    assert on_workers == (masks_per_call == 24)
    if on_workers:
        assert threads and all(t.startswith("segany-worker") for t in threads)
    else:
        assert threads == {threading.current_thread().name}


def test_predictor_fast_decoder_and_its_cache(tiny_model):
    pred = segany.SamPredictor(tiny_model)
    image = synthetic_image(96, 128)
    pred.set_image(image)
    pt, lab = np.array([[40.0, 30.0], [90.0, 70.0]]), np.array([1, 0])
    masks, iou, low = pred.predict(pt, lab)
    again = pred.predict(pt, lab)  # from the cached per-image work
    assert np.array_equal(masks, again[0]) and np.array_equal(low, again[2])
    coords = torch.as_tensor(pred.transform.apply_coords(pt, pred.original_size), dtype=torch.float)[None]
    with torch.enable_grad():  # the model's plain decoder and post-processing
        sparse, dense = tiny_model.prompt_encoder((coords, torch.as_tensor(lab)[None]), None, None)
        want_low, want_iou = tiny_model.mask_decoder.predict_masks(
            pred.features, tiny_model.prompt_encoder.get_dense_pe(), sparse, dense
        )
        want_masks = tiny_model.postprocess_masks(want_low[:, 1:], pred.input_size, pred.original_size)
    assert np.allclose(low, want_low[0, 1:].detach().numpy(), atol=1e-4)
    assert np.allclose(iou, want_iou[0, 1:].detach().numpy(), atol=1e-5)
    sure = (want_masks[0].detach().abs() > 1e-3).numpy()
    assert np.array_equal(masks[sure], (want_masks[0].detach() > 0).numpy()[sure])
    pred.set_image(synthetic_image(96, 128, seed=1))  # another image: nothing stale is reused
    other = pred.predict(pt, lab)[2]
    fresh = segany.SamPredictor(tiny_model)
    fresh.set_image(synthetic_image(96, 128, seed=1))
    assert np.array_equal(other, fresh.predict(pt, lab)[2])


def test_decoder_cache_sees_in_place_changes(tiny_model):
    features = torch.randn(1, 32, 8, 8)
    pe = tiny_model.prompt_encoder
    pts = (torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        sparse, dense = pe(pts, None, None)
        first = tiny_model.mask_decoder(features, pe.get_dense_pe(), sparse, dense, True)[0]
        features.mul_(2)  # same tensor, new values: its version changes
        second = tiny_model.mask_decoder(features, pe.get_dense_pe(), sparse, dense, True)[0]
        want = tiny_model.mask_decoder.predict_masks(features, pe.get_dense_pe(), sparse, dense)[0][:, 1:]
    assert not torch.allclose(first, second)
    assert torch.allclose(second, want, atol=1e-4)


def test_models_with_caches_still_pickle(tiny_model):
    import pickle

    pred = segany.SamPredictor(tiny_model)
    pred.set_image(synthetic_image(64, 64))
    pred.predict(np.array([[10.0, 10.0]]), np.array([1]))
    clone = pickle.loads(pickle.dumps(tiny_model))
    assert clone.mask_decoder._reassociated_cache is None


# -- opt-in modes ---------------------------------------------------------------------------------------


def _logits(model, image, points, refined=False):
    """One click's logits at each point; unrefined by default: the point refiner (the default's) corrects the
    most uncertain pixels, and which those are follows the smallest change of the logits, so its output is
    compared as masks (``refined``), the networks' as logits."""
    pred = segany.SamPredictor(model)
    pred.set_image(image)
    if not refined:
        pred.refiner_image = None
    return [
        pred.predict(np.array([p]), np.array([1]), multimask_output=False, return_logits=True)[0][0] for p in points
    ]


def _iou(a, b):
    return float((a & b).sum() / max(1, (a | b).sum()))


# Tolerances about 3x what was measured (default_v1, TinyViT: bf16 logits within 0.14, masks differing where
# the fp32 logit is within 0.06 of the threshold, IoU 0.958 on the small rectangle; int8: 0.49, 0.17, 0.876;
# default, EfficientNet with its first layers and the stages of its high-resolution maps kept in fp32: bf16
# 0.53, 0.15, 0.894): a reduced precision moves the logits a little, so the pixels right at a mask's edge may
# flip, and on a small mask with a soft edge those weigh in the IoU. A broken mode moves logits by whole
# units (their range is ~30; default in bf16 with its first layers in bf16 too moved them by 7.9, IoU 0.58,
# and with its high-resolution stages in bf16 by 2.6, IoU 0.64).
@pytest.mark.parametrize(
    ("name", "precision", "logit_tol", "min_iou"),
    [("default", "bf16", 1.5, 0.8), ("default_v1", "bf16", 0.5, 0.9), ("default_v1", "int8", 1.5, 0.8)],
)
def test_precision_modes_keep_the_shipped_models_masks(name, precision, logit_tol, min_iou):
    if precision == "bf16" and not perf.bf16_supported("cpu"):
        pytest.skip("no native bf16 on this CPU")
    image = synthetic_image(192, 256)
    points = [(90.0, 70.0), (192.0, 144.0)]  # the rectangle and the disc
    want = _logits(segany.load_model(name), image, points)
    model = perf.optimize(segany.load_model(name), precision)
    got = _logits(model, image, points)
    assert model.speed_mode == (precision, False)
    for a, b in zip(want, got):
        assert np.abs(a - b).max() <= logit_tol
        flipped = (a > 0) != (b > 0)
        assert np.all(np.abs(a[flipped]) <= logit_tol), "a pixel far from the mask's edge changed"
        assert (a > 0).sum() > 100 and _iou(a > 0, b > 0) >= min_iou
    # refined (the default's point refiner): the masks agree as well (the rectangle's is small: 44 pixels)
    for a, b in zip(_logits(segany.load_model(name), image, points, True), _logits(model, image, points, True)):
        assert (a > 0).sum() > 20 and _iou(a > 0, b > 0) >= min_iou


def test_compile_mode_gives_the_same_embedding():
    base = _randomize(build_sam(get_config("tiny_test")))
    model = perf.optimize(_randomize(build_sam(get_config("tiny_test"))), compile="eager")
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        assert torch.allclose(model.image_encoder(x), base.image_encoder(x), atol=1e-5)


def test_int8_refuses_an_encoder_without_linear_layers():
    with pytest.raises(SegAnyError, match="EfficientNetLite has none"):
        perf.optimize(build_sam(get_config("segany_default_v2")), "int8")


def test_optimize_refuses_bad_requests(tiny_model):
    with pytest.raises(SegAnyError, match="unknown precision"):
        perf.optimize(tiny_model, "fp8")
    model = perf.optimize(build_sam(get_config("tiny_test")), "int8")
    with pytest.raises(SegAnyError, match="already"):
        perf.optimize(model, "int8")


def test_everything_command_takes_speed_flags(tmp_path, image_file, capsys):
    from segany.cli import main

    args = ["everything", str(image_file), "--points-per-side", "4", "--precision", "int8", "--format", "coco"]
    assert main([*args, "-o", str(tmp_path / "out"), "--model", "default_v1"]) == 0
    # the default model's encoder is convolutional: int8 (of linear layers) would change nothing
    assert main([*args, "-o", str(tmp_path / "out2")]) == 2
    assert "has none" in capsys.readouterr().err


def test_onnx_predictor_without_encoder(tmp_path, tiny_model):
    pytest.importorskip("onnxruntime")
    from segany.export.onnx import export_decoder
    from segany.export.onnx_predictor import OnnxSamPredictor

    image = synthetic_image(96, 128)
    pred = segany.SamPredictor(tiny_model)
    pred.set_image(image)
    onnx_pred = OnnxSamPredictor(None, export_decoder(tiny_model, tmp_path / "d.onnx"))
    onnx_pred.set_embedding(pred.features.numpy(), image.shape[:2])
    pt, lab = np.array([[40.0, 30.0]]), np.array([1])
    assert np.allclose(onnx_pred.predict(pt, lab)[2], pred.predict(pt, lab)[2], atol=1e-3)
    with pytest.raises(SegAnyError, match="no encoder"):
        onnx_pred.set_image(image)


def _huge_pages_allowed() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("user_value", [None, "0"])
def test_use_huge_pages_in_a_fresh_process(user_value):
    """In a new process (PyTorch reads the setting at its first allocation): large tensors come page-aligned
    and touching 64 MB of them takes a few hundred page faults instead of 16,384 (4 KB pages); a user's "0" is
    kept. Under memory pressure the kernel may have no free huge page to give: it then counts a fallback
    (/proc/vmstat), which still shows the memory was asked for in huge pages."""
    import os
    import subprocess
    import sys

    if user_value is None and not _huge_pages_allowed():
        pytest.skip("this kernel gives no transparent huge pages")
    code = (
        "import resource, torch\n"
        "from segany.perf import use_huge_pages\n"
        "def thp():\n"
        "    try:\n"
        "        v = dict(line.split() for line in open('/proc/vmstat'))\n"
        "        return int(v.get('thp_fault_alloc', 0)), int(v.get('thp_fault_fallback', 0))\n"
        "    except OSError:\n"
        "        return 0, 0\n"
        "on = use_huge_pages()\n"
        "t = thp()\n"
        "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "torch.empty(16 << 20).fill_(1.0)\n"
        "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f\n"
        "print(on, faults, thp()[1] - t[1])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_value
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    on, faults, fallbacks = out.stdout.split()
    if user_value is None:
        assert on == "True"
        # the kernel's fallbacks are global counts: another process's can only excuse, never fail, the check
        assert int(faults) < 4096 or int(fallbacks) > 0, f"{faults} page faults and no huge page refused"
    else:  # (a kernel that gives huge pages to every process would fault little either way)
        assert on == "False"


def test_reuse_freed_memory_in_a_fresh_process():
    """glibc keeps freed blocks of up to 64 MB for reuse: a 40 MB tensor made and freed again and again is
    faulted in during the first turns only, not at every turn (without the setting each turn maps it anew:
    20 faults a turn in huge pages, 10,240 in 4 KB pages). Both processes ask for huge pages, as the segany
    command does."""
    import os
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    code = (
        "import resource, sys, torch\n"
        "from segany.perf import reuse_freed_memory, use_huge_pages\n"
        "use_huge_pages()\n"
        "on = reuse_freed_memory() if sys.argv[1] == 'on' else False\n"
        "for _ in range(8):\n"
        "    torch.empty(10 << 20).fill_(1.0)\n"
        "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5):\n"
        "    torch.empty(10 << 20).fill_(1.0)\n"
        "print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    faults = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", code, mode], env=env, capture_output=True, text=True, check=True)
        on, n = out.stdout.split()
        assert on == str(mode == "on")
        faults[mode] = int(n)
    assert faults["on"] < 50 and faults["off"] >= 5 * 20
