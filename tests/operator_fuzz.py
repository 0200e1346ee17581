"""Fuzzing the native operators ``torch.ops.convmixer_timm.*``: run as a script by ``test_operator_fuzz.py``.

``python operator_fuzz.py SEED COUNT`` runs the known hostile calls, then COUNT random ones, and prints one JSON
line before each call (``{"start": i, "case": ...}``) and one after (``{"done": i, "outcome": ...}``): a call that
kills the process by a signal is the last one started and never done.

Each call is labelled by what it is given:

* ``invalid`` (a dtype the kernels lack, a vector of the wrong length, a bad kernel size or padding, a meta tensor
  among CPU ones, an activation the operator does not compute...): the operator must raise;
* ``edge`` (a zero-size batch, grid or channel count): it may raise, and whatever it returns must be right;
* ``valid``: it must return PyTorch's result, computed here in float64 from the definition with plain tensor
  arithmetic, within 1e-3 (float32), 1e-8 (float64) or 1e-2 (``spatial_mixing_bf16``'s bf16 result, whose bf16
  input the reference reads as given) of the reference's largest magnitude (at least 1);
* ``module`` (the public ``BatchNorm2d``): ``nn.BatchNorm2d``'s result within the same tolerances (1e-2 and 5e-2
  for float16 and bfloat16, which both run through ``F.batch_norm``), or its exception, same type and message.

Outcomes: ``ok``, ``raised`` (an exception where one is allowed), or a failure: ``wrong`` (a result off the
reference), ``accepted`` (a result for an invalid call), ``refused`` (an exception for a valid call).
"""
from __future__ import annotations

import json
import random
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import convmixer_timm.speed  # noqa: F401  (registers the operators)
from convmixer_timm.speed import BatchNorm2d

OPS = torch.ops.convmixer_timm
FLOATS = (torch.float32, torch.float64)
BAD_DTYPES = (torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.bool)
LAYOUTS = ("contiguous", "channels_last", "strided", "transposed", "expanded")
VECTOR_LAYOUTS = ("contiguous", "strided", "expanded", "negative_view")
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# Operators whose output dtype is not their first tensor's, and its tolerance.
OUTPUT_DTYPE = {"spatial_mixing_bf16": torch.bfloat16}
OUTPUT_TOLERANCE = {"spatial_mixing_bf16": 1e-2}
HUGE_CHANNELS = 100_000


@dataclass
class Case:
    op: str
    args: tuple
    label: str  # "valid", "edge" or "invalid"
    why: list[str] = field(default_factory=list)
    default_device: str | None = None

    def describe(self) -> str:
        def show(a):
            if isinstance(a, torch.Tensor):
                return (f"T{list(a.shape)}:{str(a.dtype).replace('torch.', '')}:{a.device.type}:"
                        f"stride{list(a.stride())}")
            return repr(a)
        extra = f" under default device {self.default_device}" if self.default_device else ""
        return f"{self.op}({', '.join(show(a) for a in self.args)}) [{self.label}: {'; '.join(self.why)}]{extra}"


# ----------------------------------------------------------------------------------------------- tensors


def tensor4(rng: random.Random, shape, dtype, layout: str) -> torch.Tensor:
    n, c, h, w = shape
    if layout == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")

    def rand(*size):
        return torch.randn(size).to(dtype)

    if layout == "strided":
        return rand(n, c, h, 2 * w)[..., ::2]
    if layout == "transposed":
        return rand(n, c, w, h).transpose(2, 3)
    if layout == "expanded":  # stride 0 along the batch or the rows
        return rand(1, c, h, w).expand(n, c, h, w) if rng.random() < 0.5 else rand(n, c, 1, w).expand(n, c, h, w)
    t = rand(n, c, h, w)
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def vector(rng: random.Random, length: int, dtype, layout: str, low: float | None = None) -> torch.Tensor:
    if layout == "meta":
        return torch.empty(length, dtype=dtype, device="meta")
    base = ((torch.rand(2 * length) + low) if low is not None else torch.randn(2 * length)).to(dtype)
    if layout == "strided":
        return base[::2]
    if layout == "expanded":
        return base[:1].expand(length)
    if layout == "negative_view" and dtype.is_floating_point:
        return torch._neg_view(-base[:length])  # the same values, with the negation pending in the view
    return base[:length].clone()


