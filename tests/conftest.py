"""Shared fixtures: tiny random models and small synthetic images (no downloads, no ../shared), and the
hooks that print and write the reliability tallies (tests/reliability_tally.py) at the end of the session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def synthetic_image(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image with a bright rectangle and a dark disc (deterministic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 / w), (yy * 255 / h), np.full((h, w), 90.0)], -1)
    img += rng.normal(0, 8, img.shape)
    img[h // 4 : h // 2, w // 5 : w // 2] = (240, 60, 40)
    disc = (yy - 3 * h // 4) ** 2 + (xx - 3 * w // 4) ** 2 < (min(h, w) // 6) ** 2
    img[disc] = (20, 30, 200)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_model():
    from segany.modeling import build_sam, get_config

    torch.manual_seed(0)
    return build_sam(get_config("tiny_test")).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model) -> Path:
    """The tiny model saved in our .safetensors format."""
    from segany.checkpoint import save_model

    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_model(tiny_model, path)
    return path


@pytest.fixture()
def image_file(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(synthetic_image()).save(path)
    return path


# ------------------------------------------------------------------------------------------------
# reliability tallies (tests/reliability_tally.py): printed and written once, at the end of the session


def _tally():
    """The tally module if a test file imported it, else None: nothing was tallied."""
    return sys.modules.get("tests.reliability_tally")


def pytest_runtest_logreport(report):
    tally = _tally()
    if tally is not None and report.when == "call":
        if report.nodeid.split("::", 1)[0].rsplit("/", 1)[-1] in tally.FUZZ_FILES:
            tally.FUZZ_SECONDS[0] += report.duration


def pytest_terminal_summary(terminalreporter):
    tally = _tally()
    lines = tally.summary_lines() if tally is not None else []
    if lines:
        terminalreporter.section("reliability tallies")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session):
    tally = _tally()
    if tally is not None:
        tally.write_session_tallies()
