"""BatchNorm in training, forward and backward in two passes each over channels_last tensors.

ConvMixer keeps the full grid in every layer, so each BatchNorm of a training step reads and writes tensors far
larger than the caches, and PyTorch's CPU BatchNorm makes more passes over them (its backward measured 25 ms on
a 32 MiB activation in a CIFAR training step, where ``convmixer_kernels.cpp`` takes 7).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .loader import load

__all__ = ["BatchNormChannelsLast"]


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    x = x.contiguous(memory_format=torch.channels_last)
    channels = x.shape[1]
    return x, x.numel() // channels, channels


class BatchNormChannelsLast(torch.autograd.Function):
    """``F.batch_norm(x, training=True)`` with affine parameters.

    Running statistics (either may be None) are updated in place as PyTorch does: unbiased variance, weighted
    by ``momentum``. Tested against ``F.batch_norm`` with ``torch.autograd.gradcheck`` in float64.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor | None,
                running_var: torch.Tensor | None, momentum: float, eps: float) -> torch.Tensor:
        library = load()
        x, rows, channels = _rows(x)
        if rows < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
        y = torch.empty_like(x, memory_format=torch.channels_last)
        mean, invstd, variance = (torch.empty(channels, dtype=x.dtype) for _ in range(3))
        weight_c, bias_c = weight.contiguous(), bias.contiguous()
        fn = library.batch_norm_forward_f32 if x.dtype == torch.float32 else library.batch_norm_forward_f64
        fn(x.data_ptr(), weight_c.data_ptr(), bias_c.data_ptr(), y.data_ptr(), mean.data_ptr(),
           invstd.data_ptr(), variance.data_ptr(), rows, channels, float(eps), torch.get_num_threads())
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                unbiased = variance * (rows / (rows - 1))
                running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        ctx.save_for_backward(x, weight_c, mean, invstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        library = load()
        grad_y, rows, channels = _rows(grad_y)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last) if ctx.needs_input_grad[0] else None
        grad_weight, grad_bias = torch.empty(channels, dtype=x.dtype), torch.empty(channels, dtype=x.dtype)
        fn = library.batch_norm_backward_f32 if x.dtype == torch.float32 else library.batch_norm_backward_f64
        fn(grad_y.data_ptr(), x.data_ptr(), mean.data_ptr(), invstd.data_ptr(), weight.data_ptr(),
           grad_x.data_ptr() if grad_x is not None else None, grad_weight.data_ptr(), grad_bias.data_ptr(),
           rows, channels, torch.get_num_threads())
        return (grad_x, grad_weight if ctx.needs_input_grad[1] else None,
                grad_bias if ctx.needs_input_grad[2] else None, None, None, None, None)
