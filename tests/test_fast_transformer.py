"""The two-way transformer's banded image side (``modeling/fast/transformer.py``, the path of prompts with a
mask input) is the plain transformer: random weights, one and several bands, several prompts, an encoding
shared by the prompts or one each, and its cache of the encoding's tokens."""

from __future__ import annotations

import pytest
import torch

import segany.modeling.fast.transformer as fast_transformer
from segany.modeling.fast.transformer import FastTwoWayTransformer
from segany.modeling.transformer import TwoWayTransformer


def _pair(depth: int) -> tuple[FastTwoWayTransformer, TwoWayTransformer]:
    """The fast and the plain transformer with the same random weights (LayerNorms not at one and zero,
    which would hide mistakes in the re-associated algebra)."""
    fast = FastTwoWayTransformer(depth, 32, 4, 64).eval()
    g = torch.Generator().manual_seed(depth)
    with torch.no_grad():
        for name, p in fast.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "norm" in name else 0.3) + ("norm" in name))
    plain = TwoWayTransformer(depth, 32, 4, 64).eval()
    plain.load_state_dict(fast.state_dict())
    return fast, plain


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("band", [7, 512])
@pytest.mark.parametrize("shared_pe", [True, False])
def test_banded_transformer_is_the_plain_one(monkeypatch, depth, band, shared_pe):
    monkeypatch.setattr(fast_transformer, "BAND", band)
    fast, plain = _pair(depth)
    g = torch.Generator().manual_seed(7)
    image = torch.randn(3, 32, 6, 9, generator=g)
    pe = torch.randn(1, 32, 6, 9, generator=g)
    pe = pe.expand(3, -1, -1, -1) if shared_pe else pe + torch.randn(3, 32, 6, 9, generator=g)
    tokens = torch.randn(3, 5, 32, generator=g)
    with torch.no_grad():
        got = fast(image, pe, tokens)
        want = plain(image, pe, tokens)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=0)
    with torch.enable_grad():  # training sees the plain forward
        torch.testing.assert_close(fast(image, pe, tokens)[1], want[1], atol=1e-5, rtol=0)


def test_the_encodings_tokens_are_kept_while_the_encoding_is_the_same():
    fast, plain = _pair(2)
    g = torch.Generator().manual_seed(3)
    image, pe = torch.randn(2, 32, 5, 5, generator=g), torch.randn(1, 32, 5, 5, generator=g)
    tokens = torch.randn(2, 4, 32, generator=g)
    with torch.no_grad():
        fast(image, pe.expand(2, -1, -1, -1), tokens)
        kept = fast._pe_tokens[2]
        fast(image, pe.expand(2, -1, -1, -1), tokens)  # a new view of the same encoding
        assert fast._pe_tokens[2] is kept
        pe.mul_(2.0)  # changed in place: made again
        got = fast(image, pe.expand(2, -1, -1, -1), tokens)
        assert fast._pe_tokens[2] is not kept
        torch.testing.assert_close(got[1], plain(image, pe.expand(2, -1, -1, -1), tokens)[1], atol=1e-5, rtol=0)
