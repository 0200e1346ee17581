"""Inference: ConvMixer's spatial-mixing step with both neighbouring BatchNorms folded, in one kernel.

``z = y + s1 * act(depthwise_k(y) + b)`` with ``y = u * s_in + t_in``: ``u`` is the previous layer's activation
before its BatchNorm, whose affine (``s_in``, ``t_in``) is applied while the kernel reads it, so the zero padding
sits where the model has it (on ``y``); ``s1`` is the block's BatchNorm scale (its shift folds into the next 1x1
bias). PyTorch needs a depthwise convolution plus two affine passes over memory for this.

``convmixer_timm::spatial_mixing`` is a ``torch.library`` custom operator with a fake kernel, so traced and
compiled inference graphs keep it as one node. It has no autograd formula: it is an inference kernel.
``convmixer_timm::spatial_mixing_bf16`` is the same step with a bf16 result, from a bf16 or float32 ``u``: the
vectors and the weight stay float32 and every sum is float32, so the result is the float32 step's rounded once
to bf16 (the kernels' AVX512_BF16 copy rounds with one instruction where the CPU has it).
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

__all__ = ["MIXING_ACTIVATIONS", "spatial_mixing", "spatial_mixing_bf16"]

MIXING_ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2}
_OP = "spatial_mixing"
_OP_BF16 = "spatial_mixing_bf16"


def _check(u: Tensor, s_in: Tensor, t_in: Tensor, weight_kkc: Tensor, bias: Tensor, s1: Tensor, act: str,
           op: str = _OP) -> None:
    vectors = {"s_in": s_in, "t_in": t_in, "bias": bias, "s1": s1}
    if op == _OP_BF16:  # u bf16 or float32, the rest float32
        check_tensors(op, {"u": u}, (torch.bfloat16, torch.float32))
        check_tensors(op, {**vectors, "weight_kkc": weight_kkc}, (torch.float32,))
        if s_in.device != u.device:
            raise RuntimeError(f"{op}: expected all tensors on one device, got u on {u.device} and s_in on "
                               f"{s_in.device}; move them with .to({str(u.device)!r})")
    else:
        check_tensors(op, {"u": u, **vectors, "weight_kkc": weight_kkc}, (torch.float32,))
    check_4d(op, "u", u)
    channels = u.shape[1]
    for name, vector in vectors.items():
        check_vector(op, name, vector, channels)
    if weight_kkc.dim() != 3 or tuple(weight_kkc.shape) != (weight_kkc.shape[0], weight_kkc.shape[0], channels):
        raise ValueError(f"{op}: weight_kkc must be (k, k, {channels}), the depthwise weight (C, 1, k, k) as "
                         f"weight[:, 0].permute(1, 2, 0), got shape {list(weight_kkc.shape)}")
    k = weight_kkc.shape[0]
    check_kernel(op, k, (k - 1) // 2)
    if act not in MIXING_ACTIVATIONS:
        raise ValueError(f"{op}: act must be one of {sorted(MIXING_ACTIVATIONS)}, got {act!r}")


def _mix(op: str, u: Tensor, s_in: Tensor, t_in: Tensor, weight_kkc: Tensor, bias: Tensor, s1: Tensor, act: str,
         out_dtype: torch.dtype) -> Tensor:
    """Either operator's step on the kernels, z of ``out_dtype`` (float32: spatial_mixing_f32, bf16:
    spatial_mixing_bf16)."""
    _check(u, s_in, t_in, weight_kkc, bias, s1, act, op)
    check_cpu(op, u)
    library = require_kernels(load())
    batch, channels, height, width = u.shape
    k = weight_kkc.shape[0]
    u = dense(u, torch.channels_last)
    z = torch.empty_like(u, dtype=out_dtype, memory_format=torch.channels_last)
    if u.numel() == 0:
        return z
    vectors = [dense(t) for t in (s_in, t_in, weight_kkc, bias, s1)]
    pointers = (u.data_ptr(), *(t.data_ptr() for t in vectors), z.data_ptr())
    sizes = (batch, height, width, channels, k, (k - 1) // 2,
             kernel_threads(batch * height, ring_scratch_bytes(u, k), u, vectors[2]))
    if out_dtype == torch.bfloat16:
        library.spatial_mixing_bf16(MIXING_ACTIVATIONS[act], int(u.dtype == torch.bfloat16), *pointers, *sizes)
    else:
        library.spatial_mixing_f32(MIXING_ACTIVATIONS[act], *pointers, *sizes)
    return z


def _fake(op: str, u: Tensor, s_in: Tensor, t_in: Tensor, weight_kkc: Tensor, bias: Tensor, s1: Tensor, act: str,
          out_dtype: torch.dtype) -> Tensor:
    _check(u, s_in, t_in, weight_kkc, bias, s1, act, op)
    return torch.empty_like(u, dtype=out_dtype, memory_format=torch.channels_last)


@torch.library.custom_op("convmixer_timm::spatial_mixing", mutates_args=(), device_types="cpu")
def spatial_mixing(u: Tensor, s_in: Tensor, t_in: Tensor, weight_kkc: Tensor, bias: Tensor, s1: Tensor,
                   act: str) -> Tensor:
    """z (channels_last float32, like ``u``); ``weight_kkc`` is the depthwise weight as (k, k, C)."""
    return _mix(_OP, u, s_in, t_in, weight_kkc, bias, s1, act, torch.float32)


@spatial_mixing.register_fake
def _(u: Tensor, s_in: Tensor, t_in: Tensor, weight_kkc: Tensor, bias: Tensor, s1: Tensor, act: str) -> Tensor:
    return _fake(_OP, u, s_in, t_in, weight_kkc, bias, s1, act, torch.float32)


@torch.library.custom_op("convmixer_timm::spatial_mixing_bf16", mutates_args=(), device_types="cpu")
def spatial_mixing_bf16(u: Tensor, s_in: Tensor, t_in: Tensor, weight_kkc: Tensor, bias: Tensor, s1: Tensor,
                        act: str) -> Tensor:
    """z (channels_last bf16) from ``u`` (bf16 or float32); the other arguments as :func:`spatial_mixing`'s."""
    return _mix(_OP_BF16, u, s_in, t_in, weight_kkc, bias, s1, act, torch.bfloat16)


@spatial_mixing_bf16.register_fake
def _(u: Tensor, s_in: Tensor, t_in: Tensor, weight_kkc: Tensor, bias: Tensor, s1: Tensor, act: str) -> Tensor:
    return _fake(_OP_BF16, u, s_in, t_in, weight_kkc, bias, s1, act, torch.bfloat16)
