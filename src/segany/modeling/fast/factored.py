"""The mask decoder's image tokens kept in factored form: a per-image part plus a small per-prompt part.

In SAM's two-way transformer the ``N = 64*64`` image tokens change per prompt only through the
image-to-token attentions, each followed by a LayerNorm. An attention adds, to every image token, softmax
weights over the ``T`` prompt tokens of each head times those tokens' projected values: a rank
``heads x T`` update. A LayerNorm subtracts each token's mean (a fixed linear map ``P``), scales the token
by its ``1/std`` and the channels by the norm's weight. So after any number of blocks the tokens of a
prompt are exactly

    X = diag(s) K M + L^T R

with ``K`` the image's centered tokens (``N x C``, per image), ``M`` a fixed ``C x C`` matrix (the
LayerNorms' ``P`` and weights so far), ``s`` a scale per token (the product of the LayerNorms' ``1/std``),
``L`` ``r x N`` coefficients (attention weights and constant columns) and ``R`` ``r x C`` rows (``r`` about
57 per block). Everything the decoder reads from the image tokens is linear in ``X`` or a LayerNorm of it:

* a projection ``X W^T`` is ``diag(s) (K M W^T) + L^T (R W^T)``: the first product is computed once per
  image, the second is ``N x r`` times a small matrix;
* a LayerNorm's variance is ``|X_n P|^2 = s_n^2 |K M P|_n^2 + 2 s_n L_n . (R P M^T K^T)_n +
  L_n^T (R P R^T) L_n``: per-image norms, per-image projections onto the (per-head) row spaces of ``R``,
  and a small Gram matrix.

So the transformer builds no ``N x C`` tensor per prompt (the upscaling's first product, which is
followed by a non-linear layer norm, is the first): the per-prompt work is on ``N x r`` and
``N x heads x T`` tensors, with ``N`` innermost (softmaxes over the few tokens stay vectorised). The
per-image products take about 60 MB for SAM's decoder. Same function as the plain decoder up to float
rounding (the algebra is exact).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn


def _center(x: torch.Tensor) -> torch.Tensor:
    """Rows minus their means (``x P``)."""
    return x - x.mean(-1, keepdim=True)


class ImageSide:
    """Per-image products of the image tokens at each level, ``K M_l`` (``N x C``), computed on first use
    and kept. ``K`` is centered and each ``M`` step is ``P diag(g)``, so ``K M_l`` is made token by token
    (scale, center), not as an ``N x C x C`` product."""

    def __init__(self, k: torch.Tensor, gains: list[torch.Tensor]) -> None:
        """``k``: ``N x C``, centered; ``gains``: the LayerNorms' weights, one per level step."""
        self.k = k
        self.gains = gains
        self._cache: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, make) -> torch.Tensor:
        """The product called ``key`` (``make()`` computes it on a miss)."""
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = make()
        return out

    def tokens(self, level: int, centered: bool = False) -> torch.Tensor:
        """``K M_level`` (``centered``: ``K M_level P``), ``N x C``."""
        if level == 0:
            return self.k  # already centered
        if centered:
            return self.get(("tokens_c", level), lambda: _center(self.tokens(level)))
        return self.get(("tokens", level), lambda: self.tokens(level - 1, centered=True) * self.gains[level - 1])


