"""The seam between the model and the speed layer: what ``models/convmixer.py`` calls, and nothing else.

* :class:`BatchNorm2d`: ``nn.BatchNorm2d`` (same keys, same numbers) whose CPU training pass runs as two fused
  passes each way (``batch_norm.py``);
* :func:`run_layers`: a stack of layers called in turn, where each ReLU/GELU module followed by a
  :class:`BatchNorm2d` runs as one operator in a CPU training step (``act_batch_norm.py``): the activation's output
  is never stored, so a step allocates, faults in and holds fewer full-size tensors; a large 1x1 ``nn.Conv2d`` runs
  as one matrix product into the step's reused buffers (``pointwise.py``, ``buffers.py``);
* :func:`depthwise_conv_for_training`: the block's depthwise convolution in training, with a fast CPU backward
  (``depthwise.py``);
* :func:`layout_for_cpu_training`: channels_last for CPU training, and :func:`match_memory_format` to hand the
  caller's format back;
* :class:`DeferredInference`: what ``create_model(..., inference_precision=...)`` returns for timm's validate.py and
  benchmark.py (``deferred.py``).

The kernels are ``torch.library`` operators, so ``torch.compile`` and ``torch.export`` see ordinary operators.
They apply to a CPU autograd step in float32/64; elsewhere (eval, GPU, autocast, TorchScript, ``torch.jit.trace``,
``torch.export``, ``torch.func`` transforms, kernels not built) PyTorch's own ops compute the same values. The
functions that branch on a tensor's device, dtype or rank are ``torch.fx.wrap``-ped, so FX keeps them as single
calls. Where the user asks for it (``CONVMIXER_TIMM_TUNE_MALLOC=1``), the allocator setting (``allocator.py``) is
held by the BatchNorm modules of a model training eagerly on the CPU, never inside a compiled or traced region.

This module imports no timm: the models register with timm when timm is imported, and that registration imports
this module, so it must not be waiting on timm itself.
"""

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from ..activations import activation_name
from .act_batch_norm import ACT_BATCH_NORM_ACTIVATIONS, act_batch_norm_training_with_kernels
from .allocator import hold_while_training
from .batch_norm import batch_norm_training_with_kernels
from .buffers import hold as hold_training_buffers
from .buffers import release_if_idle
from .deferred import DeferredInference
from .depthwise import conv_same, depthwise_conv_same
from .loader import load
from .pointwise import pointwise_conv

__all__ = ["BatchNorm2d", "DeferredInference", "act_batch_norm_2d", "add_in_place_pays", "conv_same",
           "depthwise_conv_for_training", "fused_activation", "has_hooks", "kernels_apply", "layout_for_cpu_training",
           "match_memory_format", "run_layers"]


@torch.compiler.assume_constant_result  # checked once, outside any traced graph (the loader takes a lock)
def kernels_loaded() -> bool:
    return load() is not None


def _tracing_or_exporting() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.jit.is_tracing() or (exporting is not None and exporting())


@torch.jit.unused
def _in_functorch_transform(tensors: List[torch.Tensor]) -> bool:
    # torch.func transforms support neither autograd-registered custom operators nor memory formats under vmap;
    # PyTorch's ops in the caller's layout are exact there. (Dynamo traces through transforms itself.)
    if torch.compiler.is_compiling():
        return False
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


