"""Depthwise 'same' convolution with a fast CPU backward (weight gradient from ``convmixer_kernels.cpp``).

``convmixer_timm::depthwise_conv_same`` is a ``torch.library`` custom operator: its forward is PyTorch's own
convolution, its registered autograd formula takes the input gradient from the forward convolution with the
flipped kernel and the weight gradient from ``convmixer_timm::depthwise_weight_grad`` (oneDNN's depthwise backward
runs at a fifth to a tenth of its forward's rate on CPU). Both have fake kernels, so ``torch.compile`` keeps them
in one graph. A backward that builds a graph (``create_graph=True``) uses PyTorch's differentiable
``convolution_backward`` instead, so double backward gives PyTorch's results.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .loader import load

__all__ = ["conv_same", "depthwise_conv_same", "depthwise_weight_grad"]


def conv_same(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Stride-1 depthwise convolution that keeps the grid, with PyTorch's own autograd."""
    k = weight.shape[-1]
    out = F.conv2d(x, weight, bias, 1, k // 2, 1, x.shape[1])
    if k % 2 == 0:
        # Symmetric k//2 padding makes one extra row and column; dropping the first ones leaves (k-1)//2 before
        # and k//2 after, as timm's built-in pads. PyTorch's padding="same" computes the same but warns on every
        # call that it copies the input; an F.pad copy measured slower than this view.
        out = out[:, :, 1:, 1:]
    return out


@torch.library.custom_op("convmixer_timm::depthwise_weight_grad", mutates_args=(), device_types="cpu")
def depthwise_weight_grad(grad_out: Tensor, x: Tensor, kernel_size: int, pad: int) -> Tensor:
    """Weight gradient (C, 1, k, k) of a stride-1 'same' depthwise convolution.

    ``pad`` is the zero padding before the first row and column (k // 2 for odd k, (k - 1) // 2 for even k).
    """
    library = load()
    if library is None:
        raise RuntimeError("convmixer_timm kernels are not available; see convmixer_timm.speed.kernel_info()")
    if x.dtype not in (torch.float32, torch.float64) or grad_out.dtype != x.dtype:
        raise TypeError(f"depthwise_weight_grad needs float32 or float64 tensors, got {x.dtype}, {grad_out.dtype}")
    if x.shape != grad_out.shape or x.dim() != 4:
        raise ValueError(f"depthwise_weight_grad needs equal 4-d CPU tensors, got {list(x.shape)} and "
                         f"{list(grad_out.shape)}")
    batch, channels, height, width = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    sums = torch.empty(kernel_size, kernel_size, channels, dtype=x.dtype)
    fn = library.depthwise_weight_grad_f32 if x.dtype == torch.float32 else library.depthwise_weight_grad_f64
    fn(grad_out.data_ptr(), x.data_ptr(), sums.data_ptr(), batch, height, width, channels, kernel_size, pad,
       torch.get_num_threads())
    return sums.permute(2, 0, 1).unsqueeze(1).contiguous()


@depthwise_weight_grad.register_fake
def _(grad_out: Tensor, x: Tensor, kernel_size: int, pad: int) -> Tensor:
    return x.new_empty(x.shape[1], 1, kernel_size, kernel_size)


@torch.library.custom_op("convmixer_timm::depthwise_conv_same", mutates_args=(), device_types="cpu")
def depthwise_conv_same(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """:func:`conv_same` with the fast CPU backward; the output is channels_last (the training layout)."""
    return conv_same(x, weight, bias).contiguous(memory_format=torch.channels_last)


@depthwise_conv_same.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _differentiable_backward(ctx, grad_out: Tensor, x: Tensor, weight: Tensor):
    k, channels = weight.shape[-1], x.shape[1]
    if k % 2 == 0:  # the forward dropped the first row and column of the symmetric-padded output
        grad_out = F.pad(grad_out, (1, 0, 1, 0))
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    return torch.ops.aten.convolution_backward(grad_out, x, weight, [channels] if ctx.has_bias else None, [1, 1],
                                               [k // 2, k // 2], [1, 1], False, [0, 0], channels, mask)


def _backward(ctx, grad_out: Tensor):
    x, weight = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: PyTorch's own differentiable formula
        grad_input, grad_weight, grad_bias = _differentiable_backward(ctx, grad_out, x, weight)
        return grad_input, grad_weight, grad_bias if ctx.has_bias else None
    k = weight.shape[-1]
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = F.conv2d(grad_out, weight.flip(2, 3), None, 1, k // 2, 1, x.shape[1])
        if k % 2 == 0:  # mirrored padding is k//2 before, k//2 - 1 after: drop the extra last row and column
            grad_input = grad_input[:, :, : x.shape[2], : x.shape[3]].contiguous(memory_format=torch.channels_last)
    if ctx.needs_input_grad[1]:
        grad_weight = depthwise_weight_grad(grad_out, x, k, (k - 1) // 2)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_out.sum((0, 2, 3))
    return grad_input, grad_weight, grad_bias


depthwise_conv_same.register_autograd(_backward, setup_context=_setup_context)
