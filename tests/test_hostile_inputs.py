"""Hostile and broken inputs (issue 10), part 1: image bytes, unusual-but-valid images, prompts through
SamPredictor and the ``segany segment`` CLI. Every case is answered by a SegAnyError naming the problem,
or, for unusual-but-valid images, by a correct upright H x W x 3 uint8 array. Nothing else: no other
exception type, no hang, no huge allocation. Part 2 (files: RLE, SA-1B, COCO, checkpoints) is
tests/test_hostile_files.py.

Each case is tallied per class in ``CASES`` of tests/reliability_tally.py (through ``expect_error``,
``expect_ok`` and ``counted``); the hooks in tests/conftest.py print the table at the end of the session
and write it as JSON to ``$SEGANY_RELIABILITY_JSON`` when set, which ``scripts/reliability_report.py``
turns into docs/RELIABILITY.md.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from segany.io.images import decode_image, load_image
from tests.conftest import synthetic_image
from tests.reliability_tally import counted, expect_error, expect_ok

# ------------------------------------------------------------------------------------------------
# image bytes


def encode(arr_or_img, fmt: str = "PNG", **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def tiny_png(width: int, height: int, color_type: int = 2, idat: bytes | None = None) -> bytes:
    """A PNG that *declares* width x height but carries only a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    data = idat if idat is not None else zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


NOISE = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"])
def test_truncated_images(fmt):
    data = encode(NOISE, fmt)
    for frac in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9):
        cut = data[: max(1, int(len(data) * frac))]
        expect_error("image: truncated", decode_image, cut, name="cut.img")


def test_zero_byte_missing_and_folder(tmp_path):
    expect_error("image: empty / missing / folder", decode_image, b"", match="empty")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    expect_error("image: empty / missing / folder", load_image, empty, match="empty")
    expect_error("image: empty / missing / folder", load_image, tmp_path / "nope.png", match="no such file")
    expect_error("image: empty / missing / folder", load_image, tmp_path, match="folder")


def test_corrupt_images():
    rng = np.random.default_rng(1)
    good = encode(NOISE, "PNG")
    cases = [
        b"\x00",
        b"\x89PNG\r\n\x1a\n",  # magic only
        b"GIF89a",
        b"\xff\xd8\xff",  # JPEG start only
        b"hello, this is a text file\n" * 20,
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        bytes(rng.integers(0, 256, 4096, dtype=np.uint8)),
        # a PNG whose IDAT is not zlib data
        tiny_png(8, 8, idat=b"not zlib at all"),
        # a PNG with a broken IHDR checksum
        good[:29] + bytes([good[29] ^ 0xFF]) + good[30:],
        # a PNG declaring zero width / zero height
        tiny_png(0, 8),
        tiny_png(8, 0),
        # a valid PNG header, then random bytes
        good[:64] + bytes(rng.integers(0, 256, 2048, dtype=np.uint8)),
        # bit-flips in the middle of the data
        good[:2000] + bytes(b ^ 0x55 for b in good[2000:2400]) + good[2400:],
    ]
    for data in cases:
        expect_error("image: corrupt / not an image", decode_image, data, name="bad.img")


def test_decompression_bombs_are_refused_before_decoding():
    # Tiny files (a few hundred bytes) that declare enormous pictures: refused from the header.
    bombs = [
        tiny_png(100_000, 100_000),
        tiny_png(65_535, 65_535, color_type=6),
        tiny_png(20_000, 20_000),
        tiny_png(1, 400_000_000),  # thin but huge
        tiny_png(2**31 - 1, 2**31 - 1),
        # GIF with a 65535 x 65535 logical screen and image
        b"GIF89a"
        + struct.pack("<HH", 65535, 65535)
        + b"\x00\x00\x00"
        + b"\x2c"
        + struct.pack("<HHHH", 0, 0, 65535, 65535)
        + b"\x00\x02\x02\x44\x01\x00\x3b",
        # BMP header claiming 60000 x 60000 x 24 bit
        b"BM"
        + struct.pack("<IHHI", 0, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 24, 0, 0, 0, 0, 0, 0)
        + b"\x00" * 64,
    ]
    for data in bombs:
        assert len(data) < 1000
        expect_error("image: decompression bomb / over the pixel cap", decode_image, data, name="bomb.img")
    # The cap is a parameter: a normal image over a small cap is refused with the numbers in the message.
    e = expect_error("image: decompression bomb / over the pixel cap", decode_image, encode(NOISE), max_pixels=1000)
    assert "80x64" in str(e) and "1,000" in str(e)