class Plan:
    """The fixed (prompt-independent) matrices of one decoder: the LayerNorms' maps ``P diag(g)``, the
    attention output rows carried through them, and the constant rows (biases) per level.

    Level ``l`` is the state of the image tokens after ``l`` blocks (their LayerNorm included). A constant
    row belongs to an *epoch*: the biases added between two LayerNorms share one coefficient column (all
    ones when added, then scaled by every later LayerNorm's ``1/std``). Epoch 0's (the first block's
    attention output bias) is folded into ``K``; epoch ``e >= 1`` holds LayerNorm ``e-1``'s bias and, once
    block ``e``'s image-to-token attention has run (``biased``), that attention's output bias.
    """

    def __init__(self, transformer: nn.Module) -> None:
        layers = transformer.layers
        self.depth = len(layers)
        c = layers[0].norm4.weight.shape[0]
        eye = torch.eye(c, dtype=layers[0].norm4.weight.dtype, device=layers[0].norm4.weight.device)
        center = eye - 1.0 / c  # P: x P subtracts the row mean
        self.steps = [center * layer.norm4.weight[None, :] for layer in layers]  # P diag(g) per LayerNorm
        self._basis: dict[tuple[int, int], torch.Tensor] = {}
        self._rows: dict[tuple[int, int], torch.Tensor] = {}
        self.layers = layers

    def basis(self, j: int, level: int) -> torch.Tensor:
        """``H x d x C``: block ``j``'s attention output projection per head, carried to ``level``."""
        key = (j, level)
        out = self._basis.get(key)
        if out is None:
            if level == j:
                attn = self.layers[j].cross_attn_image_to_token
                w = attn.out_proj.weight  # C x (H*d)
                out = w.t().reshape(attn.num_heads, -1, w.shape[0])
            else:
                out = self.basis(j, level - 1) @ self.steps[level - 1]
            self._basis[key] = out
        return out

    def carried(self, rows: torch.Tensor, level: int) -> torch.Tensor:
        """``... x C`` rows of the image tokens at level 0 (added to them before the first LayerNorm), carried
        to ``level``: ``rows M_level``."""
        for step in self.steps[:level]:
            rows = rows @ step
        return rows

    def row(self, epoch: int, level: int, biased: bool) -> torch.Tensor:
        """``C``: the constant row of ``epoch`` at ``level``."""
        key = (epoch, level, biased)
        out = self._rows.get(key)
        if out is None:
            if level == epoch:
                out = self.layers[epoch - 1].norm4.bias
                if biased:
                    out = out + self.layers[epoch].cross_attn_image_to_token.out_proj.bias
            else:
                out = self.row(epoch, level - 1, biased) @ self.steps[level - 1]
            self._rows[key] = out
        return out


@dataclass
class CoefficientRows:
    """Rows ``start : start + size`` of a :class:`FactoredTokens`' coefficients: an attention update of
    block ``layer`` (``values`` ``B x H x T x d``: its tokens' values per head), the constant of
    ``epoch`` (``values`` None), or per-prompt rows added at level 0 (``cells`` ``B x size x C``: the
    dense embedding's differences from the per-image vector, on one image token each, ``cell_index``
    ``B x size``: their coefficients are zero elsewhere)."""

    start: int
    size: int
    layer: int = -1
    epoch: int = -1
    values: torch.Tensor | None = None
    biased: bool = False
    cells: torch.Tensor | None = None
    cell_index: torch.Tensor | None = None


@dataclass
class FactoredTokens:
    """The image tokens of ``B`` prompts, ``X_b = diag(s_b) K M_level + coef_b^T R_b`` (see the module).

    The coefficients live in rows ``:r`` of ``buf`` (``B x r_max x N``, allocated once per prompt batch):
    updates write into it in place, so a state is used once, then replaced by the one an update returns.
    """

    level: int
    s: torch.Tensor | None  # B x N (None: ones)
    buf: torch.Tensor
    r: int
    blocks: list[CoefficientRows]
    _rows: torch.Tensor | None = None

    @property
    def coef(self) -> torch.Tensor:
        """``B x r x N``."""
        return self.buf[:, : self.r]

    @property
    def batch(self) -> int:
        return self.buf.shape[0]

    def ones_row(self) -> int:
        """The coefficient row that is all ones: the constant added since the last LayerNorm."""
        return next(b.start for b in self.blocks if b.values is None and b.cells is None and b.epoch == self.level)

    def select(self, i: int) -> FactoredTokens:
        """Prompt ``i`` alone."""
        blocks = [
            CoefficientRows(
                b.start,
                b.size,
                b.layer,
                b.epoch,
                None if b.values is None else b.values[i : i + 1],
                b.biased,
                None if b.cells is None else b.cells[i : i + 1],
                None if b.cell_index is None else b.cell_index[i : i + 1],
            )
            for b in self.blocks
        ]
        s = None if self.s is None else self.s[i : i + 1]
        rows = None if self._rows is None else self._rows[i : i + 1]
        return FactoredTokens(self.level, s, self.buf[i : i + 1], self.r, blocks, rows)

    def rows(self, plan: Plan) -> torch.Tensor:
        """``R``: ``B x r x C`` (small; built once per level)."""
        if self._rows is None:
            parts = []
            for blk in self.blocks:
                if blk.cells is not None:
                    parts.append(plan.carried(blk.cells, self.level))
                elif blk.values is None:
                    parts.append(plan.row(blk.epoch, self.level, blk.biased).expand(self.batch, 1, -1))
                else:
                    basis = plan.basis(blk.layer, self.level)  # H x d x C
                    b, h, t, d = blk.values.shape
                    r = torch.bmm(blk.values.transpose(0, 1).reshape(h, b * t, d), basis)  # H x BT x C
                    parts.append(r.view(h, b, t, -1).transpose(0, 1).reshape(b, h * t, -1))
            self._rows = torch.cat(parts, dim=1)
        return self._rows


class FactoredDecoderSide:
    """What the re-associated decoder does with the factored image tokens of one image: projections
    through attention heads, attention-weighted sums, LayerNorms and the upscaling's first product."""

    def __init__(
        self, transformer: nn.Module, k: torch.Tensor, key_pe: torch.Tensor, pe_cache: dict | None = None
    ) -> None:
        """``k``: the image's tokens at level 0, ``N x C``, centered; ``key_pe`` their positional encoding;
        ``pe_cache``: where the products of ``key_pe`` are kept (shared by the images of one model)."""
        self.plan = Plan(transformer)
        self.image = ImageSide(k, [layer.norm4.weight for layer in transformer.layers])
        self.key_pe = key_pe
        self.pe_cache = {} if pe_cache is None else pe_cache

    # -- per-image products ---------------------------------------------------------------------------

    def _proj(self, level: int, lin: nn.Linear) -> torch.Tensor:
        """``(K M W^T)^T``: ``D x N``."""
        return self.image.get(("proj", level, id(lin)), lambda: lin.weight @ self.image.tokens(level).t())

    def _pe_proj(self, lin: nn.Linear) -> torch.Tensor:
        """``(PE W^T)^T``: ``D x N`` (the same for every image: kept in ``pe_cache`` while the weights are
        unchanged)."""
        w = lin.weight
        version = None if w.is_inference() else w._version
        hit = self.pe_cache.get(id(lin))
        if hit is None or hit[0]() is not w or hit[1] != version:
            hit = self.pe_cache[id(lin)] = (weakref.ref(w), version, w @ self.key_pe.t())
        return hit[2]

    # -- attention ------------------------------------------------------------------------------------

    def scores(self, x: FactoredTokens, lin: nn.Linear, q: torch.Tensor) -> torch.Tensor:
        """``(X + PE) W^T + b`` per head dotted with ``q`` (``B x H x T' x d``): ``B x H x T' x N``."""
        b, h, t, d = q.shape
        qh = q.transpose(0, 1).reshape(h, b * t, d)
        n = self.image.k.shape[0]
        base = torch.bmm(qh, self._proj(x.level, lin).view(h, d, n)).view(h, b, t, n).transpose(0, 1)
        pe = torch.bmm(qh, self._pe_proj(lin).view(h, d, n)).view(h, b, t, n).transpose(0, 1)
        # Scaled into a prompt-major tensor: the head-major products are reordered by the same pass.
        out = torch.mul(base, x.s[:, None, None, :], out=q.new_empty(b, h, t, n)).add_(pe)
        # The low-rank part: coefficients (B x r x N) times (R W^T) contracted with q per head; the bias
        # goes with the all-ones coefficient row.
        rw = (x.rows(self.plan) @ lin.weight.t()).view(b, -1, h, d)  # B x r x H x d
        z = torch.einsum("brhd,bhtd->bhtr", rw, q).reshape(b, h * t, -1)
        z[:, :, x.ones_row()] += (q * lin.bias.view(h, 1, d)).sum(-1).view(b, h * t)
        return out.view(b, h * t, n).baddbmm_(z, x.coef).view(b, h, t, n)

    def mixed(self, x: FactoredTokens, lin: nn.Linear, a: torch.Tensor) -> torch.Tensor:
        """``sum_n a_n (X W^T + b)_n`` per head for weights ``a`` (``B x H x T' x N``, summing to one over
        N): ``B x H x T' x d``."""
        b, h, t, n = a.shape
        kw = self._proj(x.level, lin).view(h, -1, n)  # H x d x N
        d = kw.shape[1]
        a_s = torch.mul(a.transpose(0, 1), x.s[None, :, None, :], out=a.new_empty(h, b, t, n))  # head-major
        base = torch.bmm(a_s.view(h, b * t, n), kw.transpose(1, 2))  # H x BT x d
        out = base.view(h, b, t, d).transpose(0, 1)
        m = torch.bmm(a.view(b, h * t, n), x.coef.transpose(1, 2)).view(b, h, t, -1)  # B x H x T' x r
        rw = (x.rows(self.plan) @ lin.weight.t()).view(b, -1, h, d)  # B x r x H x d
        return out + torch.einsum("bhtr,brhd->bhtd", m, rw) + lin.bias.view(h, 1, d)

    # -- updates ------------------------------------------------------------------------------------------

    def add_attention(
        self,
        x: FactoredTokens | None,
        layer: int,
        scores: torch.Tensor,
        v: torch.Tensor,
        cells: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> FactoredTokens:
        """``X + sum_t a_t U_t`` for the image-to-token attention of block ``layer``: ``a = softmax(scores)``
        over the tokens (``scores`` ``B x H x T x N``), ``v`` the tokens' values per head (``B x H x T x d``).
        Its output bias (one per image token: each head's weights sum to one) is in the constant rows
        (:class:`Plan`).

        ``cells``: with ``x`` None (the per-image tokens), per-prompt differences of the image tokens,
        ``(index B x k, delta B x k x C)``: ``delta[b, i]`` is added to token ``index[b, i]`` (rows with
        one-hot coefficients; zero rows pad)."""
        b, h, t, n = scores.shape
        if x is None:
            k = 0 if cells is None else cells[0].shape[1]
            depth = self.plan.depth  # rows: every block's attention weights, one constant per LayerNorm
            x = FactoredTokens(0, None, scores.new_empty(b, k + depth * (h * t + 1), n), k, [])
            if k:
                x.buf[:, :k].zero_().scatter_(2, cells[0][:, :, None], 1.0)
                x.blocks.append(CoefficientRows(0, k, cells=cells[1].to(scores.dtype), cell_index=cells[0]))
        # Softmax over the tokens with N innermost (vectorised over the image tokens); copied into the
        # buffer (softmax's out= variant was slower).
        x.buf[:, x.r : x.r + h * t] = scores.softmax(2).view(b, h * t, n)
        # The constant of this epoch (all-ones coefficients since the last LayerNorm) takes the output bias.
        blocks = [
            CoefficientRows(k.start, k.size, epoch=k.epoch, biased=True) if k.epoch == layer else k for k in x.blocks
        ]
        blocks.append(CoefficientRows(x.r, h * t, layer=layer, values=v))
        return FactoredTokens(x.level, x.s, x.buf, x.r + h * t, blocks)

    def layer_norm(self, x: FactoredTokens, norm: nn.LayerNorm) -> FactoredTokens:
        """``norm(X)`` (the LayerNorm after block ``x.level``'s image-to-token attention)."""
        plan, level = self.plan, x.level
        coef = x.coef
        b, r, n = coef.shape
        c = self.image.k.shape[1]
        # |X_n P|^2 = s^2 |K M P|_n^2 + 2 s (cross . L)_n + (L^T G L)_nn, with cross = R P M^T K^T (per
        # block: per head for attention blocks) and G = R P R^T; the last two as one sum over r of
        # (2 s cross + G L) * L.
        y = torch.empty_like(coef)
        kc = lambda: self.image.tokens(level, centered=True).t()  # noqa: E731  ((K M P)^T, on a cache miss)
        for blk in x.blocks:
            dst = y[:, blk.start : blk.start + blk.size]
            if blk.cells is not None:  # per-prompt rows: (R M P) (K M P)^T = (R M) (K M P)^T, read (below) only
                # at each row's own token, where its coefficient is not zero: those products alone
                idx = blk.cell_index
                tokens = self.image.tokens(level, centered=True)[idx]  # B x k x C
                own = (plan.carried(blk.cells, level) * tokens).sum(-1)  # B x k
                dst.zero_().scatter_(2, idx[:, :, None], own[:, :, None])
            elif blk.values is None:
                key = ("cross_row", level, blk.epoch, blk.biased)
                proj = self.image.get(key, lambda k=blk: plan.row(k.epoch, level, k.biased)[None] @ kc())
                dst.copy_(proj.expand(b, 1, n))
            else:
                basis = plan.basis(blk.layer, level)  # H x d x C
                hh, d, _ = basis.shape
                key = ("cross", level, blk.layer)
                proj = self.image.get(key, lambda bs=basis: bs.reshape(-1, c) @ kc()).view(hh, d, n)
                v = blk.values
                t = v.shape[2]
                vh = v.transpose(0, 1).reshape(hh, b * t, d)
                if b == 1:  # head-major is prompt-major: the product goes straight into place
                    torch.bmm(vh, proj, out=dst.view(hh, t, n))
                else:
                    dst.view(b, hh, t, n).copy_(torch.bmm(vh, proj).view(hh, b, t, n).transpose(0, 1))
        y.mul_(2.0 if x.s is None else 2.0 * x.s[:, None, :])
        rows_c = _center(x.rows(plan))  # R P
        y.baddbmm_(torch.bmm(rows_c, rows_c.transpose(1, 2)), coef)
        var = torch.bmm(coef.new_ones(b, 1, r), y.mul_(coef)).view(b, n)  # the sum over r, as one product
        if x.s is None:
            var += self._norm(level)
        else:
            var.addcmul_(x.s.square(), self._norm(level))
        rstd = var.div_(c).add_(norm.eps).rsqrt_()
        s = rstd if x.s is None else x.s * rstd
        coef.mul_(rstd[:, None, :])
        x.buf[:, r].fill_(1.0)
        return FactoredTokens(level + 1, s, x.buf, r + 1, x.blocks + [CoefficientRows(r, 1, epoch=level + 1)])

    def _norm(self, level: int) -> torch.Tensor:
        """``|K M P|^2`` per token: ``N``."""
        return self.image.get(("norm", level), lambda: self.image.tokens(level, centered=True).square().sum(1))

    # -- the upscaling's first product ------------------------------------------------------------------------

    def linear_tokens(
        self, x: FactoredTokens, name: str, weight: torch.Tensor, bias: torch.Tensor, grid: tuple[int, int]
    ) -> TokenProduct:
        """``X weight + bias`` (``weight`` ``C x D``, called ``name`` in the per-image cache) for the one
        prompt of ``x`` on the ``grid`` of image tokens, to be evaluated block by block."""
        key = ("linear", x.level, name)
        # N x D, token-major (the layer norm that follows is over D's groups)
        base = self.image.get(key, lambda: self.image.tokens(x.level) @ weight)
        rw = x.rows(self.plan)[0] @ weight  # r x D
        last = x.blocks[-1]
        assert last.values is None and last.start == rw.shape[0] - 1  # the newest constant: all ones
        rw[-1] += bias
        gh, gw = grid
        return TokenProduct(base.view(gh, gw, -1), x.s[0].view(gh, gw), x.coef[0].view(-1, gh, gw), rw)


@dataclass
class TokenProduct:
    """``X W + b`` of one prompt (:meth:`FactoredDecoderSide.linear_tokens`): the per-image ``K M W`` scaled
    per token, plus the coefficients times the small ``R W`` (``b`` in the all-ones row)."""

    base: torch.Tensor  # gh x gw x D
    s: torch.Tensor  # gh x gw
    coef: torch.Tensor  # r x gh x gw
    rw: torch.Tensor  # r x D

    def block(self, r0: int, r1: int, cols: int) -> torch.Tensor:
        """Image-token rows ``r0 : r1``, the first ``cols`` columns: ``(h*w) x D``, token-major."""
        n = (r1 - r0) * cols
        out = self.base[r0:r1, :cols].reshape(n, -1) * self.s[r0:r1, :cols].reshape(n, 1)
        return out.addmm_(self.coef[:, r0:r1, :cols].reshape(-1, n).t(), self.rw)