def reference_conv_same(x: torch.Tensor, weight_ckk: torch.Tensor, bias: torch.Tensor | None,
                        pad: int | None = None) -> torch.Tensor:
    """Depthwise stride-1 convolution that keeps the grid, ``pad`` zeros before (default (k - 1) // 2, 'same') and
    k - 1 - pad after, by its definition."""
    n, c, h, w = x.shape
    k = weight_ckk.shape[-1]
    pad = (k - 1) // 2 if pad is None else pad
    padded = x.new_zeros(n, c, h + k - 1, w + k - 1)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    out = x.new_zeros(n, c, h, w) if bias is None else bias.view(1, -1, 1, 1).expand(n, c, h, w).clone()
    for i in range(k):
        for j in range(k):
            out = out + weight_ckk[:, i, j].view(1, -1, 1, 1) * padded[:, :, i:i + h, j:j + w]
    return out


def per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.double().view(1, -1, 1, 1)


# ----------------------------------------------------------------------------------------------- references


def ref_batch_norm_train(x, weight, bias, eps):
    x = x.double()
    mean = x.mean((0, 2, 3))
    variance = ((x - per_channel(mean)) ** 2).mean((0, 2, 3))
    invstd = (variance + eps).rsqrt()
    y = (x - per_channel(mean)) * per_channel(invstd) * per_channel(weight) + per_channel(bias)
    return y, mean, invstd, variance


def ref_batch_norm_train_backward(grad_y, x, mean, invstd, weight):
    g, x = grad_y.double(), x.double()
    rows = x.shape[0] * x.shape[2] * x.shape[3]
    centred = x - per_channel(mean)
    sum_dy, sum_dy_xmu = g.sum((0, 2, 3)), (g * centred).sum((0, 2, 3))
    inv = per_channel(invstd)
    grad_x = (g - per_channel(sum_dy) / max(rows, 1) - centred * per_channel(sum_dy_xmu) / max(rows, 1) * inv * inv) \
        * inv * per_channel(weight)
    return grad_x, sum_dy_xmu * invstd.double(), sum_dy


def _act(a, act):
    return F.gelu(a) if act == "gelu" else F.relu(a)


def _act_derivative(a, act):
    if act == "gelu":
        return 0.5 * (1 + torch.erf(a * 0.5 ** 0.5)) + a * torch.exp(-0.5 * a * a) / (2 * torch.pi) ** 0.5
    return (a > 0).to(a.dtype)


def ref_act_batch_norm_train(a, weight, bias, eps, act):
    return ref_batch_norm_train(_act(a.double(), act), weight, bias, eps)


def ref_act_batch_norm_train_backward(grad_y, a, mean, invstd, weight, act):
    a = a.double()
    grad_h, grad_weight, grad_bias = ref_batch_norm_train_backward(grad_y, _act(a, act), mean, invstd, weight)
    return grad_h * _act_derivative(a, act), grad_weight, grad_bias


def ref_depthwise_weight_grad(grad_out, x, k, pad):
    g, x = grad_out.double(), x.double()
    n, c, h, w = x.shape
    padded = x.new_zeros(n, c, h + k - 1, w + k - 1)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    out = x.new_zeros(c, 1, k, k)
    for i in range(k):
        for j in range(k):
            out[:, 0, i, j] = (g * padded[:, :, i:i + h, j:j + w]).sum((0, 2, 3))
    return out


def ref_spatial_mixing(u, s_in, t_in, weight_kkc, bias, s1, act):
    y = u.double() * per_channel(s_in) + per_channel(t_in)
    mixed = reference_conv_same(y, weight_kkc.double().permute(2, 0, 1), bias.double())
    activated = {"identity": mixed, "relu": F.relu(mixed), "gelu": F.gelu(mixed)}[act]
    return y + per_channel(s1) * activated


