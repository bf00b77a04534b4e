"""The `segany segment / models / convert` commands, good paths and every bad-input path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segany.cli import main
from segany.io.rle import decode_rle


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_segment_writes_mask_overlay_and_json(capsys, tmp_path, image_file, tiny_checkpoint):
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys, "segment", image_file, "--point", "40,30", "--negative", "100,70", "--model", tiny_checkpoint, "-o", out
    )
    assert code == 0, err
    mask = np.array(Image.open(out / "mask.png"))
    assert mask.shape == (96, 128) and set(np.unique(mask)) <= {0, 255}
    overlay = np.array(Image.open(out / "overlay.png"))
    assert overlay.shape == (96, 128, 3)
    result = json.loads((out / "result.json").read_text())
    rec = result["masks"][0]
    np.testing.assert_array_equal(decode_rle(rec["segmentation"]), mask > 0)
    assert rec["area"] == int((mask > 0).sum())
    assert result["prompts"]["negative_points"] == [[100.0, 70.0]]
    assert "1 mask(s)" in stdout


def test_segment_multimask_and_box(capsys, tmp_path, image_file, tiny_checkpoint):
    out = tmp_path / "o"
    code, _, err = run_cli(
        capsys, "segment", image_file, "--box", "10,10,60,50", "--multimask", "--model", tiny_checkpoint, "-o", out
    )
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert len(result["masks"]) == 3
    scores = [m["predicted_iou"] for m in result["masks"]]
    assert scores == sorted(scores, reverse=True)
    assert all((out / f"mask_{i}.png").is_file() for i in range(3))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--point", "500,10"], "outside the image"),
        (["--point=-1,10"], "outside the image"),
        (["--point", "10"], "expected X,Y"),
        (["--point", "a,b"], "expected X,Y"),
        (["--point", "nan,3"], "finite"),
        (["--box", "50,50,10,60"], "empty"),
        (["--box", "10,10,10,60"], "empty"),
        (["--box", "1,2,3"], "four numbers"),
        (["--box", "500,500,600,600"], "outside the image"),
        ([], "at least one prompt"),
    ],
)
def test_segment_bad_prompts(capsys, tmp_path, image_file, tiny_checkpoint, args, message):
    code, _, err = run_cli(capsys, "segment", image_file, *args, "--model", tiny_checkpoint, "-o", tmp_path / "o")
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_segment_bad_images_and_models(capsys, tmp_path, image_file, tiny_checkpoint):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(image_file.read_bytes()[:200])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    not_a_model = tmp_path / "model.pth"
    not_a_model.write_bytes(b"\x80\x02}q\x00.")  # a pickled empty dict
    wrong = tmp_path / "wrong.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(wrong))
    cases = [
        (tmp_path / "missing.jpg", tiny_checkpoint, "no such file"),
        (corrupt, tiny_checkpoint, "truncated or corrupt"),
        (empty, tiny_checkpoint, "empty"),
        (text, tiny_checkpoint, "not an image"),
        (image_file, "no_such_model", "unknown model"),
        (image_file, not_a_model, "cannot read the checkpoint"),
        (image_file, wrong, "not a SAM checkpoint"),
    ]
    for img, model, message in cases:
        code, _, err = run_cli(capsys, "segment", img, "--point", "5,5", "--model", model, "-o", tmp_path / "o")
        assert code == 2, (img, model, err)
        assert message in err, (message, err)
        assert err.count("\n") == 1 and "Traceback" not in err


def test_models_and_convert(capsys, tmp_path, tiny_checkpoint, tiny_model):
    import torch

    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "vit_b" in out and "sam_vit_b_01ec64.pth" in out
    pth = tmp_path / "official.pth"
    torch.save(tiny_model.state_dict(), pth)
    dst = tmp_path / "converted.safetensors"
    code, out, err = run_cli(capsys, "convert", pth, dst, "--half")
    assert code == 0, err
    from segany import load_model

    back = load_model(dst)
    for k, v in tiny_model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v.half().float())
    code, _, err = run_cli(capsys, "convert", pth, tmp_path / "x.bin")
    assert code == 2 and ".safetensors" in err


def test_convert_averages_several_checkpoints(capsys, tmp_path, tiny_model):
    """Several sources: the written weights are their element-wise mean; another architecture is refused."""
    import dataclasses

    import torch

    from segany import load_model
    from segany.checkpoint import save_model
    from segany.modeling import build_sam

    paths, states = [], []
    for i in range(3):
        torch.manual_seed(10 + i)
        m = build_sam(tiny_model.config).eval()
        paths.append(tmp_path / f"m{i}.safetensors")
        save_model(m, paths[-1])
        states.append(m.state_dict())
    dst = tmp_path / "soup.safetensors"
    code, out, err = run_cli(capsys, "convert", *paths, dst)
    assert code == 0, err
    assert "mean of" in out
    soup = load_model(dst).state_dict()
    for k, v in states[0].items():
        if v.is_floating_point():
            torch.testing.assert_close(soup[k], (states[0][k] + states[1][k] + states[2][k]) / 3)
    assert not torch.equal(soup["mask_decoder.iou_token.weight"], states[0]["mask_decoder.iou_token.weight"])
    # weights the sources share come out bit for bit, negative zeros included (a text head's base
    # fingerprint reads the bytes)
    with torch.no_grad():
        m.image_encoder.patch_embed.proj.weight[0, 0, 0, :2] = torch.tensor([-0.0, 0.0])
    save_model(m, paths[0])
    save_model(m, paths[1])
    assert run_cli(capsys, "convert", paths[0], paths[1], dst)[0] == 0
    for k, v in load_model(dst).state_dict().items():
        assert v.numpy().tobytes() == m.state_dict()[k].numpy().tobytes(), k

    other_cfg = dataclasses.replace(tiny_model.config, image_size=tiny_model.config.image_size * 2)
    other = tmp_path / "other.safetensors"
    save_model(build_sam(other_cfg), other)
    code, _, err = run_cli(capsys, "convert", paths[0], other, tmp_path / "bad.safetensors")
    assert code == 2 and "architecture differs" in err and "Traceback" not in err
    assert not (tmp_path / "bad.safetensors").exists()


def test_console_script_runs_without_traceback(tmp_path):
    """The installed entry point: a bad call exits 2 with one line on stderr."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "segany.cli",
            "segment",
            str(tmp_path / "nope.jpg"),
            "--point",
            "1,1",
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("segany segment: error:") and "Traceback" not in proc.stderr