# ------------------------------------------------------------------------------------------------
# unusual but valid images: must work, upright, H x W x 3 uint8


def check_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.shape == (h, w, 3), (arr.dtype, arr.shape)


def test_modes_decode_to_rgb_uint8():
    h, w = 12, 20
    gray = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    rgba = np.dstack([NOISE[:h, :w], np.full((h, w), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # one transparent pixel: composited over white
    cases = {
        "L": encode(gray),
        "LA": encode(Image.fromarray(gray).convert("LA")),
        "1-bit": encode(Image.fromarray(gray > 128)),
        "I;16 (16-bit PNG)": encode(Image.fromarray(gray.astype(np.uint16) * 257)),
        "I (32-bit TIFF)": encode(Image.fromarray(gray.astype(np.int32) * 257), "TIFF"),
        "F (float TIFF)": encode(Image.fromarray(gray.astype(np.float32)), "TIFF"),
        "RGBA": encode(rgba),
        "P": encode(Image.fromarray(NOISE[:h, :w]).convert("P")),
        "P + transparency": encode(Image.fromarray(NOISE[:h, :w]).convert("P"), transparency=0),
        "CMYK JPEG": encode(Image.fromarray(NOISE[:h, :w]).convert("CMYK"), "JPEG"),
        "CMYK TIFF": encode(Image.fromarray(NOISE[:h, :w]).convert("CMYK"), "TIFF"),
        "YCbCr TIFF": encode(Image.fromarray(NOISE[:h, :w]).convert("YCbCr"), "TIFF"),
        "LAB TIFF": encode(Image.fromarray(NOISE[:h, :w]).convert("LAB"), "TIFF"),
        "GIF": encode(NOISE[:h, :w], "GIF"),
        "BMP": encode(NOISE[:h, :w], "BMP"),
        "WEBP": encode(NOISE[:h, :w], "WEBP", lossless=True),
    }
    for name, data in cases.items():
        arr = decode_image(data, name=name)
        check_rgb(arr, h, w)
        expect_ok("image: unusual mode / format (must work)")
    # values survive the conversions that should keep them
    assert (decode_image(cases["L"])[..., 0] == gray).all()
    assert (decode_image(cases["I;16 (16-bit PNG)"])[..., 1] == gray).all()  # 16-bit scaled to 8
    assert (decode_image(cases["CMYK TIFF"]).astype(int) - NOISE[:h, :w]).__abs__().max() <= 2
    assert (decode_image(cases["RGBA"])[0, 0] == 255).all()  # transparent over white
    assert (decode_image(cases["WEBP"]) == NOISE[:h, :w]).all()
    assert (decode_image(cases["BMP"]) == NOISE[:h, :w]).all()


# The orientation tag says how to turn the stored pixels to show them upright (EXIF 2.3, 0x0112).
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],
    5: lambda a: np.rot90(a[:, ::-1], 1),  # transpose
    6: lambda a: np.rot90(a, -1),  # rotate 90 clockwise
    7: lambda a: np.rot90(a[:, ::-1], -1),  # transverse
    8: lambda a: np.rot90(a, 1),  # rotate 90 counter-clockwise
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_comes_out_upright(orientation, fmt):
    h, w = 48, 80
    stored = np.full((h, w, 3), 128, np.uint8)
    stored[0:12, 0:16] = (255, 0, 0)  # red block at the stored top-left
    stored[-12:, -16:] = (0, 0, 255)  # blue block at the stored bottom-right
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    out = decode_image(data)
    want = ORIENTATIONS[orientation](stored)
    check_rgb(out, *want.shape[:2])
    red = np.argwhere((want[..., 0] == 255) & (want[..., 2] == 0)).mean(0)
    blue = np.argwhere((want[..., 2] == 255) & (want[..., 0] == 0)).mean(0)
    # where the marked blocks land (centre of each block, allowing JPEG blur)
    for centre, colour in ((red, (255, 0, 0)), (blue, (0, 0, 255))):
        y, x = int(round(centre[0])), int(round(centre[1]))
        assert np.abs(out[y, x].astype(int) - colour).max() < 40, (orientation, fmt, (y, x), out[y, x])
    if orientation in (6, 8, 5, 7):
        assert out.shape[:2] == (w, h)
    expect_ok("image: EXIF orientation 1-8 upright (must work)")


# ------------------------------------------------------------------------------------------------
# prompts through SamPredictor


@pytest.fixture(scope="module")
def predictor(tiny_model):
    from segany.predictor import SamPredictor

    p = SamPredictor(tiny_model)
    p.set_image(synthetic_image())
    return p


def test_predictor_rejects_bad_prompts(predictor):
    P = "prompt: SamPredictor non-finite / malformed"
    nan, inf = float("nan"), float("inf")
    for pts in ([[nan, 5]], [[5, inf]], [[-inf, 5]], [[nan, nan]]):
        expect_error(P, predictor.predict, point_coords=pts, point_labels=[1], match="NaN or infinite")
    for box in ([nan, 0, 10, 10], [0, 0, inf, 10], [-inf, 0, 5, 5]):
        expect_error(P, predictor.predict, box=box, match="NaN or infinite")
    expect_error(P, predictor.predict, point_coords=[[1, 2, 3]], point_labels=[1], match="shape")
    expect_error(P, predictor.predict, point_coords=[1, 2], point_labels=[1], match="shape")
    expect_error(P, predictor.predict, point_coords=[["a", "b"]], point_labels=[1], match="numeric")
    expect_error(P, predictor.predict, point_coords=[[1, 2]], point_labels=[1, 0], match="labels")
    expect_error(P, predictor.predict, point_coords=[[1, 2]], point_labels=[7], match="point_labels")
    expect_error(P, predictor.predict, point_coords=[[1, 2]], point_labels=[nan], match="NaN")
    expect_error(P, predictor.predict, point_coords=[[1, 2]], match="point_labels")
    expect_error(P, predictor.predict, point_labels=[1], match="point_coords")
    expect_error(P, predictor.predict, box=[1, 2, 3], match="box")
    expect_error(P, predictor.predict, box=[[1, 2, 3, 4, 5]], match="box")
    # finite values so large that they overflow float32 in the model's frame
    expect_error(P, predictor.predict, point_coords=[[1e300, 5]], point_labels=[1], match="too large")
    expect_error(P, predictor.predict, box=[0, 0, 1e39, 10], match="too large")


def test_predictor_rejects_bad_mask_inputs(predictor, tiny_model):
    P = "prompt: mask_input wrong shape / values"
    side = tiny_model.prompt_encoder.mask_input_size
    for shape in ((side[0], side[1]), (1, side[0], side[1] + 1), (2, *side), (1, 1, *side), (1, 256, 256)):
        expect_error(
            P,
            predictor.predict,
            point_coords=[[5, 5]],
            point_labels=[1],
            mask_input=np.zeros(shape),
            match="mask_input",
        )
    bad = np.zeros((1, *side))
    bad[0, 0, 0] = np.nan
    expect_error(P, predictor.predict, point_coords=[[5, 5]], point_labels=[1], mask_input=bad, match="NaN")


def test_predictor_rejects_bad_images(tiny_model):
    from segany.predictor import SamPredictor

    P = "prompt: SamPredictor.set_image bad arrays"
    p = SamPredictor(tiny_model)
    for img in (
        np.zeros((8, 8)),
        np.zeros((8, 8, 4), np.uint8),
        np.zeros((0, 8, 3), np.uint8),
        np.zeros((8, 8, 3), np.float32),
        "img.png",
        None,
    ):
        expect_error(P, p.set_image, img)
    expect_error(P, p.set_image, np.zeros((8, 8, 3), np.uint8), image_format="HSV")


def test_predictor_out_of_range_and_degenerate_prompts_keep_official_semantics(predictor):
    # SamPredictor keeps the official API: finite points outside the image, negative coordinates,
    # empty or inverted boxes are passed to the model (the official predictor does the same, and the
    # automatic generator relies on it). They must give well-formed, finite answers, not crash.
    # (`segany segment` refuses them: see the CLI tests.)
    ok = "prompt: SamPredictor finite out-of-range / degenerate (answered, official semantics)"
    cases = [
        dict(point_coords=[[-50, -50]], point_labels=[1]),
        dict(point_coords=[[1e6, 3e5]], point_labels=[1]),
        dict(point_coords=[[5, 5]], point_labels=[-1]),
        dict(box=[50, 50, 10, 10]),  # inverted
        dict(box=[5, 5, 5, 5]),  # empty
        dict(box=[-100, -100, -1, -1]),  # fully outside
        dict(box=[0, 0, 1e6, 1e6]),
        dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)),
    ]
    for kw in cases:
        masks, scores, low = predictor.predict(**kw)
        assert masks.shape[1:] == (96, 128) and masks.dtype == bool
        assert np.isfinite(scores).all() and np.isfinite(low).all()
        expect_ok(ok)


