"""The 1x1 (pointwise) convolution of a CPU training step as matrix products into the step's reused buffers.

On a channels_last tensor a 1x1 convolution is one matrix product, (N*H*W, C_in) x (C_in, C_out), and its
backward two more; PyTorch's BLAS computes them as fast as oneDNN's convolution does (within a few percent either
way). What differs is where the results go: ``torch.addmm(..., out=)`` writes into a buffer from ``buffers.py``
where oneDNN's convolution maps a fresh tensor, and fault its pages in, at every call.

``convmixer_timm::pointwise_conv`` is a ``torch.library`` custom operator with a fake kernel and a registered
autograd formula; a backward that builds a graph (``create_graph=True``) uses the same products as differentiable
ops.
"""

from typing import Optional

import torch
from torch import Tensor

from ._checks import check_4d, check_cpu, check_tensors, check_vector, dense, like_parameter
from .buffers import empty_channels_last

__all__ = ["pointwise_conv"]

_OP = "pointwise_conv"
_DTYPES = (torch.float32, torch.float64)


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    check_tensors(_OP, {"x": x, "weight": weight, "bias": bias}, _DTYPES)
    check_4d(_OP, "x", x)
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 1, 1):
        raise ValueError(f"{_OP}: weight must be (C_out, {x.shape[1]}, 1, 1), a 1x1 kernel over every channel of x, "
                         f"got shape {list(weight.shape)}")
    if bias is not None:
        check_vector(_OP, "bias", bias, weight.shape[0])


def _rows(t: Tensor) -> Tensor:
    """A channels_last (N, C, H, W) tensor as its (N*H*W, C) matrix, a view."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0] * t.shape[2] * t.shape[3], t.shape[1])


@torch.library.custom_op("convmixer_timm::pointwise_conv", mutates_args=(), device_types="cpu")
def pointwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a (C_out, C_in, 1, 1) ``weight``; the output is channels_last."""
    _check(x, weight, bias)
    check_cpu(_OP, x)
    out = empty_channels_last(x, (x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))
    matrix = weight.reshape(weight.shape[0], weight.shape[1]).t()
    if bias is None:
        torch.mm(_rows(dense(x, torch.channels_last)), matrix, out=_rows(out))
    else:
        torch.addmm(bias, _rows(dense(x, torch.channels_last)), matrix, out=_rows(out))
    return out


@pointwise_conv.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    _check(x, weight, bias)
    return torch.empty(x.shape[0], weight.shape[0], x.shape[2], x.shape[3], dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out: Tensor):
    x, weight = ctx.saved_tensors
    grad_rows = _rows(grad_out.contiguous(memory_format=torch.channels_last))
    matrix = weight.reshape(weight.shape[0], weight.shape[1])
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops
            grad_input = (grad_rows @ matrix).view(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)
        else:
            grad_input = empty_channels_last(x)
            torch.mm(grad_rows, matrix, out=_rows(grad_input))
    if ctx.needs_input_grad[1]:
        # The product may come back transposed; either way, the gradient takes the weight's strides.
        grad_weight = like_parameter((grad_rows.t() @ _rows(dense(x, torch.channels_last))).reshape(weight.shape),
                                     weight)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_rows.sum(0)
    return grad_input, grad_weight, grad_bias


pointwise_conv.register_autograd(_backward, setup_context=_setup_context)