def test_unwritable_output_is_a_clear_error(capsys, tmp_path, image_file, tiny_checkpoint):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "masks"  # its parent is a file: the folder cannot be made
    code, _, err = run_cli(capsys, "segment", image_file, "--point", "5,5", "--model", tiny_checkpoint, "-o", out)
    assert code == 1, err
    assert err.startswith("segany segment: error: ") and "internal error" not in err
    assert str(blocker) in err and err.count("\n") == 1


def test_convert_changes_the_input_size_of_an_efficientnet_model(capsys, tmp_path, tiny_checkpoint):
    """--image-size: the same weights at another input size (the grids follow it); ViT-type encoders refuse."""
    import dataclasses

    import numpy as np
    import torch

    from segany import SamPredictor, load_model
    from segany.checkpoint import save_model
    from segany.checkpoint_text import new_text_head, save_text_head, text_head_path
    from segany.modeling import build_sam, get_config
    from segany.modeling.config import EfficientNetConfig

    torch.manual_seed(0)
    cfg = dataclasses.replace(get_config("tiny_test"), encoder=EfficientNetConfig(neck_dim=16))
    src = tmp_path / "effnet.safetensors"
    base = build_sam(cfg).eval()
    save_model(base, src)
    # a text head beside the source (as the shipped default has) is not in the way
    save_text_head(new_text_head(base), base, text_head_path(src))
    dst = tmp_path / "effnet_192.safetensors"
    code, _, err = run_cli(capsys, "convert", src, dst, "--image-size", "192")
    assert code == 0, err
    small, large = load_model(src, text_head=None), load_model(dst)
    assert (small.image_size, large.image_size) == (128, 192)
    assert tuple(large.prompt_encoder.image_embedding_size) == (12, 12)
    for k, v in small.state_dict().items():
        torch.testing.assert_close(large.state_dict()[k], v)
    # in Python, an attached text head comes along (the encoders it is tied to are the same weights)
    from segany.checkpoint_convert import with_image_size
    from segany.checkpoint_text import base_fingerprint

    with_head = load_model(src)
    moved = with_image_size(with_head, 192)
    assert moved.text_head is with_head.text_head and moved.image_size == 192
    assert base_fingerprint(moved) == base_fingerprint(with_head)
    predictor = SamPredictor(large)
    predictor.set_image(np.zeros((96, 120, 3), np.uint8))
    masks, _, low = predictor.predict(np.array([[40, 30]]), np.array([1]))
    assert masks.shape == (3, 96, 120) and low.shape == (3, 48, 48)
    for args, message in (
        ([tiny_checkpoint, tmp_path / "vit.safetensors", "--image-size", "192"], "EfficientNet-Lite models only"),
        ([src, tmp_path / "odd.safetensors", "--image-size", "200"], "multiple of 32"),
    ):
        code, _, err = run_cli(capsys, "convert", *args)
        assert code == 2 and message in err and "Traceback" not in err
