"""Shared by the fuzz test files (tests/test_fuzz.py, tests/test_fuzz_readers_server.py): the hypothesis
settings and the mutated-image strategy. Their tallies live in tests/reliability_tally.py.
"""

from __future__ import annotations

import io
import os

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

#: SEGANY_FUZZ_SCALE=10 runs a ten times longer campaign (default: about 15-25 s for both files together).
SCALE = float(os.environ.get("SEGANY_FUZZ_SCALE", "1"))
FAST = settings(max_examples=int(300 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=int(150 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _seed(fmt: str) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    if fmt == "P":
        img, fmt = img.convert("P"), "PNG"
    img.save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [_seed(f) for f in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "P")]


@st.composite
def mutated_image(draw) -> bytes:
    """One of ``SEEDS`` (a small valid image file) with a few random flips, cuts, insertions or overwrites."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        pos = draw(st.integers(0, len(data) - 1)) if data else 0
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            data = data[: draw(st.integers(0, len(data)))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80]))
    return bytes(data)
