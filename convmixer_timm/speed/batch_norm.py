"""BatchNorm in training, forward and backward in two passes each over channels_last tensors, as PyTorch operators.

ConvMixer keeps the full grid in every layer, so each BatchNorm of a training step reads and writes tensors far
larger than the caches, and PyTorch's CPU BatchNorm makes more passes over them (its backward measured 25 ms on
a 32 MiB activation in a CIFAR training step, where ``convmixer_kernels.cpp`` takes 7).

``convmixer_timm::batch_norm_train`` and its backward are ``torch.library`` custom operators with fake (meta)
kernels and a registered autograd formula, so ``torch.compile`` (``fullgraph=True``), ``torch.export`` and the
autograd engine see ordinary operators. A backward that builds a graph (``create_graph=True``: double backward,
gradient penalties) uses PyTorch's own differentiable ``native_batch_norm_backward`` with the same statistics.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._checks import (
    check_4d,
    check_cpu,
    check_same_shape,
    check_tensors,
    check_vector,
    dense,
    kernel_threads,
    require_kernels,
)
from .buffers import empty_channels_last
from .loader import load

__all__ = ["backward_on_kernels", "batch_norm_train", "batch_norm_train_backward", "batch_norm_training_with_kernels",
           "check_backward", "check_forward", "fake_backward", "fake_forward", "forward_on_kernels",
           "update_running_stats"]

_DTYPES = (torch.float32, torch.float64)
_FORWARD, _BACKWARD = "batch_norm_train", "batch_norm_train_backward"


def check_forward(op: str, x: Tensor, weight: Tensor, bias: Tensor, input_name: str = "x") -> None:
    """What a training BatchNorm forward (``op``) checks before a pointer reaches C++: shared with the fused
    activation-BatchNorm operator, whose input is named ``a``."""
    check_tensors(op, {input_name: x, "weight": weight, "bias": bias}, _DTYPES)
    check_4d(op, input_name, x)
    for name, vector in (("weight", weight), ("bias", bias)):
        check_vector(op, name, vector, x.shape[1])
    # F.batch_norm's check and message for one value per channel. An empty batch, which F.batch_norm returns
    # untouched, is refused too (the layers send it, and a single value, to F.batch_norm instead).
    if x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")


def check_backward(op: str, grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor,
                   input_name: str = "x") -> None:
    """What a training BatchNorm backward (``op``) checks before a pointer reaches C++ (see :func:`check_forward`)."""
    check_tensors(op, {"grad_y": grad_y, input_name: x, "mean": mean, "invstd": invstd, "weight": weight}, _DTYPES)
    check_4d(op, input_name, x)
    check_same_shape(op, "grad_y", grad_y, input_name, x)
    for name, vector in (("mean", mean), ("invstd", invstd), ("weight", weight)):
        check_vector(op, name, vector, x.shape[1])


def _channel_sums_scratch(channels: int) -> int:
    return 2 * 8 * channels  # two double sums per channel and thread (channel_sums in kernels_body.inc)


def forward_on_kernels(op: str, kernel: str, leading: Sequence[int], x: Tensor, weight: Tensor, bias: Tensor,
                       eps: float, scratch_bytes: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """A training BatchNorm forward (``op``, checked) on the kernel ``kernel`` (``leading``: its arguments before
    the pointers); shared with the fused activation-BatchNorm operator."""
    check_cpu(op, x)
    library = require_kernels(load())
    x = dense(x, torch.channels_last)
    batch, channels, height, width = x.shape
    rows = batch * height * width
    y = empty_channels_last(x)
    mean, invstd, variance = (x.new_empty(channels) for _ in range(3))
    if channels == 0:
        return y, mean, invstd, variance
    weight, bias = dense(weight), dense(bias)
    fn = getattr(library, f"{kernel}_{'f32' if x.dtype == torch.float32 else 'f64'}")
    fn(*leading, x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), mean.data_ptr(), invstd.data_ptr(),
       variance.data_ptr(), rows, channels, float(eps), kernel_threads(rows, scratch_bytes, x))
    return y, mean, invstd, variance


def backward_on_kernels(op: str, kernel: str, leading: Sequence[int], grad_y: Tensor, x: Tensor, mean: Tensor,
                        invstd: Tensor, weight: Tensor, scratch_bytes: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward of :func:`forward_on_kernels` (``op``, checked): (grad_x, grad_weight, grad_bias)."""
    check_cpu(op, x)
    library = require_kernels(load())
    x = dense(x, torch.channels_last)
    batch, channels, height, width = x.shape
    rows = batch * height * width
    grad_x = empty_channels_last(x)
    if rows == 0 or channels == 0:  # sums over nothing (PyTorch's own backward divides by zero here)
        return grad_x, x.new_zeros(channels), x.new_zeros(channels)
    grad_y = dense(grad_y, torch.channels_last)
    grad_weight, grad_bias = x.new_empty(channels), x.new_empty(channels)
    mean, invstd, weight = dense(mean), dense(invstd), dense(weight)
    fn = getattr(library, f"{kernel}_{'f32' if x.dtype == torch.float32 else 'f64'}")
    fn(*leading, grad_y.data_ptr(), x.data_ptr(), mean.data_ptr(), invstd.data_ptr(), weight.data_ptr(),
       grad_x.data_ptr(), grad_weight.data_ptr(), grad_bias.data_ptr(), rows, channels,
       kernel_threads(rows, scratch_bytes, x, grad_y))
    return grad_x, grad_weight, grad_bias


