"""The seam between the model and the speed layer: what ``models/convmixer.py`` calls, and nothing else.

* :class:`BatchNorm2d`: ``nn.BatchNorm2d`` (same keys, same numbers) whose CPU training pass runs as two fused
  passes each way (``batch_norm.py``);
* :func:`depthwise_conv_for_training`: the block's depthwise convolution in training, with a fast CPU backward
  (``depthwise.py``);
* :func:`prepare_training_input`: channels_last for CPU training.

The allocator setting (``allocator.py``) is held by the BatchNorm modules of a model training on the CPU.

Each takes PyTorch's own ops wherever the kernels do not apply (eval, GPU, autocast, ``torch.compile``,
TorchScript, other dtypes, kernels not built), which compute the same values.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, register_notrace_module
from torch import nn

from .allocator import hold_while_training
from .batch_norm import BatchNormChannelsLast
from .depthwise import DepthwiseConvSame, conv_same
from .loader import load

__all__ = ["BatchNorm2d", "depthwise_conv_for_training", "kernels_apply", "prepare_training_input"]


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def kernels_apply(x: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Whether a kernel-backed autograd function applies: a CPU autograd step in float32/64, kernels loaded."""
    tensors = [x, *(p for p in params if p is not None)]
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and all(t.dtype == x.dtype and t.device == x.device for t in tensors)
        and not _autocast_on()
        and not torch.compiler.is_compiling()
        and load() is not None
    )


@register_notrace_module  # an FX leaf like nn.BatchNorm2d: its fast path depends on the input's device and dtype
class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose CPU training pass uses ``BatchNormChannelsLast``; elsewhere ``F.batch_norm``."""

    # nn.BatchNorm2d's own forward with the kernel as the batch-statistics path (TorchScript has no super()).
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        running_mean, running_var, average_factor, use_batch_stats = self.step_running_stats()
        if self.training and not torch.jit.is_scripting():
            _hold_allocator_while_training(self, x)
        if use_batch_stats and not torch.jit.is_scripting() and _batch_norm_kernel_applies(x, self.weight, self.bias):
            return BatchNormChannelsLast.apply(x, self.weight, self.bias, running_mean, running_var, average_factor,
                                               self.eps)
        return F.batch_norm(x, running_mean, running_var, self.weight, self.bias, use_batch_stats, average_factor,
                            self.eps)

    def step_running_stats(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float, bool]:
        """Count the batch and return (running_mean, running_var, average factor, use batch statistics)."""
        average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                average_factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if update_buffers else None
        running_var = self.running_var if update_buffers else None
        return running_mean, running_var, average_factor, use_batch_stats


@torch.jit.unused
def _hold_allocator_while_training(module: nn.Module, x: torch.Tensor) -> None:
    # Every BatchNorm of a CPU training step sees a full-resolution activation: the allocator setting applies
    # while a model trains on the CPU, and is undone when its modules are freed (allocator.py).
    if x.device.type == "cpu" and torch.is_grad_enabled():
        hold_while_training(module)


@torch.jit.unused
def _batch_norm_kernel_applies(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> bool:
    # More than one value per channel, else PyTorch's own error message applies.
    return (weight is not None and bias is not None and x.dim() == 4 and x.numel() > x.shape[1]
            and kernels_apply(x, weight, bias))


@register_notrace_function  # FX: the choice depends on the input's device and dtype
@torch.jit.unused
def depthwise_conv_for_training(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The training step's stride-1 depthwise convolution that keeps the grid (odd or even k)."""
    # oneDNN's depthwise backward runs at a fifth to a tenth of its forward's rate on CPU, the largest cost of a
    # CIFAR-scale training step; DepthwiseConvSame computes the same gradients with the forward convolution and
    # a compiled weight-gradient kernel.
    if kernels_apply(x, weight, bias):
        return DepthwiseConvSame.apply(x, weight, bias)
    return conv_same(x, weight, bias)


@register_notrace_function  # FX cannot branch on a traced tensor's rank or device (and skips _private names)
def prepare_training_input(x: torch.Tensor, training: bool) -> torch.Tensor:
    """channels_last for a CPU training step; eval keeps the caller's format (bit-identical to the references)."""
    # oneDNN trains the depthwise and 1x1 convolutions on channels_last input 1.1-1.3x faster, and up to 6x for
    # even kernels (benchmarks/bench.py); a channels_last input is enough, every later op keeps the format.
    if training and x.dim() == 4 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x