# ------------------------------------------------------------------------------------------------
# the CLI: one stderr line, exit 2


def run_cli(argv, capsys) -> tuple[int, str]:
    from segany.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_cli_rejects_bad_prompts(tmp_path, image_file, tiny_checkpoint, capsys):
    C = "prompt: `segany segment` CLI (exit 2, one stderr line)"
    out = str(tmp_path / "out")
    base = ["segment", str(image_file), "-o", out, "--model", str(tiny_checkpoint)]
    cases = [
        (["--point", "nan,5"], "finite"),
        (["--point", "5,inf"], "finite"),
        (["--point", "1e999,5"], "finite"),
        (["--point=-1,5"], "outside"),
        (["--point", "-1,5"], "outside"),  # argparse alone printed a usage screen for this one
        (["--negative", "-.5,3"], "outside"),
        (["--box", "-50,-50,-1,-1"], "outside"),
        (["--point", "128,5"], "outside"),  # x == width
        (["--point", "5,96"], "outside"),
        (["--point", "1e308,5"], "outside"),
        (["--negative=-0.5,-0.5"], "outside"),
        (["--point", "abc"], "expected X,Y"),
        (["--point", "1,2,3"], "expected X,Y"),
        (["--point", ""], "expected X,Y"),
        (["--point", "1;2"], "expected X,Y"),
        (["--box", "1,2,3"], "four numbers"),
        (["--box", "nan,0,10,10"], "finite"),
        (["--box", "0,0,inf,10"], "finite"),
        (["--box", "10,10,5,20"], "empty"),  # inverted
        (["--box", "10,10,10,20"], "empty"),  # zero width
        (["--box", "10,10,20,10"], "empty"),  # zero height
        (["--box", "200,200,300,300"], "outside"),
        (["--box=-50,-50,-1,-1"], "outside"),
        ([], "at least one prompt"),
    ]
    for extra, match in cases:
        with counted(C):  # one case, counted as a SegAnyError once the block passes
            code, err = run_cli(base + extra, capsys)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1, (extra, code, err)
            assert lines[0].startswith("segany segment: error:") and match.lower() in lines[0].lower(), (extra, err)
            assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written for a refused request


