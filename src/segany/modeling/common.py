"""Small building blocks shared by the networks."""

from __future__ import annotations

import torch
from torch import nn


def eager_inference(module: nn.Module | None = None) -> bool:
    """True where the inference-only eager code paths (in-place updates, ``out=`` buffers, caches, folded
    batch norms) may run: no autograd, ``module`` in eval mode, and not being traced, compiled or exported
    (those see the plain code, which their own optimisations and exporters handle better)."""
    return (
        not torch.is_grad_enabled()
        and not (module is not None and module.training)
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
    )


def activate_(x: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """``act(x)``, in place in ``x`` for GELU and ReLU when autograd is off (``x`` must be the caller's own
    fresh tensor): saves an allocation and a pass over memory per activation, which for the image
    encoder's MLP (896 x 3072 per call) measured 28 ms instead of 40."""
    if torch.is_grad_enabled():
        return act(x)
    if type(act) is nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    if type(act) is nn.ReLU:
        return torch.relu_(x)
    return act(x)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, act: nn.Module | None) -> torch.Tensor:
    """``act(x @ weight + bias)`` (``weight``: in x out; ``act`` None: none) for inference; on a CPU in
    fp32 the bias and a GELU are fused into the product (oneDNN post-ops: one pass over the output
    instead of two or three, which matters where memory bandwidth is the limit)."""
    fused = act is None or (type(act) is nn.GELU and act.approximate == "none")
    if (
        fused
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == bias.dtype == torch.float32
        and _HAS_FUSED_LINEAR
        and not torch.is_grad_enabled()
    ):
        attr, algorithm = ("none", "") if act is None else ("gelu", "none")
        return torch.ops.mkldnn._linear_pointwise(x, weight.t().contiguous(), bias, attr, [], algorithm)
    y = torch.addmm(bias, x, weight)
    return y if act is None else activate_(y, act)


_HAS_FUSED_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a ``B x C x H x W`` tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 (a no-op for fp32 input): in bf16 the variance of a 256-channel map loses
        # most of its digits. The output takes the promoted type of the input and the weights.
        out_dtype = torch.promote_types(x.dtype, self.weight.dtype)
        x = x.float()
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) * torch.rsqrt(s + self.eps)
        return (self.weight[:, None, None] * x + self.bias[:, None, None]).to(out_dtype)


class MLPBlock(nn.Module):
    """Transformer feed-forward block: ``lin2(act(lin1(x)))``."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if eager_inference(self):
            return self.lin2(activate_(self.lin1(x), self.act))  # the hidden activations are ours
        return self.lin2(self.act(self.lin1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"
