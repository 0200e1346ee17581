"""The speed layer: everything convmixer-timm does to run ConvMixer faster than PyTorch's plain ops, in one place.

* ``convmixer_kernels.cpp`` / ``kernels_body.inc``: the compiled CPU kernels (depthwise weight gradient,
  BatchNorm training forward and backward, alone and after ReLU/GELU, the inference spatial-mixing step), one copy
  per instruction set;
* ``build.py``: compiling them when the package is built (``hatch_build.py``), never at run time;
* ``loader.py``: loading them only once they are checked whole and current, picking the copy for this CPU;
* ``batch_norm.py``, ``act_batch_norm.py``, ``depthwise.py``, ``mixing.py``: the kernels as ``torch.library`` operators
  (``torch.ops.convmixer_timm.*``) with fake kernels and autograd formulas, each checking its arguments
  (``_checks.py``) before any pointer reaches the C++; ``pointwise.py``: the training step's 1x1 convolution as
  matrix products;
* ``buffers.py``: the training step's full-size outputs, reused from step to step instead of mapped afresh;
* ``allocator.py``: the one process setting (glibc's thresholds), only where the user asks, and undoable;
* ``fused.py``: the fused eval-only model (:class:`FusedConvMixerInference`);
* ``runtimes.py``: onnxruntime and OpenVINO on the model's ONNX export, imported with their telemetry off;
* ``race.py``, ``autotune.py``, ``choice_cache.py``: :func:`optimize_for_inference`, which races the paths per
  batch bucket and image size where it runs, and remembers the winners;
* ``lowp.py``, ``quantize.py``, ``precision.py``: its ``precision="bf16"`` and ``"int8"`` paths, the calibration
  inputs and the accuracy measured on them;
* ``layers.py``: the seam, the only part ``models/convmixer.py`` uses.

Nothing here imports timm.
"""
from .act_batch_norm import act_batch_norm_train, act_batch_norm_train_backward, act_batch_norm_training_with_kernels
from .allocator import allocator_tuned, restore_cpu_allocator, tune_cpu_allocator
from .autotune import AutotunedConvMixer, optimize_for_inference
from .batch_norm import batch_norm_train, batch_norm_train_backward, batch_norm_training_with_kernels
from .buffers import release_training_buffers
from .depthwise import conv_same, depthwise_conv, depthwise_conv_same, depthwise_weight_grad
from .fused import FusedConvMixerInference
from .layers import (
    BatchNorm2d,
    depthwise_conv_for_training,
    kernels_apply,
    layout_for_cpu_training,
    match_memory_format,
)
from .loader import KernelLoadError, enabled, kernel_info, load, load_from
from .lowp import LowPrecisionConvMixer
from .mixing import MIXING_ACTIVATIONS, spatial_mixing, spatial_mixing_bf16
from .pointwise import pointwise_conv
from .precision import CalibrationReport
from .runtimes import RUNTIMES, OnnxRuntimeConvMixer, OpenVinoConvMixer, installed_runtimes

__all__ = [
    "MIXING_ACTIVATIONS", "RUNTIMES", "AutotunedConvMixer", "BatchNorm2d", "CalibrationReport",
    "FusedConvMixerInference", "KernelLoadError", "LowPrecisionConvMixer", "OnnxRuntimeConvMixer",
    "OpenVinoConvMixer", "act_batch_norm_train", "act_batch_norm_train_backward",
    "act_batch_norm_training_with_kernels", "allocator_tuned", "batch_norm_train", "batch_norm_train_backward",
    "batch_norm_training_with_kernels", "conv_same", "depthwise_conv", "depthwise_conv_for_training",
    "depthwise_conv_same", "depthwise_weight_grad", "enabled", "installed_runtimes", "kernel_info", "kernels_apply",
    "layout_for_cpu_training", "load", "load_from", "match_memory_format", "optimize_for_inference", "pointwise_conv",
    "release_training_buffers", "restore_cpu_allocator", "spatial_mixing", "spatial_mixing_bf16",
    "tune_cpu_allocator",
]
