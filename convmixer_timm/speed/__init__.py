"""The speed layer: everything convmixer-timm does to run ConvMixer faster than PyTorch's plain ops, in one place.

* ``convmixer_kernels.cpp`` / ``kernels_body.inc``: the compiled CPU kernels (depthwise weight gradient,
  BatchNorm training forward and backward, the inference spatial-mixing step), one copy per instruction set;
* ``build.py``: compiling them when the package is built (``hatch_build.py``), never at run time;
* ``loader.py``: loading them only after ownership and integrity checks, picking the copy for this CPU;
* ``batch_norm.py``, ``depthwise.py``, ``mixing.py``: the autograd functions and calls around them;
* ``allocator.py``: the one process setting (glibc's thresholds), scoped to CPU training and undoable;
* ``inference.py``: :func:`optimize_for_inference`, measured per input shape where it runs;
* ``layers.py``: the seam, the only part ``models/convmixer.py`` uses.
"""
from .allocator import allocator_tuned, restore_cpu_allocator, tune_cpu_allocator
from .batch_norm import BatchNormChannelsLast
from .depthwise import DepthwiseConvSame, conv_same, depthwise_weight_grad
from .inference import (
    RUNTIMES,
    AutotunedConvMixer,
    FusedConvMixerInference,
    OnnxRuntimeConvMixer,
    OpenVinoConvMixer,
    installed_runtimes,
    optimize_for_inference,
    select_fastest,
)
from .layers import BatchNorm2d, depthwise_conv_for_training, kernels_apply, prepare_training_input
from .loader import KernelLoadError, enabled, kernel_info, load, load_from
from .mixing import MIXING_ACTIVATIONS, spatial_mixing

__all__ = [
    "MIXING_ACTIVATIONS", "RUNTIMES", "AutotunedConvMixer", "BatchNorm2d", "BatchNormChannelsLast",
    "DepthwiseConvSame", "FusedConvMixerInference", "KernelLoadError", "OnnxRuntimeConvMixer", "OpenVinoConvMixer",
    "allocator_tuned", "conv_same", "depthwise_conv_for_training", "depthwise_weight_grad", "enabled",
    "installed_runtimes", "kernel_info", "kernels_apply", "load", "load_from", "optimize_for_inference",
    "prepare_training_input", "restore_cpu_allocator", "select_fastest", "spatial_mixing", "tune_cpu_allocator",
]
