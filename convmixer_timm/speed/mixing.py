"""Inference: ConvMixer's spatial-mixing step with both neighbouring BatchNorms folded, in one kernel.

``z = y + s1 * act(depthwise_k(y) + b)`` with ``y = u * s_in + t_in``: ``u`` is the previous layer's activation
before its BatchNorm, whose affine (``s_in``, ``t_in``) is applied while the kernel reads it, so the zero padding
sits where the model has it (on ``y``); ``s1`` is the block's BatchNorm scale (its shift folds into the next 1x1
bias). PyTorch needs a depthwise convolution plus two affine passes over memory for this.

``convmixer_timm::spatial_mixing`` is a ``torch.library`` custom operator with a fake kernel, so traced and
compiled inference graphs keep it as one node. It has no autograd formula: it is an inference kernel.
"""

import torch
from torch import Tensor

from .loader import load

__all__ = ["MIXING_ACTIVATIONS", "spatial_mixing"]

MIXING_ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2}


def _check(u: Tensor, weight_kkc: Tensor, act: str) -> None:
    if u.dtype != torch.float32 or u.dim() != 4:
        raise ValueError(f"spatial_mixing needs a 4-d float32 CPU tensor, got {u.dtype} {list(u.shape)} on {u.device}")
    k, channels = weight_kkc.shape[0], u.shape[1]
    if tuple(weight_kkc.shape) != (k, k, channels):
        raise ValueError(f"weight_kkc must be (k, k, {channels}), got {list(weight_kkc.shape)}")
    if act not in MIXING_ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(MIXING_ACTIVATIONS)}, got {act!r}")


@torch.library.custom_op("convmixer_timm::spatial_mixing", mutates_args=(), device_types="cpu")
def spatial_mixing(u: Tensor, s_in: Tensor, t_in: Tensor, weight_kkc: Tensor, bias: Tensor, s1: Tensor,
                   act: str) -> Tensor:
    """z (channels_last float32, like ``u``); ``weight_kkc`` is the depthwise weight as (k, k, C)."""
    library = load()
    if library is None:
        raise RuntimeError("convmixer_timm kernels are not available; see convmixer_timm.speed.kernel_info()")
    _check(u, weight_kkc, act)
    batch, channels, height, width = u.shape
    k = weight_kkc.shape[0]
    u = u.contiguous(memory_format=torch.channels_last)
    z = torch.empty_like(u, memory_format=torch.channels_last)
    vectors = [t.detach().float().contiguous() for t in (s_in, t_in, weight_kkc, bias, s1)]
    library.spatial_mixing_f32(MIXING_ACTIVATIONS[act], u.data_ptr(), *(t.data_ptr() for t in vectors), z.data_ptr(),
                               batch, height, width, channels, k, (k - 1) // 2, torch.get_num_threads())
    return z


@spatial_mixing.register_fake
def _(u: Tensor, s_in: Tensor, t_in: Tensor, weight_kkc: Tensor, bias: Tensor, s1: Tensor, act: str) -> Tensor:
    _check(u, weight_kkc, act)
    return torch.empty_like(u, memory_format=torch.channels_last)