def fake_forward(x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """What :func:`forward_on_kernels` returns for ``x``, without computing it (the operators' fake kernels)."""
    return torch.empty_like(x, memory_format=torch.channels_last), *(x.new_empty(x.shape[1]) for _ in range(3))


def fake_backward(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """What :func:`backward_on_kernels` returns for ``x``, without computing it."""
    return torch.empty_like(x, memory_format=torch.channels_last), x.new_empty(x.shape[1]), x.new_empty(x.shape[1])


@torch.library.custom_op("convmixer_timm::batch_norm_train", mutates_args=(), device_types="cpu")
def batch_norm_train(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``F.batch_norm(x, training=True)`` with affine parameters: (y, mean, invstd, biased variance)."""
    check_forward(_FORWARD, x, weight, bias)
    return forward_on_kernels(_FORWARD, "batch_norm_forward", (), x, weight, bias, eps,
                              _channel_sums_scratch(x.shape[1]))


@batch_norm_train.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    check_forward(_FORWARD, x, weight, bias)
    return fake_forward(x)


@torch.library.custom_op("convmixer_timm::batch_norm_train_backward", mutates_args=(), device_types="cpu")
def batch_norm_train_backward(grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                              weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias) of :func:`batch_norm_train`."""
    check_backward(_BACKWARD, grad_y, x, mean, invstd, weight)
    return backward_on_kernels(_BACKWARD, "batch_norm_backward", (), grad_y, x, mean, invstd, weight,
                               _channel_sums_scratch(x.shape[1]))


@batch_norm_train_backward.register_fake
def _(grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    check_backward(_BACKWARD, grad_y, x, mean, invstd, weight)
    return fake_backward(x)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, eps = inputs
    _, mean, invstd, variance = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, invstd, variance)  # statistics feed only the no-grad running averages


def _backward(ctx, grad_y: Tensor, _grad_mean, _grad_invstd, _grad_variance):
    x, weight, mean, invstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: PyTorch's differentiable formula, so double backward and gradient penalties work.
        grads = torch.ops.aten.native_batch_norm_backward(grad_y, x, weight, None, None, mean, invstd, True,
                                                          ctx.eps, list(ctx.needs_input_grad[:3]))
    else:
        grads = batch_norm_train_backward(grad_y, x, mean, invstd, weight)
    return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[:3], strict=True)), None)


batch_norm_train.register_autograd(_backward, setup_context=_setup_context)


def batch_norm_training_with_kernels(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Optional[Tensor],
                                     running_var: Optional[Tensor], momentum: float, eps: float) -> Tensor:
    """``F.batch_norm(..., training=True)`` on the kernels; running statistics (either may be None) are updated
    in place as PyTorch does: unbiased variance, weighted by ``momentum``."""
    y, mean, _, variance = batch_norm_train(x, weight, bias, eps)
    update_running_stats(mean, variance, x.shape[0] * x.shape[2] * x.shape[3], running_mean, running_var, momentum)
    return y


def update_running_stats(mean: Tensor, variance: Tensor, rows: int, running_mean: Optional[Tensor],
                         running_var: Optional[Tensor], momentum: float) -> None:
    """PyTorch's running-average update from a training batch's mean and biased variance over ``rows`` values."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = variance * (rows / (rows - 1))
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
