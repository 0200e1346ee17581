"""CPU kernels for what PyTorch's CPU backend runs far below the machine's rate, compiled on first use.

The C++ source (``training_kernels.cpp``) ships with the package and is compiled once per machine with the
system C++ compiler into a cache folder (``$CONVMIXER_TIMM_CACHE``, else ``~/.cache/convmixer_timm``). Where no
compiler is found or the build fails, ``load()`` returns None, warns once, and the model keeps PyTorch's own ops:
slower, same numbers. ``CONVMIXER_TIMM_KERNELS=0`` turns the kernels off.
"""

from .batch_norm import BatchNormChannelsLast
from .build import cache_dir, enabled, kernels_apply, load
from .depthwise import DepthwiseConvSame, conv_same, depthwise_weight_grad
from .mixing import MIXING_ACTIVATIONS, spatial_mixing

__all__ = [
    "MIXING_ACTIVATIONS", "BatchNormChannelsLast", "DepthwiseConvSame", "cache_dir", "conv_same",
    "depthwise_weight_grad", "enabled", "kernels_apply", "load", "spatial_mixing",
]
