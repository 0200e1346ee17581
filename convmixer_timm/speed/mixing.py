"""Inference: ConvMixer's spatial-mixing step with both neighbouring BatchNorms folded, in one kernel.

``z = y + s1 * act(depthwise_k(y) + b)`` with ``y = u * s_in + t_in``: ``u`` is the previous layer's activation
before its BatchNorm, whose affine (``s_in``, ``t_in``) is applied while the kernel reads it, so the zero padding
sits where the model has it (on ``y``); ``s1`` is the block's BatchNorm scale (its shift folds into the next 1x1
bias). PyTorch needs a depthwise convolution plus two affine passes over memory for this.
"""

from __future__ import annotations

import torch

from .loader import load

__all__ = ["MIXING_ACTIVATIONS", "spatial_mixing"]

MIXING_ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2}


def spatial_mixing(u: torch.Tensor, s_in: torch.Tensor, t_in: torch.Tensor, weight_kkc: torch.Tensor,
                   bias: torch.Tensor, s1: torch.Tensor, act: str) -> torch.Tensor:
    """z (channels_last float32, like ``u``); ``weight_kkc`` is the depthwise weight as (k, k, C)."""
    library = load()
    if library is None:
        raise RuntimeError("convmixer_timm kernels are not available; see convmixer_timm.speed.kernel_info()")
    if u.dtype != torch.float32 or u.device.type != "cpu" or u.dim() != 4:
        raise ValueError(f"spatial_mixing needs a 4-d float32 CPU tensor, got {u.dtype} {list(u.shape)} on {u.device}")
    batch, channels, height, width = u.shape
    k = weight_kkc.shape[0]
    if weight_kkc.shape != (k, k, channels):
        raise ValueError(f"weight_kkc must be (k, k, {channels}), got {list(weight_kkc.shape)}")
    u = u.contiguous(memory_format=torch.channels_last)
    z = torch.empty_like(u, memory_format=torch.channels_last)
    vectors = [t.detach().float().contiguous() for t in (s_in, t_in, weight_kkc, bias, s1)]
    library.spatial_mixing_f32(MIXING_ACTIVATIONS[act], u.data_ptr(), *(t.data_ptr() for t in vectors), z.data_ptr(),
                               batch, height, width, channels, k, (k - 1) // 2, torch.get_num_threads())
    return z
