"""Training-time fused ops for the ConvMixer block.

The depthwise branch of a block is ``z = x + BN(act(dwconv(x)))``. Written as modules that is three full-size
temporaries and five passes over memory (act, BN statistics, BN normalise, add, plus the allocations' page
faults on CPU). :class:`ActBatchNormResidual` does it as act, statistics, one ``addcmul``: the BN scale and the
residual add go into a single pass, and the BN shift, which is constant across space, is handed back so the
caller folds it into the bias of the next 1x1 convolution (``W @ (z' + shift) + b = W @ z' + (b + W @ shift)``).
That fold is exact in real arithmetic; the 1x1 convolution is the only consumer of ``z``, so the gradient with
respect to ``z'`` is the gradient with respect to ``z`` and the shift needs no gradient of its own.

Backward reuses ATen's fused BatchNorm backward and the activation's backward kernel, so the gradients are the
ones autograd computes for the module version, to float rounding.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ActBatchNormResidual", "act_kind", "fused_block_forward", "fused_block_supported"]


def act_kind(module: nn.Module) -> str | None:
    """``"gelu"`` (exact erf form), ``"relu"``, or None for activations the fused path does not handle."""
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else None
    # timm's GELU (``timm.layers.GELU``) is F.gelu with the exact erf form.
    if type(module).__name__ == "GELU" and type(module).__module__.startswith("timm.") and \
            getattr(module, "approximate", "none") == "none":
        return "gelu"
    return None


def _act(x: torch.Tensor, kind: str) -> torch.Tensor:
    return F.relu(x) if kind == "relu" else F.gelu(x)


def _act_backward(grad: torch.Tensor, pre: torch.Tensor, post: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "relu":
        return torch.ops.aten.threshold_backward(grad, post, 0)
    return torch.ops.aten.gelu_backward(grad, pre)


class ActBatchNormResidual(torch.autograd.Function):
    """``(x + scale * act(a), shift)`` with ``BN(act(a)) = scale * act(a) + shift`` in training mode.

    Updates the running statistics like ``nn.BatchNorm2d`` (momentum, or a cumulative average when momentum is
    None). ``shift`` is returned without gradient; see the module docstring for why that is exact.
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float,
                eps: float, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = _act(a, kind)
        var, mean = torch.var_mean(g, dim=(0, 2, 3), correction=0)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None and running_var is not None:
            count = g.numel() // g.shape[1]
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                running_var.mul_(1 - momentum).add_(var, alpha=momentum * count / max(count - 1, 1))
        scale = weight * invstd
        shift = bias - mean * scale
        z = torch.addcmul(x, g, scale.view(1, -1, 1, 1))
        ctx.save_for_backward(a, g, weight, mean, invstd)
        ctx.eps, ctx.kind = eps, kind
        ctx.mark_non_differentiable(shift)
        return z, shift

    @staticmethod
    def backward(ctx: Any, grad_z: torch.Tensor, grad_shift: torch.Tensor | None) -> tuple:
        a, g, weight, mean, invstd = ctx.saved_tensors
        need_a, need_x, need_w, need_b = ctx.needs_input_grad[:4]
        grad_a = grad_w = grad_b = None
        if need_a or need_w or need_b:
            grad_g, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_z, g, weight, None, None, mean, invstd, True, ctx.eps, [need_a, need_w, need_b])
            if need_a:
                grad_a = _act_backward(grad_g, a, g, ctx.kind)
        return grad_a, grad_z if need_x else None, grad_w, grad_b, None, None, None, None, None


def _bn_momentum(bn: nn.BatchNorm2d) -> float:
    if bn.momentum is not None:
        return bn.momentum
    # momentum=None is BatchNorm's cumulative moving average.
    return 1.0 / float(bn.num_batches_tracked.item())


def fused_block_supported(block: nn.Module) -> bool:
    """The fused path covers training-mode blocks with GELU/ReLU, no stochastic depth, affine BatchNorm."""
    residual, pw, act2, bn2 = block[0], block[1], block[2], block[3]
    dw_act, bn1 = residual.fn[1], residual.fn[2]
    kind = act_kind(dw_act)
    return (
        kind is not None and act_kind(act2) == kind
        and isinstance(getattr(residual, "drop_path", nn.Identity()), nn.Identity)
        and isinstance(bn1, nn.BatchNorm2d) and bn1.training and bn1.affine
        and isinstance(bn2, nn.BatchNorm2d) and isinstance(pw, nn.Conv2d) and pw.bias is not None
        and not torch.jit.is_scripting()
    )


def fused_block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's training forward through :class:`ActBatchNormResidual`; same result as ``block(x)``."""
    residual, pw, act2, bn2 = block[0], block[1], block[2], block[3]
    dw, dw_act, bn1 = residual.fn[0], residual.fn[1], residual.fn[2]
    kind = act_kind(dw_act)
    a = dw(x)
    if bn1.track_running_stats and bn1.num_batches_tracked is not None:
        bn1.num_batches_tracked.add_(1)
    track = bn1.track_running_stats and bn1.running_mean is not None
    z, shift = ActBatchNormResidual.apply(
        a, x, bn1.weight, bn1.bias, bn1.running_mean if track else None, bn1.running_var if track else None,
        _bn_momentum(bn1) if track else 0.0, bn1.eps, kind)
    dim = pw.weight.shape[0]
    bias = torch.addmv(pw.bias, pw.weight.view(dim, -1), shift)
    return bn2(act2(F.conv2d(z, pw.weight, bias)))
