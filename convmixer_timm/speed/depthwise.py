"""Depthwise 'same' convolution with a fast CPU backward (weight gradient from ``convmixer_kernels.cpp``).

``convmixer_timm::depthwise_conv_same`` is a ``torch.library`` custom operator: its forward is the convolution,
its registered autograd formula takes the input gradient from the forward convolution with the flipped kernel and
the weight gradient from ``convmixer_timm::depthwise_weight_grad`` (oneDNN's depthwise backward runs at a fifth to
a tenth of its forward's rate on CPU). In float32 both convolutions are ``convmixer_timm::depthwise_conv``, the
kernels' own (``depthwise_conv_f32``, the spatial-mixing kernel without its residual) writing into the training
step's reused buffers (``buffers.py``); in float64 both are PyTorch's. All have fake kernels, so
``torch.compile`` keeps them in one graph. A backward that builds a graph (``create_graph=True``) uses PyTorch's
differentiable ``convolution_backward`` instead, so double backward gives PyTorch's results.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import (
    check_4d,
    check_cpu,
    check_kernel,
    check_same_shape,
    check_tensors,
    check_vector,
    dense,
    kernel_threads,
    like_parameter,
    require_kernels,
    ring_scratch_bytes,
)
from .buffers import empty_channels_last
from .loader import load

__all__ = ["conv_same", "crop_to_same", "depthwise_conv", "depthwise_conv_same", "depthwise_weight_grad"]

_DTYPES = (torch.float32, torch.float64)
_WEIGHT_GRAD, _CONV, _PADDED_CONV = "depthwise_weight_grad", "depthwise_conv_same", "depthwise_conv"


def crop_to_same(out: Tensor, kernel_size: int) -> Tensor:
    """The output of a stride-1 convolution padded k//2 on every side, cut to "same" padding.

    For even k the symmetric padding makes one extra row and column; dropping the first ones leaves (k-1)//2
    before and k//2 after, as timm's built-in pads. PyTorch's padding="same" computes the same but warns on every
    call that it copies the input, and an F.pad copy is slower than this view.
    """
    return out[:, :, 1:, 1:] if kernel_size % 2 == 0 else out


def conv_same(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Stride-1 depthwise convolution that keeps the grid, with PyTorch's own autograd."""
    k = weight.shape[-1]
    return crop_to_same(F.conv2d(x, weight, bias, 1, k // 2, 1, x.shape[1]), k)


def _check_weight_grad(grad_out: Tensor, x: Tensor, kernel_size: int, pad: int) -> None:
    check_tensors(_WEIGHT_GRAD, {"grad_out": grad_out, "x": x}, _DTYPES)
    check_4d(_WEIGHT_GRAD, "x", x)
    check_same_shape(_WEIGHT_GRAD, "grad_out", grad_out, "x", x)
    check_kernel(_WEIGHT_GRAD, kernel_size, pad)


@torch.library.custom_op("convmixer_timm::depthwise_weight_grad", mutates_args=(), device_types="cpu")
def depthwise_weight_grad(grad_out: Tensor, x: Tensor, kernel_size: int, pad: int) -> Tensor:
    """Weight gradient (C, 1, k, k) of a stride-1 'same' depthwise convolution.

    ``pad`` is the zero padding before the first row and column (k // 2 for odd k, (k - 1) // 2 for even k).
    """
    _check_weight_grad(grad_out, x, kernel_size, pad)
    check_cpu(_WEIGHT_GRAD, x)
    library = require_kernels(load())
    batch, channels, height, width = x.shape
    if x.numel() == 0:  # a sum over no pixels
        return x.new_zeros(channels, 1, kernel_size, kernel_size)
    x = dense(x, torch.channels_last)
    grad_out = dense(grad_out, torch.channels_last)
    sums = x.new_empty(kernel_size, kernel_size, channels)
    # Each thread sums into a k x k x C buffer of its own and pads one input row (weight_grad, band).
    scratch = (kernel_size * kernel_size + width + kernel_size) * channels * x.element_size() + 64
    fn = library.depthwise_weight_grad_f32 if x.dtype == torch.float32 else library.depthwise_weight_grad_f64
    fn(grad_out.data_ptr(), x.data_ptr(), sums.data_ptr(), batch, height, width, channels, kernel_size, pad,
       kernel_threads(batch * height, scratch, x, grad_out))
    return sums.permute(2, 0, 1).unsqueeze(1).contiguous()


@depthwise_weight_grad.register_fake
def _(grad_out: Tensor, x: Tensor, kernel_size: int, pad: int) -> Tensor:
    _check_weight_grad(grad_out, x, kernel_size, pad)
    return x.new_empty(x.shape[1], 1, kernel_size, kernel_size)


def _check_conv(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], pad: Optional[int] = None) -> None:
    check_tensors(op, {"x": x, "weight": weight, "bias": bias}, _DTYPES)
    check_4d(op, "x", x)
    channels = x.shape[1]
    if weight.dim() != 4 or tuple(weight.shape) != (channels, 1, weight.shape[-1], weight.shape[-1]):
        raise ValueError(f"{op}: weight must be (C, 1, k, k) = ({channels}, 1, k, k), one square kernel per "
                         f"channel of x, got shape {list(weight.shape)}")
    k = weight.shape[-1]
    check_kernel(op, k, (k - 1) // 2 if pad is None else pad)
    if bias is not None:
        check_vector(op, "bias", bias, channels)


@torch.library.custom_op("convmixer_timm::depthwise_conv", mutates_args=(), device_types="cpu")
def depthwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], pad: int) -> Tensor:
    """Stride-1 depthwise convolution that keeps the grid, ``pad`` zeros before and ``k - 1 - pad`` after each row
    and column; channels_last out. float32 runs the kernels' own convolution (the spatial-mixing kernel without its
    residual) into the training step's reused buffers (``buffers.py``); float64, or float32 without the kernels,
    PyTorch's. No autograd formula: it computes :func:`depthwise_conv_same`'s input gradient, in its backward."""
    _check_conv(_PADDED_CONV, x, weight, bias, pad)
    check_cpu(_PADDED_CONV, x)
    k = weight.shape[-1]
    library = load()
    if x.dtype == torch.float64 or library is None:
        if pad == (k - 1) // 2:  # "same" padding: PyTorch's convolution pads itself, no copy of x
            return conv_same(x, weight, bias).contiguous(memory_format=torch.channels_last)
        padded = F.pad(x, (pad, k - 1 - pad, pad, k - 1 - pad))
        return F.conv2d(padded, weight, bias, groups=x.shape[1]).contiguous(memory_format=torch.channels_last)
    batch, channels, height, width = x.shape
    out = empty_channels_last(x)
    if x.numel() == 0:
        return out
    x = dense(x, torch.channels_last)
    weight_kkc = weight[:, 0].permute(1, 2, 0).contiguous()
    bias = x.new_zeros(channels) if bias is None else dense(bias)
    library.depthwise_conv_f32(x.data_ptr(), weight_kkc.data_ptr(), bias.data_ptr(), out.data_ptr(), batch, height,
                               width, channels, k, pad,
                               kernel_threads(batch * height, ring_scratch_bytes(x, k), x, weight_kkc))
    return out


@depthwise_conv.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], pad: int) -> Tensor:
    _check_conv(_PADDED_CONV, x, weight, bias, pad)
    return torch.empty_like(x, memory_format=torch.channels_last)


@torch.library.custom_op("convmixer_timm::depthwise_conv_same", mutates_args=(), device_types="cpu")
def depthwise_conv_same(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """:func:`conv_same` with the fast CPU backward; the output is channels_last (the training layout)."""
    _check_conv(_CONV, x, weight, bias)
    check_cpu(_CONV, x)
    return depthwise_conv(x, weight, bias, (weight.shape[-1] - 1) // 2)


@depthwise_conv_same.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    _check_conv(_CONV, x, weight, bias)
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
    if ctx.needs_input_grad[0]:  # the mirrored padding: k // 2 before, k - 1 - k // 2 after
        grad_input = depthwise_conv(grad_out, weight.flip(2, 3), None, k // 2)
    if ctx.needs_input_grad[1]:
        grad_weight = like_parameter(depthwise_weight_grad(grad_out, x, k, (k - 1) // 2), weight)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad_out.sum((0, 2, 3))
    return grad_input, grad_weight, grad_bias


depthwise_conv_same.register_autograd(_backward, setup_context=_setup_context)