def _output_and_grads(conv: Callable, x, weight, bias):
    """A convolution operator's output and, for float inputs, its gradients for a fixed random upstream gradient."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    if not all(t.dtype in FLOATS and t.device.type == "cpu" for t in tensors):
        return (conv(x, weight, bias),)
    leaves = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    out = conv(leaves[0], leaves[1], leaves[2] if bias is not None else None)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu")
    return (out, *torch.autograd.grad(out, leaves, grad.to(out.dtype)))


def _reference_output_and_grads(conv: Callable, x, weight, bias):
    leaves = [t.detach().double().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    out = conv(leaves[0], leaves[1], leaves[2] if bias is not None else None)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu")
    grad = grad.to(x.dtype).double()
    return (out.detach(), *torch.autograd.grad(out, leaves, grad)) if out.numel() else (out.detach(),)


def ours_depthwise_conv_same(x, weight, bias):
    return _output_and_grads(OPS.depthwise_conv_same, x, weight, bias)


def ref_depthwise_conv_same(x, weight, bias):
    return _reference_output_and_grads(lambda x, w, b: reference_conv_same(x, w[:, 0], b), x, weight, bias)


def ref_depthwise_conv(x, weight, bias, pad):
    return reference_conv_same(x.double(), weight[:, 0].double(), None if bias is None else bias.double(), pad)


def ours_pointwise_conv(x, weight, bias):
    return _output_and_grads(OPS.pointwise_conv, x, weight, bias)


def ref_pointwise_conv(x, weight, bias):
    # A 1x1 convolution by its definition: a sum over input channels at every pixel.
    def definition(x, w, b):
        out = torch.einsum("nchw,oc->nohw", x, w[:, :, 0, 0])
        return out if b is None else out + b.view(1, -1, 1, 1)
    return _reference_output_and_grads(definition, x, weight, bias)


def ours_batch_norm_module(channels, affine, track, x):
    return BatchNorm2d(channels, affine=affine, track_running_stats=track).train()(x)


def ref_batch_norm_module(channels, affine, track, x):
    return torch.nn.BatchNorm2d(channels, affine=affine, track_running_stats=track).train()(x.detach())


OPERATORS: dict[str, tuple[Callable, Callable]] = {
    "batch_norm_train": (lambda *a: OPS.batch_norm_train(*a), ref_batch_norm_train),
    "batch_norm_train_backward": (lambda *a: OPS.batch_norm_train_backward(*a), ref_batch_norm_train_backward),
    "act_batch_norm_train": (lambda *a: OPS.act_batch_norm_train(*a), ref_act_batch_norm_train),
    "act_batch_norm_train_backward": (lambda *a: OPS.act_batch_norm_train_backward(*a),
                                      ref_act_batch_norm_train_backward),
    "depthwise_weight_grad": (lambda *a: OPS.depthwise_weight_grad(*a), ref_depthwise_weight_grad),
    "depthwise_conv_same": (ours_depthwise_conv_same, ref_depthwise_conv_same),
    "depthwise_conv": (lambda *a: OPS.depthwise_conv(*a), ref_depthwise_conv),
    "pointwise_conv": (ours_pointwise_conv, ref_pointwise_conv),
    "spatial_mixing": (lambda *a: OPS.spatial_mixing(*a), ref_spatial_mixing),
    "spatial_mixing_bf16": (lambda *a: OPS.spatial_mixing_bf16(*a), ref_spatial_mixing),
    "BatchNorm2d": (ours_batch_norm_module, ref_batch_norm_module),
}


# ----------------------------------------------------------------------------------------------- random cases


class Draw:
    """One random call: shapes, dtypes, layouts and the ways it is broken, with the reasons recorded."""

    def __init__(self, rng: random.Random, huge_ok: bool = True):
        self.rng, self.why = rng, []
        r = rng.random()
        if r < 0.04 and huge_ok:
            self.shape = (rng.choice([1, 2]), HUGE_CHANNELS, 1, rng.choice([1, 2]))
        elif r < 0.12:
            self.shape = (rng.choice([0, 1, 2]), rng.choice([0, 1, 3]), rng.choice([0, 1, 4]), rng.choice([0, 1, 3]))
        else:
            self.shape = (rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4, 7, 16, 17, 33]),
                          rng.choice([1, 2, 3, 5, 8]), rng.choice([1, 2, 3, 5, 8]))
        self.channels = self.shape[1]
        self.dtype = rng.choice(FLOATS) if rng.random() < 0.85 else self.bad(rng.choice(BAD_DTYPES), "dtype")
        self.meta_target = rng.randrange(8) if rng.random() < 0.08 else None
        self.count = 0

    def bad(self, value, reason: str):
        self.why.append(f"{reason} {value}")
        return value

    def _device_layout(self, layout: str) -> str:
        self.count += 1
        if self.meta_target == self.count - 1:
            self.why.append(f"tensor {self.count - 1} on meta")
            return "meta"
        return layout

    def _dtype(self) -> torch.dtype:
        if self.rng.random() < 0.05:
            other = self.rng.choice([d for d in FLOATS + BAD_DTYPES if d != self.dtype])
            return self.bad(other, "mixed dtype")
        return self.dtype

    def x(self, shape=None) -> torch.Tensor:
        return tensor4(self.rng, shape or self.shape, self._dtype(), self._device_layout(self.rng.choice(LAYOUTS)))

    def vector(self, low: float | None = None) -> torch.Tensor:
        rng, length = self.rng, self.channels
        if rng.random() < 0.12:
            length = self.bad(rng.choice([1, 0, length + 1, max(length - 1, 0), 2 * length]), "vector length")
            if length == self.channels:
                self.why.pop()
        t = vector(rng, length, self._dtype(), self._device_layout(rng.choice(VECTOR_LAYOUTS)), low)
        if rng.random() < 0.03:
            t = t.unsqueeze(1)
            self.why.append("vector of 2 dimensions")
        return t

    def kernel_size(self, choices: list[int]) -> int:
        # Keeps the float64 references of 100000-channel calls small (they pad the input by k - 1).
        return self.rng.choice(choices if self.channels < HUGE_CHANNELS else [1, 2, 3])

    def kernel(self) -> tuple[int, int]:
        rng = self.rng
        k = self.kernel_size([1, 2, 3, 3, 4, 5, 7, 9, 16])
        pad = rng.choice([(k - 1) // 2, (k - 1) // 2, 0, k - 1])
        if rng.random() < 0.1:
            k = self.bad(rng.choice([0, -1, -3, 46341, 2**31, 2**31 + 3, 2**40]), "kernel_size")
            pad = 0
        elif rng.random() < 0.1:
            pad = self.bad(rng.choice([-1, k, k + 5, 2**31, -2**31 - 1]), "pad")
        return k, pad

    def act(self) -> str:
        """An activation the fused act-BatchNorm operator computes, or now and then one it does not."""
        if self.rng.random() < 0.05:
            return self.bad(self.rng.choice(["silu", "GELU", "identity", ""]), "act")
        return self.rng.choice(["relu", "gelu"])

    def label(self, zero_size: bool) -> str:
        if self.why:
            return "invalid"
        return "edge" if zero_size else "valid"


def random_case(rng: random.Random) -> Case:
    op = rng.choice(list(OPERATORS))
    # Both depthwise operators run PyTorch's grouped convolution in float64: 100000 groups take it minutes there.
    d = Draw(rng, huge_ok=op not in ("depthwise_conv_same", "depthwise_conv"))
    n, c, h, w = d.shape
    zero_size = n * c * h * w == 0
    if op == "batch_norm_train":
        args = (d.x(), d.vector(0.5), d.vector(), rng.choice([1e-5, 1e-3]))
        if n * h * w < 2:
            d.why.append("fewer than 2 values per channel")
    elif op == "batch_norm_train_backward":
        grad_shape = d.shape if rng.random() > 0.08 else d.bad((n, c, h, w + 1), "grad_y shape")
        args = (d.x(grad_shape), d.x(), d.vector(), d.vector(0.5), d.vector())
    elif op == "act_batch_norm_train":
        args = (d.x(), d.vector(0.5), d.vector(), rng.choice([1e-5, 1e-3]), d.act())
        if n * h * w < 2:
            d.why.append("fewer than 2 values per channel")
    elif op == "act_batch_norm_train_backward":
        grad_shape = d.shape if rng.random() > 0.08 else d.bad((n, c + 1, h, w), "grad_y shape")
        args = (d.x(grad_shape), d.x(), d.vector(), d.vector(0.5), d.vector(), d.act())
    elif op == "depthwise_weight_grad":
        k, pad = d.kernel()
        grad_shape = d.shape if rng.random() > 0.08 else d.bad((n, c + 1, h, w), "grad_out shape")
        args = (d.x(grad_shape), d.x(), k, pad)
    elif op in ("depthwise_conv_same", "depthwise_conv"):
        k = d.kernel_size([1, 2, 3, 4, 5, 7])
        weight_shape = (c, 1, k, k)
        if rng.random() < 0.12:
            weight_shape = d.bad(rng.choice([(c, 1, k, k + 1), (c + 1, 1, k, k), (c, 1, 0, 0), (2 * c, 1, k, k)]),
                                 "weight shape")
            if weight_shape == (c, 1, k, k):
                d.why.pop()
        weight = tensor4(rng, weight_shape, d._dtype(), d._device_layout(rng.choice(LAYOUTS)))
        args = (d.x(), weight, d.vector() if rng.random() < 0.8 else None)
        if op == "depthwise_conv":
            pad = rng.choice([(k - 1) // 2, k // 2, 0, k - 1])
            args += (d.bad(rng.choice([-1, k, 2**31]), "pad") if rng.random() < 0.1 else pad,)
    elif op == "pointwise_conv":
        # A (C_out, 100000) weight stays small: C_out of 1 to 3.
        out_channels = rng.choice([c, c, 1, 2 * c + 1] if c < HUGE_CHANNELS else [1, 2, 3])
        weight_shape = (out_channels, c, 1, 1)
        if rng.random() < 0.12:
            weight_shape = d.bad(rng.choice([(out_channels, c + 1, 1, 1), (out_channels, c, 1, 2),
                                             (out_channels, c, 3, 3), (out_channels, c, 1)]), "weight shape")
        weight = tensor4(rng, weight_shape, d._dtype(), d._device_layout(rng.choice(LAYOUTS))) \
            if len(weight_shape) == 4 else torch.randn(weight_shape).to(d.dtype)
        bias = None
        if rng.random() < 0.8:
            length = out_channels if rng.random() > 0.1 else d.bad(out_channels + 1, "bias length")
            bias = vector(rng, length, d._dtype(), d._device_layout(rng.choice(VECTOR_LAYOUTS)))
        args = (d.x(), weight, bias)
    elif op in ("spatial_mixing", "spatial_mixing_bf16"):
        if d.dtype != torch.float32 and "dtype" not in " ".join(d.why):
            d.bad(d.dtype, f"dtype ({op}'s vectors and weight are float32 only)")
        k = d.kernel_size([1, 2, 3, 5, 7, 8, 9, 10])
        kkc = (k, k, c)
        if rng.random() < 0.12:
            kkc = d.bad(rng.choice([(0, 0, c), (k, k + 1, c), (k, k, c + 1), (k, k, 1), (k, k)]), "weight_kkc shape")
            if kkc == (k, k, c):
                d.why.pop()
        weight = (torch.randn(kkc) * 0.3).to(d._dtype())
        act = rng.choice(["identity", "relu", "gelu"]) if rng.random() > 0.05 else d.bad("tanh", "act")
        u = d.x()
        if op == "spatial_mixing_bf16" and u.dtype == torch.float32 and rng.random() < 0.5:
            u = u.bfloat16()  # a bf16 u is valid here, with float32 vectors and weight
        args = (u, d.vector(0.5), d.vector(), weight, d.vector(), d.vector(), act)
    else:  # the public BatchNorm2d: PyTorch's result or PyTorch's own error, compared below
        affine, track = rng.random() < 0.7, rng.random() < 0.7
        x = d.x()
        x = x.detach().requires_grad_(x.dtype.is_floating_point)
        args = (rng.choice([c, c, 8, 1, max(c - 1, 1)]), affine, track, x)
        return Case(op, args, "module", d.why)
    return Case(op, args, d.label(zero_size), d.why)


def known_cases() -> list[Case]:
    """The hostile calls that once crashed the process or returned memory read past a buffer, and their kin."""
    x = torch.randn(2, 8, 3, 3)
    ones, zeros, kkc = torch.ones(8), torch.zeros(8), torch.randn(3, 3, 8)
    huge = torch.randn(2, HUGE_CHANNELS, 1, 1)
    meta8 = torch.ones(8, device="meta")
    cases = [
        Case("batch_norm_train", (huge, torch.ones(1), torch.zeros(1), 1e-5), "invalid", ["1-element weight"]),
        Case("batch_norm_train", (x.bfloat16(), ones.bfloat16(), zeros.bfloat16(), 1e-5), "invalid", ["bfloat16"]),
        Case("batch_norm_train", (x.int(), ones.int(), zeros.int(), 1e-5), "invalid", ["int32"]),
        Case("batch_norm_train", (x, ones.double(), zeros, 1e-5), "invalid", ["mixed dtype"]),
        Case("batch_norm_train", (x, meta8, zeros, 1e-5), "invalid", ["meta weight"]),
        Case("batch_norm_train", (x.to("meta"), ones, zeros, 1e-5), "invalid", ["meta x"]),
        Case("batch_norm_train_backward", (x, x, torch.ones(1), torch.ones(1), ones), "invalid", ["short stats"]),
        Case("batch_norm_train_backward", (huge, huge, *[torch.ones(1)] * 3), "invalid", ["short stats"]),
        Case("batch_norm_train_backward", (x, x, zeros, ones, meta8), "invalid", ["meta weight"]),
        Case("batch_norm_train_backward", (x[:0], x[:0], zeros, ones, ones), "edge", ["zero batch"]),
        Case("act_batch_norm_train", (huge, torch.ones(1), torch.zeros(1), 1e-5, "gelu"), "invalid",
             ["1-element weight"]),
        Case("act_batch_norm_train", (x, ones, zeros, 1e-5, "silu"), "invalid", ["act silu"]),
        Case("act_batch_norm_train", (x.half(), ones.half(), zeros.half(), 1e-5, "relu"), "invalid", ["float16"]),
        Case("act_batch_norm_train", (x, ones, zeros.double(), 1e-5, "gelu"), "invalid", ["mixed dtype"]),
        Case("act_batch_norm_train", (x, meta8, zeros, 1e-5, "relu"), "invalid", ["meta weight"]),
        Case("act_batch_norm_train", (x[:1, :, :1, :1], ones, zeros, 1e-5, "gelu"), "invalid", ["1 value"]),
        Case("act_batch_norm_train_backward", (huge, huge, *[torch.ones(1)] * 3, "gelu"), "invalid",
             ["short stats"]),
        Case("act_batch_norm_train_backward", (x, x, zeros, ones, ones, "tanh"), "invalid", ["act tanh"]),
        Case("act_batch_norm_train_backward", (x, x.to("meta"), zeros, ones, ones, "relu"), "invalid", ["meta x"]),
        Case("act_batch_norm_train_backward", (x[:0], x[:0], zeros, ones, ones, "gelu"), "edge", ["zero batch"]),
        Case("spatial_mixing", (x, torch.ones(1), zeros, kkc, zeros, ones, "gelu"), "invalid", ["short s_in"]),
        Case("spatial_mixing", (x, ones, zeros, kkc, torch.ones(1), torch.ones(1), "relu"), "invalid", ["short"]),
        Case("spatial_mixing", (x, ones, zeros, torch.randn(0, 0, 8), zeros, ones, "gelu"), "invalid", ["k=0"]),
        Case("spatial_mixing", (x, ones, zeros, kkc.to("meta"), zeros, ones, "gelu"), "invalid", ["meta weight"]),
        Case("spatial_mixing", (huge, *[torch.ones(1)] * 2, torch.ones(1, 1, 1), *[torch.ones(1)] * 2, "identity"),
             "invalid", ["1-element vectors"]),
        Case("spatial_mixing_bf16", (x.bfloat16(), ones.bfloat16(), zeros, kkc, zeros, ones, "gelu"), "invalid",
             ["bf16 s_in"]),
        Case("spatial_mixing_bf16", (x.half(), ones, zeros, kkc, zeros, ones, "gelu"), "invalid", ["float16 u"]),
        Case("spatial_mixing_bf16", (x.double(), ones, zeros, kkc, zeros, ones, "gelu"), "invalid", ["float64 u"]),
        Case("spatial_mixing_bf16", (x.bfloat16(), torch.ones(1), zeros, kkc, zeros, ones, "relu"), "invalid",
             ["short s_in"]),
        Case("spatial_mixing_bf16", (x.bfloat16(), ones, zeros, kkc.to("meta"), zeros, ones, "gelu"), "invalid",
             ["meta weight"]),
        Case("spatial_mixing_bf16", (x.bfloat16().to("meta"), ones, zeros, kkc, zeros, ones, "gelu"), "invalid",
             ["meta u"]),
        Case("spatial_mixing_bf16", (huge.bfloat16(), *[torch.ones(1)] * 2, torch.ones(1, 1, 1),
                                     *[torch.ones(1)] * 2, "identity"), "invalid", ["1-element vectors"]),
        Case("spatial_mixing_bf16", (x.bfloat16(), ones, zeros, kkc, zeros, ones, "gelu"), "valid"),
        Case("spatial_mixing_bf16", (x, ones, zeros, kkc, zeros, ones, "relu"), "valid"),
        Case("depthwise_weight_grad", (x, x, 0, 0), "invalid", ["kernel_size=0"]),
        Case("depthwise_weight_grad", (x, x, 3, -1), "invalid", ["pad=-1"]),
        Case("depthwise_weight_grad", (x, x, 3, 3), "invalid", ["pad=k"]),
        Case("depthwise_weight_grad", (x, x, 2**32 + 3, 1), "invalid", ["kernel_size past int"]),
        Case("depthwise_weight_grad", (x.half(), x.half(), 3, 1), "invalid", ["float16"]),
        Case("depthwise_weight_grad", (x, x.to("meta"), 3, 1), "invalid", ["meta x"]),
        Case("depthwise_conv_same", (x, torch.randn(8, 1, 3, 3, device="meta"), None), "invalid", ["meta weight"]),
        Case("depthwise_conv_same", (x, torch.randn(8, 1, 3, 5), None), "invalid", ["non-square kernel"]),
        Case("depthwise_conv", (x, torch.randn(8, 1, 3, 3), None, 3), "invalid", ["pad=k"]),
        Case("depthwise_conv", (x, torch.randn(8, 1, 3, 3), torch.ones(1), 1), "invalid", ["short bias"]),
        Case("depthwise_conv", (x, torch.randn(1, 1, 3, 3), None, 1), "invalid", ["one kernel for 8 channels"]),
        Case("pointwise_conv", (huge, torch.ones(1, 1, 1, 1), None), "invalid", ["1-element weight"]),
        Case("pointwise_conv", (x, torch.ones(4, 8, 1, 1), torch.ones(3)), "invalid", ["short bias"]),
        Case("pointwise_conv", (x, torch.ones(4, 8, 1, 1, device="meta"), None), "invalid", ["meta weight"]),
        Case("pointwise_conv", (x.half(), torch.ones(4, 8, 1, 1).half(), None), "invalid", ["float16"]),
        Case("pointwise_conv", (huge[:0], torch.ones(3, HUGE_CHANNELS, 1, 1), torch.ones(3)), "edge"),
        Case("depthwise_weight_grad", (huge, huge, 3, 1), "valid"),
        # Zero-size tensors with many channels: nothing read, per-channel results right.
        Case("depthwise_weight_grad", (huge[:0], huge[:0], 3, 1), "edge"),
        Case("batch_norm_train_backward", (huge[:0], huge[:0], *[torch.ones(1).expand(HUGE_CHANNELS)] * 3), "edge"),
        Case("spatial_mixing", (huge[:, :, :0], *[torch.ones(HUGE_CHANNELS)] * 2, torch.ones(3, 3, HUGE_CHANNELS),
                                *[torch.ones(HUGE_CHANNELS)] * 2, "gelu"), "edge"),
    ]
    # Outputs follow the input, not torch.set_default_device.
    for case in (Case("batch_norm_train", (x, ones, zeros, 1e-5), "valid"),
                 Case("batch_norm_train_backward", (x, x, zeros, ones, ones), "valid"),
                 Case("act_batch_norm_train", (x, ones, zeros, 1e-5, "gelu"), "valid"),
                 Case("act_batch_norm_train_backward", (x, x, zeros, ones, ones, "relu"), "valid"),
                 Case("depthwise_weight_grad", (x, x, 3, 1), "valid"),
                 Case("pointwise_conv", (x, torch.randn(4, 8, 1, 1), zeros[:4]), "valid"),
                 Case("depthwise_conv", (x, torch.randn(8, 1, 4, 4), zeros, 2), "valid"),
                 Case("spatial_mixing", (x, ones, zeros, kkc, zeros, ones, "gelu"), "valid"),
                 Case("spatial_mixing_bf16", (x.bfloat16(), ones, zeros, kkc, zeros, ones, "gelu"), "valid")):
        case.default_device = "meta"
        cases.append(case)
    # The public BatchNorm2d(8) given 16 or 100000 channels: PyTorch's own error, whatever its options.
    for channels in (16, HUGE_CHANNELS):
        for affine, track in ((True, True), (True, False), (False, True), (False, False)):
            big = torch.randn(2, channels, 2, 1).contiguous(memory_format=torch.channels_last).requires_grad_()
            cases.append(Case("BatchNorm2d", (8, affine, track, big), "module", [f"{channels} channels"]))
    return cases


# ----------------------------------------------------------------------------------------------- running


def _tensors(result) -> tuple:
    return result if isinstance(result, (tuple, list)) else (result,)


def _compare(ours, reference, dtype, device: str = "cpu", tolerance: float | None = None) -> str | None:
    ours, reference = _tensors(ours), _tensors(reference)
    if len(ours) < len(reference):
        return f"{len(ours)} outputs, expected {len(reference)}"
    for index, (got, want) in enumerate(zip(ours, reference, strict=False)):
        if got.device.type != device or got.dtype != dtype or got.shape != want.shape:
            return (f"output {index}: {got.device} {got.dtype} {list(got.shape)}, expected {device} {dtype} "
                    f"{list(want.shape)}")
        if not got.numel() or device == "meta":  # meta tensors have no values to compare
            continue
        scale = max(1.0, want.abs().max().item())
        error = (got.double() - want).abs().max().item()
        if not error <= (tolerance or TOLERANCE[dtype]) * scale:  # NaN fails too
            return f"output {index}: off by {error:.3g} (scale {scale:.3g})"
    return None


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def run(case: Case) -> dict:
    ours_fn, ref_fn = OPERATORS[case.op]
    try:
        if case.default_device:
            with torch.device(case.default_device):
                ours = ours_fn(*case.args)
        else:
            ours = ours_fn(*case.args)
    except Exception as error:  # any exception answers an invalid call
        ours, ours_error = None, error
    else:
        ours_error = None
    if case.label == "module":
        return _run_module(case, ref_fn, ours, ours_error)
    if ours_error is not None:
        allowed = case.label in ("invalid", "edge")
        return {"outcome": "raised" if allowed else "refused", "detail": _error(ours_error)}
    if case.label == "invalid":
        return {"outcome": "accepted", "detail": "returned a result"}
    first = next(a for a in case.args if isinstance(a, torch.Tensor))
    mismatch = _compare(ours, ref_fn(*case.args), OUTPUT_DTYPE.get(case.op, first.dtype),
                        tolerance=OUTPUT_TOLERANCE.get(case.op))
    return {"outcome": "wrong", "detail": mismatch} if mismatch else {"outcome": "ok"}


def _run_module(case: Case, ref_fn: Callable, ours, ours_error) -> dict:
    """The public BatchNorm2d: nn.BatchNorm2d's result, or its exception with the same type and message."""
    try:
        reference, ref_error = ref_fn(*case.args), None
    except Exception as error:
        reference, ref_error = None, error
    if ref_error is not None or ours_error is not None:
        same = (ref_error is not None and ours_error is not None and type(ref_error) is type(ours_error)
                and str(ref_error) == str(ours_error))
        if same:
            return {"outcome": "raised", "detail": _error(ours_error)}
        return {"outcome": "wrong", "detail": f"ours: {_error(ours_error) if ours_error else 'a result'}; "
                                              f"nn.BatchNorm2d: {_error(ref_error) if ref_error else 'a result'}"}
    # nn.BatchNorm2d's output device is the reference's (a meta input gives a meta result there too).
    mismatch = _compare(ours, reference.double(), reference.dtype, reference.device.type)
    return {"outcome": "wrong", "detail": mismatch} if mismatch else {"outcome": "ok"}


def main(seed: int, count: int) -> None:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    cases = known_cases() + [random_case(rng) for _ in range(count)]
    for index, case in enumerate(cases):
        print(json.dumps({"start": index, "case": case.describe()}), flush=True)
        try:
            result = run(case)
        except Exception:  # the harness's own failure: reported, never hidden
            result = {"outcome": "harness", "detail": traceback.format_exc(limit=3)[-600:]}
        print(json.dumps({"done": index, "label": case.label, **result}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
