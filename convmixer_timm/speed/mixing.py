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

from ._checks import (
    check_4d,
    check_cpu,
    check_kernel,
    check_tensors,
    check_vector,
    dense,
    kernel_threads,
    require_kernels,
    ring_scratch_bytes,
)
from .loader import load

__all__ = ["MIXING_ACTIVATIONS", "spatial_mixing"]

MIXING_ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2}
_OP = "spatial_mixing"


def _check(u: Tensor, s_in: Tensor, t_in: Tensor, weight_kkc: Tensor, bias: Tensor, s1: Tensor, act: str) -> None:
    vectors = {"s_in": s_in, "t_in": t_in, "bias": bias, "s1": s1}
    check_tensors(_OP, {"u": u, **vectors, "weight_kkc": weight_kkc}, (torch.float32,))
    check_4d(_OP, "u", u)
    channels = u.shape[1]
    for name, vector in vectors.items():
        check_vector(_OP, name, vector, channels)
    if weight_kkc.dim() != 3 or tuple(weight_kkc.shape) != (weight_kkc.shape[0], weight_kkc.shape[0], channels):
        raise ValueError(f"{_OP}: weight_kkc must be (k, k, {channels}), the depthwise weight (C, 1, k, k) as "
                         f"weight[:, 0].permute(1, 2, 0), got shape {list(weight_kkc.shape)}")
    k = weight_kkc.shape[0]
    check_kernel(_OP, k, (k - 1) // 2)
    if act not in MIXING_ACTIVATIONS:
        raise ValueError(f"{_OP}: act must be one of {sorted(MIXING_ACTIVATIONS)}, got {act!r}")


@torch.library.custom_op("convmixer_timm::spatial_mixing", mutates_args=(), device_types="cpu")
def spatial_mixing(u: Tensor, s_in: Tensor, t_in: Tensor, weight_kkc: Tensor, bias: Tensor, s1: Tensor,
                   act: str) -> Tensor:
    """z (channels_last float32, like ``u``); ``weight_kkc`` is the depthwise weight as (k, k, C)."""
    _check(u, s_in, t_in, weight_kkc, bias, s1, act)
    check_cpu(_OP, u)
    library = require_kernels(load())
    batch, channels, height, width = u.shape
    k = weight_kkc.shape[0]
    u = dense(u, torch.channels_last)
    z = torch.empty_like(u, memory_format=torch.channels_last)
    if u.numel() == 0:
        return z
    vectors = [dense(t) for t in (s_in, t_in, weight_kkc, bias, s1)]
    library.spatial_mixing_f32(MIXING_ACTIVATIONS[act], u.data_ptr(), *(t.data_ptr() for t in vectors), z.data_ptr(),
                               batch, height, width, channels, k, (k - 1) // 2,
                               kernel_threads(batch * height, ring_scratch_bytes(u, k), u, vectors[2]))
    return z


@spatial_mixing.register_fake
def _(u: Tensor, s_in: Tensor, t_in: Tensor, weight_kkc: Tensor, bias: Tensor, s1: Tensor, act: str) -> Tensor:
    _check(u, s_in, t_in, weight_kkc, bias, s1, act)
    return torch.empty_like(u, memory_format=torch.channels_last)