@torch.jit.unused
def _has_tangent(tensors: List[torch.Tensor]) -> bool:
    # Forward-mode AD (torch.autograd.forward_ad) outside torch.func: the operators register no jvp.
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def kernels_apply(x: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Whether the kernel-backed operators apply: a CPU autograd step in float32/64 on a channels_last input (the
    training layout, see :func:`layout_for_cpu_training`), parameters with one entry per channel of ``x`` along
    their first dimension, and the kernels loaded. Anything else, a channel mismatch included, goes to PyTorch's
    own ops, which raise their own errors for it."""
    tensors = [x, *(p for p in params if p is not None)]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and all(t.dtype == x.dtype and t.device == x.device for t in tensors)
            and all(t.dim() >= 1 and t.shape[0] == x.shape[1] for t in tensors[1:])):
        return False
    if torch.is_autocast_enabled("cpu") or _tracing_or_exporting():
        return False
    if _in_functorch_transform(tensors) or _has_tangent(tensors):
        return False
    return kernels_loaded()


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose CPU training pass uses the BatchNorm kernels; elsewhere ``F.batch_norm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript: nn.BatchNorm2d's own computation
            self._check_input_dim(x)
            running_mean, running_var, average_factor, use_batch_stats = self.step_running_stats()
            return F.batch_norm(x, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                                average_factor, self.eps)
        return batch_norm_2d(self, x)

    def train(self, mode: bool = True) -> "BatchNorm2d":
        super().train(mode)
        if not mode:  # the training step's reused buffers go back to the system once no model trains
            release_if_idle()
        return self

    def step_running_stats(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float, bool]:
        """Count the batch and return (running_mean, running_var, average factor, use batch statistics).

        A training forward that activation checkpointing recomputes during backward counts nothing and gets
        copies of the running statistics to update: the step already counted when it first ran, so the buffers
        change once per step, as without checkpointing. The copies keep the recomputation's operators (and what
        they save for backward, which non-reentrant checkpointing compares) those of the first run.
        """
        recomputing = False
        if not torch.jit.is_scripting():
            recomputing = self.training and _recomputing_in_backward()
        average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            if not recomputing:
                self.num_batches_tracked.add_(1)
            if self.momentum is None:
                average_factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if update_buffers else None
        running_var = self.running_var if update_buffers else None
        if recomputing:
            running_mean = None if running_mean is None else running_mean.clone()
            running_var = None if running_var is None else running_var.clone()
        return running_mean, running_var, average_factor, use_batch_stats


@torch.jit.unused
def _recomputing_in_backward() -> bool:
    """Whether this forward runs inside a backward pass: that is where ``torch.utils.checkpoint`` recomputes a
    checkpointed forward, reentrant or not (timm's ``checkpoint_seq``, ``--grad-checkpointing``, FSDP's wrapper).

    PyTorch offers no public signal for it (pytorch/pytorch#96136); the autograd engine's current graph task is
    -1 outside a backward pass. A compiled graph needs no check: it records each buffer update once, in its
    forward, and its backward recomputes values only.
    """
    if torch.compiler.is_compiling():
        return False
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


@torch.jit.unused
def batch_norm_2d(bn: BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)``; one FX node that reads ``bn.training`` when it runs, like the call of a leaf module."""
    bn._check_input_dim(x)
    if bn.training:
        _hold_allocator_while_training(bn, x)
    running_mean, running_var, average_factor, use_batch_stats = bn.step_running_stats()
    # More than one value per channel, else PyTorch's own error message applies.
    if (use_batch_stats and bn.weight is not None and bn.bias is not None and x.numel() > x.shape[1]
            and kernels_apply(x, bn.weight, bn.bias)):
        return batch_norm_training_with_kernels(x, bn.weight, bn.bias, running_mean, running_var, average_factor,
                                                bn.eps)
    return F.batch_norm(x, running_mean, running_var, bn.weight, bn.bias, use_batch_stats, average_factor, bn.eps)


def _hold_allocator_while_training(module: nn.Module, x: torch.Tensor) -> None:
    # Every BatchNorm of a CPU training step sees a full-resolution activation: the allocator setting applies
    # while a model trains eagerly on the CPU, and is undone when its modules are freed (allocator.py). Compiled
    # and traced code never enters it: it is process state, not part of the computation.
    if torch.compiler.is_compiling() or _tracing_or_exporting():
        return
    if x.device.type == "cpu" and torch.is_grad_enabled():
        hold_training_buffers(module)
        hold_while_training(module)


@torch.jit.unused
def depthwise_conv_for_training(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The training step's stride-1 depthwise convolution that keeps the grid (odd or even k)."""
    # oneDNN's depthwise backward runs at a fifth to a tenth of its forward's rate on CPU, the largest cost of a
    # CIFAR-scale training step; depthwise_conv_same computes the same gradients with the forward convolution
    # and a compiled weight-gradient kernel.
    if kernels_apply(x, weight, bias):
        return depthwise_conv_same(x, weight, bias)
    return conv_same(x, weight, bias)


@torch.jit.unused
def layout_for_cpu_training(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """channels_last while ``module`` trains on the CPU; otherwise ``x`` as it is.

    Eager and compiled training run channels_last inside. A graph traced by FX runs in the caller's layout (this
    is not recorded in it), so every node it exposes (feature extractors) has the memory format timm's gives.
    """
    if isinstance(x, torch.fx.Proxy):
        return x
    # oneDNN trains the depthwise and 1x1 convolutions on channels_last input 1.1-1.3x faster, and up to 6x for
    # even kernels (benchmarks/bench.py), and the kernels take only channels_last (kernels_apply); a channels_last
    # input is enough, every later op keeps the format. That is float32 (and float64): in bf16, autocast or a bf16
    # model, channels_last trained 2x slower than NCHW on an AVX2 EPYC (benchmarks/training_layout_bf16.py), timm's
    # model too; no kernel applies.
    if (module.training and x.dim() == 4 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu") and not _in_functorch_transform([x])):
        x = x.contiguous(memory_format=torch.channels_last)
        if x.shape[1] == 1 and x.stride(1) != 1:
            # One channel (grey images) is channels_last and NCHW at once, and convolutions then pick NCHW: the
            # same memory viewed with channels_last strides (no copy) makes the stem's output channels_last.
            x = x.squeeze(1).unsqueeze(3).permute(0, 3, 1, 2)
    return x


def match_memory_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out`` in the memory format of the caller's input ``like``: channels_last in, channels_last out; else
    NCHW-contiguous (a no-op where ``out`` already is)."""
    if out.dim() != 4 or like.dim() != 4:
        return out
    if not torch.jit.is_scripting() and _in_functorch_transform([out, like]):
        return out  # torch.func's batched tensors have no memory format of their own
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def has_hooks(*modules: nn.Module) -> bool:
    """Whether calling any of ``modules`` would run a hook: its own, or one registered for every module."""
    hooks = torch.nn.modules.module
    if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
            or hooks._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


# glibc's malloc gives every request of 32 MiB or more (its largest dynamic mmap threshold on 64-bit) a mapping
# of its own, so each fresh tensor that large faults in all its pages, and one allocation fewer is that much less
# work. Smaller tensors come from the heap, where a freed temporary leaves a hole that later ones reuse: adding in
# place there let glibc trim and fault in the heap's top more often (benchmarks/page_faults.py, 8 and 16 MiB).
_OWN_MAPPING_BYTES = 32 << 20


def add_in_place_pays(out: torch.Tensor) -> bool:
    """Whether adding into ``out`` (the fused operator's own output) saves a fresh tensor worth saving."""
    return out.numel() * out.element_size() >= _OWN_MAPPING_BYTES


def _fx_tracing(x: object) -> bool:
    symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None)
    return isinstance(x, torch.fx.Proxy) or (symbolic_tracing is not None and symbolic_tracing())


@torch.jit.unused
def fused_activation(act: nn.Module, bn: nn.Module, x: torch.Tensor) -> Optional[str]:
    """The activation's name where ``bn(act(x))`` may run as one kernel-backed operator, else None.

    Only where that computes exactly what the two modules do and nobody could tell them apart: a CPU training step
    the kernels apply to, ``act`` exactly ReLU or exact GELU, ``bn`` exactly our :class:`BatchNorm2d` training on
    batch statistics with affine parameters, no hook on either module (nor a global one), and no FX tracing (a
    traced graph keeps both modules as nodes).
    """
    if _fx_tracing(x) or type(bn) is not BatchNorm2d or not bn.training:
        return None
    name = activation_name(act)
    if name not in ACT_BATCH_NORM_ACTIVATIONS or bn.weight is None or bn.bias is None or has_hooks(act, bn):
        return None
    # More than one value per channel, else PyTorch's own error message applies.
    if x.dim() != 4 or x.numel() <= x.shape[1] or not kernels_apply(x, bn.weight, bn.bias):
        return None
    return name


@torch.jit.unused
def act_batch_norm_2d(act_name: str, bn: BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(act(x))`` as one operator, where :func:`fused_activation` named the activation; the running statistics
    are counted and updated exactly as ``bn`` does."""
    bn._check_input_dim(x)
    _hold_allocator_while_training(bn, x)
    running_mean, running_var, average_factor, _ = bn.step_running_stats()
    return act_batch_norm_training_with_kernels(x, act_name, bn.weight, bn.bias, running_mean, running_var,
                                                average_factor, bn.eps)


def _pointwise_conv_applies(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``conv(x)`` may run as :func:`pointwise_conv`: exactly an ``nn.Conv2d`` with a 1x1 kernel, stride 1,
    no padding, one group, no hook, not FX-traced, in a CPU training step the kernels apply to, with an output large
    enough for the pooled product to pay, on a CPU where BLAS and oneDNN run the same instruction set."""
    if _fx_tracing(x) or _tracing_or_exporting() or type(conv) is not nn.Conv2d or has_hooks(conv):
        return False
    if (conv.kernel_size, conv.stride, conv.dilation, conv.groups, conv.padding_mode) != ((1, 1), (1, 1), (1, 1), 1,
                                                                                           "zeros"):
        return False
    if conv.padding not in ((0, 0), "valid") or x.dim() != 4 or x.shape[1] != conv.in_channels:
        return False
    bias = conv.bias
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
        return False
    output_bytes = x.shape[0] * conv.out_channels * x.shape[2] * x.shape[3] * x.element_size()
    return output_bytes >= _POINTWISE_MIN_BYTES and _blas_matches_onednn() and kernels_apply(
        x, conv.weight.transpose(0, 1))


# Measured on AVX2 (benchmarks/training_ab.py): the pooled product wins from 16 MiB outputs (256/8 k5 p2 at batch
# 64: 0.96x of oneDNN's step) and loses below (768/32 at batch 2, 6 MiB: 1.04x), where glibc's heap reuses oneDNN's
# outputs without faulting pages in.
_POINTWISE_MIN_BYTES = 16 << 20


@torch.compiler.assume_constant_result  # a property of the process, read once outside any traced graph
@functools.cache
def _blas_matches_onednn() -> bool:
    # MKL runs its AVX2 code on AMD CPUs, where oneDNN's convolution uses AVX-512 (Zen 5: twice the FMA width); the
    # matrix product is used only where both libraries run the same instruction set, the one it was measured on.
    return not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@torch.jit.unused
def run_layers(layers: Sequence[nn.Module], x: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """``x`` through ``layers`` in turn, each activation and the BatchNorm2d after it as one operator where
    :func:`fused_activation` allows; also whether the result is the fused operator's own output, which no backward
    saves (so the caller may add into it in place)."""
    modules = list(layers)
    fused = False
    i = 0
    while i < len(modules):
        name = fused_activation(modules[i], modules[i + 1], x) if i + 1 < len(modules) else None
        if name is not None:
            x = act_batch_norm_2d(name, modules[i + 1], x)
            i += 2
        elif _pointwise_conv_applies(modules[i], x):
            x = pointwise_conv(x, modules[i].weight, modules[i].bias)
            i += 1
        else:
            x = modules[i](x)
            i += 1
        fused = name is not None
    return x, fused


# FX cannot branch on a traced tensor's device, dtype or rank: one call in a traced graph, like a leaf module's.
# (models/convmixer.py wraps the functions it calls itself.)
torch.fx.wrap("batch_norm_2d")
torch.fx.wrap("act_batch_norm_2d")