def test_cli_rejects_bad_images_and_models(tmp_path, image_file, tiny_checkpoint, capsys):
    C = "prompt: `segany segment` CLI (exit 2, one stderr line)"
    bad_img = tmp_path / "bad.png"
    bad_img.write_bytes(tiny_png(100_000, 100_000))
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(image_file.read_bytes()[:300])
    bad_model = tmp_path / "model.safetensors"
    bad_model.write_bytes(b"\x00" * 100)
    cases = [
        ([str(bad_img), "--model", str(tiny_checkpoint)], "pixels"),
        ([str(trunc), "--model", str(tiny_checkpoint)], "truncated"),
        ([str(tmp_path / "nope.png"), "--model", str(tiny_checkpoint)], "no such file"),
        ([str(image_file), "--model", str(bad_model)], "safetensors"),
        ([str(image_file), "--model", str(tmp_path / "nope.pth")], "unknown model"),
    ]
    for extra, match in cases:
        with counted(C):  # one case, counted as a SegAnyError once the block passes
            code, err = run_cli(["segment", "--point", "5,5", "-o", str(tmp_path / "o")] + extra, capsys)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and match in lines[0], (extra, code, err)


def test_cli_entry_point_in_a_subprocess(tmp_path, image_file):
    # The real process: exit status 2, exactly one stderr line, nothing on stdout, no traceback.
    import subprocess
    import sys

    C = "prompt: `segany segment` CLI (exit 2, one stderr line)"
    for extra in (["--point", "nan,5"], ["--point", "-1,5"], ["--box", "10,10,5,5"]):
        with counted(C):  # one case, counted as a SegAnyError once the block passes
            argv = [sys.executable, "-m", "segany.cli", "segment", str(image_file), "-o", str(tmp_path / "o"), *extra]
            r = subprocess.run(
                argv, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not r.stdout, (extra, r)


def test_cli_valid_prompt_still_works(tmp_path, image_file, tiny_checkpoint, capsys):
    code, err = run_cli(
        [
            "segment",
            str(image_file),
            "--point",
            "40,30",
            "--box",
            "0,0,60,50",
            "-o",
            str(tmp_path / "o"),
            "--model",
            str(tiny_checkpoint),
        ],
        capsys,
    )
    assert code == 0, err
    assert (tmp_path / "o" / "mask.png").is_file()
