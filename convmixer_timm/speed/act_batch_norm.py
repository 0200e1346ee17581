"""An activation and the training BatchNorm after it as one operator: ``BatchNorm(act(a))`` without ``act(a)``.

Every ConvMixer layer ends in conv -> act -> BatchNorm on the full grid. Run as two modules, the activation writes a
full-size tensor that the BatchNorm reads and saves for backward, and the backward writes a full-size gradient of it
in turn; with glibc's default thresholds each of these is a fresh mapping whose pages fault in. Here the BatchNorm's
statistics and output are computed from ``a`` directly (``act`` evaluated again in each of the two passes), only
``a`` is saved, and the backward recomputes ``act(a)`` and ``act'(a)`` to write ``grad_a`` in two passes.

``convmixer_timm::act_batch_norm_train`` and its backward are ``torch.library`` custom operators with fake kernels
and a registered autograd formula, like ``batch_norm.py``'s. A backward that builds a graph (``create_graph=True``)
composes PyTorch's differentiable ops instead: the activation, ``native_batch_norm_backward`` with the same
statistics, and the activation's backward.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch_norm import (
    backward_on_kernels,
    check_backward,
    check_forward,
    fake_backward,
    fake_forward,
    forward_on_kernels,
    update_running_stats,
)

__all__ = ["ACT_BATCH_NORM_ACTIVATIONS", "act_batch_norm_train", "act_batch_norm_train_backward",
           "act_batch_norm_training_with_kernels"]

_FORWARD, _BACKWARD = "act_batch_norm_train", "act_batch_norm_train_backward"
# The kernels' activation codes (kernels_body.inc's Activation); GELU in its exact erf form, as nn.GELU().
_ACT_CODES = {"relu": 1, "gelu": 2}
ACT_BATCH_NORM_ACTIVATIONS = tuple(_ACT_CODES)


def _check_act(op: str, act: str) -> None:
    if act not in _ACT_CODES:
        raise ValueError(f"{op}: act must be one of {', '.join(map(repr, _ACT_CODES))}, got {act!r}; run other "
                         f"activations as their own module before BatchNorm")


def _check_forward(a: Tensor, weight: Tensor, bias: Tensor, act: str) -> None:
    _check_act(_FORWARD, act)
    check_forward(_FORWARD, a, weight, bias, input_name="a")


def _check_backward(grad_y: Tensor, a: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, act: str) -> None:
    _check_act(_BACKWARD, act)
    check_backward(_BACKWARD, grad_y, a, mean, invstd, weight, input_name="a")


def _scratch(channels: int, a: Tensor) -> int:
    # Two double sums per channel and thread, and up to two rows of act(a) and act'(a) per thread.
    return 2 * 8 * channels + 2 * channels * a.element_size() + 128


@torch.library.custom_op("convmixer_timm::act_batch_norm_train", mutates_args=(), device_types="cpu")
def act_batch_norm_train(a: Tensor, weight: Tensor, bias: Tensor, eps: float,
                         act: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``F.batch_norm(act(a), training=True)`` with affine parameters: (y, mean, invstd, biased variance), the
    statistics being those of ``act(a)``; ``act`` is ``"gelu"`` (exact, as ``nn.GELU()``) or ``"relu"``."""
    _check_forward(a, weight, bias, act)
    return forward_on_kernels(_FORWARD, "act_batch_norm_forward", (_ACT_CODES[act],), a, weight, bias, eps,
                              _scratch(a.shape[1], a))


@act_batch_norm_train.register_fake
def _(a: Tensor, weight: Tensor, bias: Tensor, eps: float, act: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_forward(a, weight, bias, act)
    return fake_forward(a)


@torch.library.custom_op("convmixer_timm::act_batch_norm_train_backward", mutates_args=(), device_types="cpu")
def act_batch_norm_train_backward(grad_y: Tensor, a: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor,
                                  act: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_a, grad_weight, grad_bias) of :func:`act_batch_norm_train`."""
    _check_backward(grad_y, a, mean, invstd, weight, act)
    return backward_on_kernels(_BACKWARD, "act_batch_norm_backward", (_ACT_CODES[act],), grad_y, a, mean, invstd,
                               weight, _scratch(a.shape[1], a))


@act_batch_norm_train_backward.register_fake
def _(grad_y: Tensor, a: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor,
      act: str) -> Tuple[Tensor, Tensor, Tensor]:
    _check_backward(grad_y, a, mean, invstd, weight, act)
    return fake_backward(a)


def _setup_context(ctx, inputs, output) -> None:
    a, weight, _, eps, act = inputs
    _, mean, invstd, variance = output
    ctx.save_for_backward(a, weight, mean, invstd)  # a only: act(a) is recomputed, never held
    ctx.eps, ctx.act = eps, act
    ctx.mark_non_differentiable(mean, invstd, variance)  # statistics feed only the no-grad running averages


def _activation(a: Tensor, act: str) -> Tensor:
    return F.gelu(a) if act == "gelu" else F.relu(a)


def _activation_backward(grad_h: Tensor, a: Tensor, h: Tensor, act: str) -> Tensor:
    if act == "gelu":
        return torch.ops.aten.gelu_backward(grad_h, a)
    return torch.ops.aten.threshold_backward(grad_h, h, 0)


def _backward(ctx, grad_y: Tensor, _grad_mean, _grad_invstd, _grad_variance):
    a, weight, mean, invstd = ctx.saved_tensors
    needed = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():
        # create_graph=True: PyTorch's differentiable ops, so double backward and gradient penalties work.
        h = _activation(a, ctx.act)
        grad_h, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y, h, weight, None, None, mean, invstd, True, ctx.eps, [needed[0], needed[1], needed[2]])
        grad_a = _activation_backward(grad_h, a, h, ctx.act) if needed[0] else None
        grads = (grad_a, grad_weight, grad_bias)
    else:
        grads = act_batch_norm_train_backward(grad_y, a, mean, invstd, weight, ctx.act)
    return (*(g if need else None for g, need in zip(grads, needed, strict=True)), None, None)


act_batch_norm_train.register_autograd(_backward, setup_context=_setup_context)


def act_batch_norm_training_with_kernels(a: Tensor, act: str, weight: Tensor, bias: Tensor,
                                         running_mean: Optional[Tensor], running_var: Optional[Tensor],
                                         momentum: float, eps: float) -> Tensor:
    """``F.batch_norm(act(a), ..., training=True)`` on the kernels; running statistics (either may be None) are
    updated in place as PyTorch does."""
    y, mean, _, variance = act_batch_norm_train(a, weight, bias, eps, act)
    update_running_stats(mean, variance, a.shape[0] * a.shape[2] * a.shape[3], running_mean, running_var, momentum)
    return y
