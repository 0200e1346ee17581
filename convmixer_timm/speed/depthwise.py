"""Depthwise 'same' convolution with a fast CPU backward (weight gradient from ``convmixer_kernels.cpp``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .loader import load

__all__ = ["DepthwiseConvSame", "conv_same", "depthwise_weight_grad"]


def depthwise_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, kernel_size: int, pad: int) -> torch.Tensor:
    """Weight gradient (C, 1, k, k) of a stride-1 'same' depthwise convolution from channels_last NCHW tensors.

    ``pad`` is the zero padding before the first row and column (k // 2 for odd k, (k - 1) // 2 for even k).
    """
    library = load()
    if library is None:
        raise RuntimeError("convmixer_timm kernels are not available; see convmixer_timm.speed.kernel_info()")
    if x.dtype not in (torch.float32, torch.float64) or grad_out.dtype != x.dtype:
        raise TypeError(f"depthwise_weight_grad needs float32 or float64 tensors, got {x.dtype}, {grad_out.dtype}")
    if x.device.type != "cpu" or x.shape != grad_out.shape or x.dim() != 4:
        raise ValueError(f"depthwise_weight_grad needs equal 4-d CPU tensors, got {list(x.shape)} and "
                         f"{list(grad_out.shape)} on {x.device}")
    batch, channels, height, width = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    sums = torch.empty(kernel_size, kernel_size, channels, dtype=x.dtype)
    fn = library.depthwise_weight_grad_f32 if x.dtype == torch.float32 else library.depthwise_weight_grad_f64
    fn(grad_out.data_ptr(), x.data_ptr(), sums.data_ptr(), batch, height, width, channels, kernel_size, pad,
       torch.get_num_threads())
    return sums.permute(2, 0, 1).unsqueeze(1).contiguous()


def conv_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Stride-1 depthwise convolution that keeps the grid, with PyTorch's own autograd."""
    k = weight.shape[-1]
    out = F.conv2d(x, weight, bias, 1, k // 2, 1, x.shape[1])
    if k % 2 == 0:
        # Symmetric k//2 padding makes one extra row and column; dropping the first ones leaves (k-1)//2 before
        # and k//2 after, as timm's built-in pads. PyTorch's padding="same" computes the same but warns on every
        # call that it copies the input; an F.pad copy measured slower than this view.
        out = out[:, :, 1:, 1:]
    return out


class DepthwiseConvSame(torch.autograd.Function):
    """Stride-1 'same' depthwise convolution whose backward avoids oneDNN's slow depthwise backward on CPU.

    Forward is PyTorch's own convolution. Backward: the input gradient is the forward convolution of grad_out
    with the flipped kernel (padding mirrored), the weight gradient comes from ``depthwise_weight_grad`` and
    the bias gradient is a sum. Tested against autograd on the plain op with ``torch.autograd.gradcheck``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return conv_same(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        k = weight.shape[-1]
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(2, 3)
            grad_input = F.conv2d(grad_out, flipped, None, 1, k // 2, 1, x.shape[1])
            if k % 2 == 0:  # mirrored padding is k//2 before, k//2 - 1 after: drop the extra last row and column
                grad_input = grad_input[:, :, : x.shape[2], : x.shape[3]].contiguous(memory_format=torch.channels_last)
        if ctx.needs_input_grad[1]:
            grad_weight = depthwise_weight_grad(grad_out, x, k, (k - 1) // 2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias
