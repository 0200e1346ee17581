"""The compiled CPU training kernels against PyTorch's autograd on the plain ops, and their fallbacks.

Tolerances: float64 gradcheck with PyTorch's defaults (finite differences against the analytic backward);
float32 weight gradients within 1e-5 of the largest reference magnitude (a sum of up to 10^4 products in a
different order).
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dispatched import OurOperatorCalls

from convmixer_timm import ConvMixer, speed
from convmixer_timm.speed import FusedConvMixerInference

ROOT = Path(__file__).resolve().parents[1]
needs_kernels = pytest.mark.skipif(speed.load() is None, reason="no C++ compiler: kernels fall back (tested below)")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ on this machine")
def test_kernels_are_built_where_a_compiler_exists():
    # Guards the install: the build hook must have run, or every kernel test would quietly skip.
    assert speed.load() is not None, speed.kernel_info()


def _plain_grads(x, weight, bias, grad_out):
    out = speed.conv_same(x, weight, bias)
    return torch.autograd.grad(out, [t for t in (x, weight, bias) if t is not None], grad_out)


@needs_kernels
# Channels 5 and 20 reach the one-vector and scalar-tail paths, 37 the two-vector path (float32 and float64);
# kernel 15 is the largest compiled width, 17 the generic one.
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 9, 17])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck_float64(k, channels_last):
    torch.manual_seed(k)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    weight = torch.randn(5, 1, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    # Fast mode compares v'Ju for random u, v with the numerical directional derivative: a wrong entry anywhere in
    # the Jacobian fails it, at a hundredth of the full check's cost (which still runs once, at k=3).
    if k == 3 and not channels_last:
        small = x[:1, :, :4, :4].detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(speed.depthwise_conv_same, (small, weight, bias))
    assert torch.autograd.gradcheck(speed.depthwise_conv_same, (x, weight, bias), fast_mode=True)
    assert torch.autograd.gradcheck(speed.depthwise_conv_same, (x, weight, None), fast_mode=True)
    # create_graph=True takes PyTorch's differentiable formula: second derivatives exist and are exact.
    assert torch.autograd.gradgradcheck(speed.depthwise_conv_same, (x, weight, bias), fast_mode=True)


@needs_kernels
@pytest.mark.parametrize(("channels", "k", "batch", "size"), [(37, 9, 3, 11), (20, 8, 2, 9), (64, 15, 1, 16),
                                                              (16, 17, 2, 5), (33, 7, 1, 1)])
def test_float32_gradients_match_autograd(channels, k, batch, size):
    torch.manual_seed(channels)
    x = torch.randn(batch, channels, size, size + 2).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(channels, 1, k, k, requires_grad=True)
    bias = torch.randn(channels, requires_grad=True)
    grad_out = torch.randn(batch, channels, size, size + 2)
    out = speed.depthwise_conv_same(x, weight, bias)
    ours = torch.autograd.grad(out, (x, weight, bias), grad_out)
    for got, ref in zip(ours, _plain_grads(x, weight, bias, grad_out), strict=True):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    # The forward is the kernels' own float32 convolution: float64's result rounded, within float32's sum error.
    exact = speed.conv_same(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-6 * k * k * exact.abs().max().item())
    assert out.is_contiguous(memory_format=torch.channels_last)


@needs_kernels
def test_training_model_uses_the_kernel_and_eval_does_not():
    model = ConvMixer(16, 1, 5, 2, num_classes=3).train()
    x = torch.randn(2, 3, 8, 8)
    grad_fns = set()

    def record(module, inputs, output):
        grad_fns.add(type(output.grad_fn).__name__ if output.grad_fn is not None else None)

    model.blocks[0][0].fn[0].register_forward_hook(record)
    model(x).sum().backward()
    assert len(grad_fns) == 1 and "convmixer_timm_depthwise_conv_same" in grad_fns.pop()
    with torch.no_grad():
        model(x)
    model.eval()(x)
    assert not any("convmixer_timm" in str(name) for name in grad_fns)


@needs_kernels
def test_rejects_bad_input_with_the_fix():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(TypeError, match="float32 or float64"):
        speed.depthwise_weight_grad(x.half(), x.half(), 3, 1)
    with pytest.raises(ValueError, match="must have the shape of x"):
        speed.depthwise_weight_grad(x, x[:, :, :4], 3, 1)


@needs_kernels
def test_plain_ops_where_the_kernel_does_not_apply():
    weight = torch.randn(4, 1, 3, 3, requires_grad=True)
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    assert speed.kernels_apply(x, weight)
    assert not speed.kernels_apply(x.contiguous(), weight)  # the training layout only: no hidden copies
    assert not speed.kernels_apply(x.half(), weight)
    with torch.no_grad():
        assert not speed.kernels_apply(x, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not speed.kernels_apply(x, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ConvMixer(4, 1, 3, 1, in_chans=4, num_classes=2).train()(x)
    assert out.dtype == torch.bfloat16 and F.relu(out).sum().requires_grad


@needs_kernels
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_batch_norm_gradcheck_float64(channels_last):
    torch.manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(3, 5, 4, 3, dtype=torch.float64) * 2 + 7).contiguous(memory_format=fmt).requires_grad_()
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, bias):
        return speed.batch_norm_training_with_kernels(x, weight, bias, None, None, 0.1, 1e-5)

    assert torch.autograd.gradcheck(fn, (x, weight, bias), fast_mode=channels_last)
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias), fast_mode=True)


@needs_kernels
@pytest.mark.parametrize("shift", [0.0, 1e3], ids=["centred", "mean-1e3"])
def test_batch_norm_float32_is_at_least_as_accurate_as_pytorch(shift):
    # Against a float64 reference: the kernel's float32 outputs, gradients and running statistics must be no
    # further from it than PyTorch's own float32 BatchNorm (plus float32 rounding of the result).
    torch.manual_seed(2)
    x64 = (torch.randn(16, 37, 9, 9, dtype=torch.float64) * 3 + shift).contiguous(memory_format=torch.channels_last)
    w64, b64 = torch.rand(37, dtype=torch.float64) + 0.5, torch.randn(37, dtype=torch.float64)
    g64 = torch.randn_like(x64)

    def run(impl, dtype):
        x, w, b = (t.to(dtype).requires_grad_() for t in (x64, w64, b64))
        stats = [torch.zeros(37, dtype=dtype), torch.ones(37, dtype=dtype)]
        if impl == "kernel":
            out = speed.batch_norm_training_with_kernels(x, w, b, *stats, 0.1, 1e-5)
        else:
            out = F.batch_norm(x, *stats, w, b, True, 0.1, 1e-5)
        return [out, *torch.autograd.grad(out, (x, w, b), g64.to(dtype)), *stats]

    reference = run("torch", torch.float64)
    ours, theirs = run("kernel", torch.float32), run("torch", torch.float32)
    names = ["output", "grad_x", "grad_weight", "grad_bias", "running_mean", "running_var"]
    for name, ref, a, b in zip(names, reference, ours, theirs, strict=True):
        scale = ref.abs().max().item()
        err_ours = (a.double() - ref).abs().max().item() / scale
        err_torch = (b.double() - ref).abs().max().item() / scale
        assert err_ours <= max(err_torch, 2e-7), (name, err_ours, err_torch)


@needs_kernels
@pytest.mark.parametrize("options", [dict(), dict(momentum=None), dict(track_running_stats=False)],
                         ids=["default", "cumulative", "untracked"])
def test_batch_norm_module_matches_torch_in_training_and_eval(options):
    from convmixer_timm.speed import BatchNorm2d

    torch.manual_seed(3)
    ours, ref = BatchNorm2d(6, **options), torch.nn.BatchNorm2d(6, **options)
    ours.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(4, 6, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
        outs = [m(x) for m in (ours, ref)]
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
        grads = [torch.autograd.grad(o, x, torch.ones_like(o) * step)[0] for o in outs]
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    x = torch.randn(2, 6, 3, 3)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)  # running stats differ by float rounding
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours.train()(torch.randn(1, 6, 1, 1, requires_grad=True))


def _exact_spatial_mixing(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s1: torch.Tensor,
                          act: str) -> torch.Tensor:
    """The spatial-mixing step in float64 from y (the BatchNorm-applied input, float64) by PyTorch's ops."""
    mixed = speed.conv_same(y, weight.double(), bias.double())
    activated = {"identity": mixed, "relu": F.relu(mixed), "gelu": F.gelu(mixed)}[act]
    return y + s1.double().view(1, -1, 1, 1) * activated


@needs_kernels
@pytest.mark.parametrize("act", ["identity", "relu", "gelu"])
def test_spatial_mixing_matches_float64_ops(act):
    torch.manual_seed(4)
    channels, k = 21, 6
    u = (torch.randn(2, channels, 7, 10) * 2).contiguous(memory_format=torch.channels_last)
    s_in = torch.rand(channels) + 0.5
    t_in, bias, s1 = torch.randn(channels), torch.randn(channels), torch.randn(channels)
    weight = torch.randn(channels, 1, k, k) * 0.2
    z = speed.spatial_mixing(u, s_in, t_in, weight[:, 0].permute(1, 2, 0).contiguous(), bias, s1, act)
    expected = _exact_spatial_mixing((u * s_in.view(1, -1, 1, 1) + t_in.view(1, -1, 1, 1)).double(), weight, bias,
                                     s1, act)
    assert z.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(z.double(), expected, rtol=0, atol=1e-6 * expected.abs().max().item())
    with pytest.raises(TypeError, match="float32"):
        speed.spatial_mixing(u.double(), s_in, t_in, weight[:, 0].permute(1, 2, 0), bias, s1, act)
    with pytest.raises(ValueError, match=r"\(k, k, 21\)"):
        speed.spatial_mixing(u, s_in, t_in, weight[:, 0], bias, s1, act)


def _bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at each element of ``t`` (8 significant bits)."""
    exponent = torch.frexp(t.double().abs().clamp_min(2.0**-126)).exponent
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), exponent - 8)


@needs_kernels
# Channels 21 reach the vector and scalar-tail paths, k 6 the generic width, k 9 the compiled tile.
@pytest.mark.parametrize(("channels", "k"), [(21, 6), (32, 9)])
@pytest.mark.parametrize("act", ["identity", "relu", "gelu"])
@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32], ids=["bf16_in", "fp32_in"])
def test_spatial_mixing_bf16_is_the_float32_step_rounded_once(channels, k, act, input_dtype):
    torch.manual_seed(channels + k)
    u = (torch.randn(2, channels, 7, 10) * 2).to(input_dtype).contiguous(memory_format=torch.channels_last)
    s_in, t_in = torch.rand(channels) + 0.5, torch.randn(channels)
    bias, s1 = torch.randn(channels), torch.randn(channels)
    weight = torch.randn(channels, 1, k, k) * 0.2
    z = speed.spatial_mixing_bf16(u, s_in, t_in, weight[:, 0].permute(1, 2, 0).contiguous(), bias, s1, act)
    assert z.dtype == torch.bfloat16 and z.is_contiguous(memory_format=torch.channels_last)
    # The exact step on the bf16 input as given, rounded to bf16 by PyTorch: the kernel's float32 sums may only
    # move a result across a rounding boundary, one bf16 step.
    exact = _exact_spatial_mixing(u.double() * s_in.double().view(1, -1, 1, 1) + t_in.double().view(1, -1, 1, 1),
                                  weight, bias, s1, act)
    rounded = exact.to(torch.bfloat16)
    off = (z.double() - rounded.double()).abs()
    assert (off <= _bf16_ulp(exact)).all(), f"off by {(off / _bf16_ulp(exact)).max():.2f} bf16 steps"
    assert (z.view(torch.int16) == rounded.view(torch.int16)).float().mean() >= 0.99
    # PyTorch's ops run in bf16 (bf16 weights, a bf16 result after each op) are further from the exact step.
    weight_bf16 = weight.bfloat16()
    y_bf16 = (u.float() * s_in.view(1, -1, 1, 1) + t_in.view(1, -1, 1, 1)).bfloat16()
    mixed_bf16 = F.conv2d(F.pad(y_bf16, ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2)), weight_bf16,
                          bias.bfloat16(), groups=channels)
    activated_bf16 = {"identity": mixed_bf16, "relu": F.relu(mixed_bf16), "gelu": F.gelu(mixed_bf16)}[act]
    pytorch_bf16 = y_bf16 + s1.bfloat16().view(1, -1, 1, 1) * activated_bf16
    assert (z.double() - exact).abs().max() <= (pytorch_bf16.double() - exact).abs().max()
    with pytest.raises(TypeError, match="float32"):
        speed.spatial_mixing_bf16(u, s_in.bfloat16(), t_in, weight[:, 0].permute(1, 2, 0), bias, s1, act)
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        speed.spatial_mixing_bf16(u.double(), s_in, t_in, weight[:, 0].permute(1, 2, 0), bias, s1, act)


@needs_kernels
@pytest.mark.parametrize(("channels", "k"), [(6, 1), (37, 3)], ids=["scalar_path", "vector_path"])
def test_spatial_mixing_bf16_rounds_as_pytorch_at_the_extremes(channels, k):
    # Subnormals, NaN of either sign, overflow past bf16's largest value: rounded bit for bit as PyTorch rounds
    # the float32 step (NaN: NaN), in whole vectors (37 channels, k 3: the tiles, whatever the copy's width) and in the
    # scalar path (k 1). Weights zero and s1 one: z is y itself, NaN spreading to its neighbours as in float32.
    special = torch.tensor([0.0, float("nan"), -float("nan"), 1e38, 3.4e38, -3.4e38, -2.5, 1e-39, -3e-40,
                            1.1754942e-38, float("inf"), 1.00390625])
    u = torch.randn(1, channels, 3, 12)
    u[0, :, 0] = special.roll(1)[None, :] if channels > 6 else special[None, :12]
    u[0, ::2, 2] = special.flip(0)[None, :]
    u = u.contiguous(memory_format=torch.channels_last)
    ones, zeros = torch.ones(channels), torch.zeros(channels)
    weight = torch.zeros(k, k, channels)
    z = speed.spatial_mixing_bf16(u, ones, zeros, weight, zeros, ones, "identity")
    expected = speed.spatial_mixing(u, ones, zeros, weight, zeros, ones, "identity").bfloat16()
    nan = expected.isnan()
    assert torch.equal(z.isnan(), nan) and nan.any()
    assert torch.equal(z.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])
    # Every NaN the same quiet NaN on every copy (c10::BFloat16's; PyTorch's vectorised rounding writes 0xffff).
    assert (z.view(torch.int16)[nan] == 0x7FC0).all() and z.isinf().sum() >= 2


@needs_kernels
@pytest.mark.parametrize(("op", "dtype"), [("spatial_mixing", torch.float32), ("spatial_mixing_bf16", torch.float32),
                                           ("spatial_mixing_bf16", torch.bfloat16)])
def test_inference_operators_pass_pytorchs_opcheck(op, dtype):
    # Schema, fake kernel (the shapes, strides and dtype compiled and exported graphs assume) and AOT dispatch.
    torch.manual_seed(0)
    channels, k = 19, 5
    u = torch.randn(2, channels, 6, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    args = (u, torch.rand(channels) + 0.5, torch.randn(channels), torch.randn(k, k, channels), torch.randn(channels),
            torch.randn(channels), "gelu")
    results = torch.library.opcheck(getattr(torch.ops.convmixer_timm, op).default, args,
                                    test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    assert set(results.values()) == {"SUCCESS"}


@needs_kernels
@pytest.mark.parametrize("threads", [2, 3])
def test_kernels_split_among_threads_give_the_one_thread_result(threads):
    # The session runs on one thread (conftest.py); here the kernels' row split runs with two and three (more
    # threads than cores splits unevenly) and must agree with one thread to the rounding of a reordered sum.
    torch.manual_seed(threads)
    x = torch.randn(3, 37, 9, 11, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(37, dtype=torch.float64) + 0.5, torch.randn(37, dtype=torch.float64)
    dw_weight = torch.randn(37, 1, 8, 8, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    fused = FusedConvMixerInference(ConvMixer(16, 2, 5, 2, num_classes=3).eval())
    images = torch.randn(2, 3, 16, 16)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, dw_weight)]
        out = speed.batch_norm_training_with_kernels(*leaves[:3], None, None, 0.1, 1e-5)
        out = speed.depthwise_conv_same(out, leaves[3], None)
        with torch.no_grad():
            mixed = fused(images)
        return [out, *torch.autograd.grad(out, leaves, grad_out), mixed]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        reference = run()
        torch.set_num_threads(threads)
        results = run()
    finally:
        torch.set_num_threads(before)
    for got, ref in zip(results, reference, strict=True):
        unit = (1e-6 if got.dtype == torch.float32 else 1e-12) * ref.abs().max().item()
        torch.testing.assert_close(got, ref, rtol=0, atol=unit)


# -- activation then BatchNorm as one operator ---------------------------------------------------------------------

def _act_batch_norm_reference(a, weight, bias, act, grad_y):
    """F.gelu / F.relu then F.batch_norm in float64: output and gradients for ``grad_y``."""
    leaves = [t.detach().double().requires_grad_() for t in (a, weight, bias)]
    h = F.gelu(leaves[0]) if act == "gelu" else F.relu(leaves[0])
    y = F.batch_norm(h, None, None, leaves[1], leaves[2], True, 0.1, 1e-5)
    return [y.detach(), *torch.autograd.grad(y, leaves, grad_y.double())]


@needs_kernels
@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
# 5, 21 and 37 channels leave a tail after full vectors of 4, 8 and 16 floats; 16 leaves none.
@pytest.mark.parametrize("channels", [5, 16, 21, 37])
def test_act_batch_norm_matches_the_two_pytorch_ops(act, dtype, channels):
    torch.manual_seed(channels)
    a = (torch.randn(3, channels, 7, 6, dtype=dtype) * 2 + 0.3).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(channels, dtype=dtype) + 0.5, torch.randn(channels, dtype=dtype)
    grad_y = torch.randn(3, channels, 7, 6, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (a, weight, bias)]
    y, mean, invstd, variance = torch.ops.convmixer_timm.act_batch_norm_train(*leaves, 1e-5, act)
    ours = [y, *torch.autograd.grad(y, leaves, grad_y)]
    reference = _act_batch_norm_reference(a, weight, bias, act, grad_y)
    # float64: sums of 126 terms and an erf, a few ulps each; float32: the vectorised erf (|error| < 1.5e-7) and
    # float32 rounding of every element, against a float64 reference.
    tolerance = 1e-13 if dtype == torch.float64 else 1e-6
    for name, got, want in zip(["y", "grad_a", "grad_weight", "grad_bias"], ours, reference, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        error = (got.double() - want).abs().max().item()
        assert error <= tolerance * want.abs().max().item(), (name, error)
    assert y.is_contiguous(memory_format=torch.channels_last)
    h = F.gelu(a.double()) if act == "gelu" else F.relu(a.double())
    torch.testing.assert_close(mean.double(), h.mean((0, 2, 3)), rtol=0, atol=tolerance * 10)
    torch.testing.assert_close(variance.double(), h.var((0, 2, 3), unbiased=False), rtol=tolerance * 10, atol=0)
    torch.testing.assert_close(invstd.double(), (variance.double() + 1e-5).rsqrt(), rtol=tolerance * 10, atol=0)


@needs_kernels
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_act_batch_norm_gradcheck_float64(act):
    torch.manual_seed(5)
    # ReLU's kink at 0 is where finite differences fail: no input within the step of it.
    a = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    a = (a + a.sign() * 0.1).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def fn(a, weight, bias):
        return torch.ops.convmixer_timm.act_batch_norm_train(a, weight, bias, 1e-5, act)[0]

    assert torch.autograd.gradcheck(fn, (a, weight, bias))
    # create_graph=True composes PyTorch's differentiable ops: second derivatives exist and are exact.
    assert torch.autograd.gradgradcheck(fn, (a, weight, bias))


@needs_kernels
def test_act_batch_norm_rejects_bad_input_with_the_fix():
    a, ones = torch.randn(2, 4, 3, 3), torch.ones(4)
    with pytest.raises(ValueError, match="act must be one of 'relu', 'gelu'"):
        torch.ops.convmixer_timm.act_batch_norm_train(a, ones, ones, 1e-5, "silu")
    with pytest.raises(TypeError, match="float32 or float64"):
        torch.ops.convmixer_timm.act_batch_norm_train(a.half(), ones.half(), ones.half(), 1e-5, "gelu")
    with pytest.raises(ValueError, match="should contain 4 elements"):
        torch.ops.convmixer_timm.act_batch_norm_train_backward(a, a, ones[:3], ones, ones, "relu")


def _training_step(model, x, kernels_on: bool, monkeypatch) -> tuple[list[torch.Tensor], dict[str, int]]:
    """One SGD step: loss, output, every gradient and every buffer afterwards; and the operators that ran."""
    if kernels_on:
        monkeypatch.delenv("CONVMIXER_TIMM_KERNELS", raising=False)
    else:
        monkeypatch.setenv("CONVMIXER_TIMM_KERNELS", "0")
    with OurOperatorCalls() as calls:
        out = model(x)
        loss = F.cross_entropy(out, torch.arange(x.shape[0]) % 5)
        loss.backward()
    return [loss, out, *(p.grad for p in model.parameters()), *model.buffers()], calls.counts


@needs_kernels
@pytest.mark.parametrize(("act", "options"), [("gelu", {}), ("relu", {}), ("gelu", {"bn_momentum": 0.3})],
                         ids=["gelu", "relu", "momentum"])
def test_a_fused_training_step_equals_the_step_on_pytorchs_ops(act, options, monkeypatch):
    torch.manual_seed(6)
    model = ConvMixer(8, 2, 3, 2, num_classes=5, act_layer=act, **options).double().train()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    fused, calls = _training_step(model, x, True, monkeypatch)
    plain, plain_calls = _training_step(reference, x, False, monkeypatch)
    # Every act -> BatchNorm pair (stem, and two per block) ran fused, forward and backward; nothing else did.
    assert calls["act_batch_norm_train"] == calls["act_batch_norm_train_backward"] == 5 and not plain_calls
    assert "batch_norm_train" not in calls
    for got, want in zip(fused, plain, strict=True):
        if want.dtype == torch.long:  # num_batches_tracked
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@needs_kernels
def test_hooks_see_the_activation_and_the_fused_path_steps_aside(monkeypatch):
    torch.manual_seed(7)
    model = ConvMixer(8, 1, 3, 2, num_classes=5).double().train()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    seen = []
    model.stem[1].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with_hook, calls = _training_step(model, x, True, monkeypatch)
    assert seen == [torch.Size([4, 8, 8, 8])]  # the activation's own output, as a module's hook sees it
    assert calls["act_batch_norm_train"] == 2 and calls["batch_norm_train"] == 1  # the stem's pair unfused
    plain, _ = _training_step(reference, x, False, monkeypatch)
    for got, want in zip(with_hook, plain, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-9, atol=1e-12)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)
    try:
        _, calls = _training_step(copy.deepcopy(reference), x, True, monkeypatch)
    finally:
        handle.remove()
    assert "act_batch_norm_train" not in calls and calls["batch_norm_train"] == 3  # a global hook: no pair fused


def _residual_versions(model) -> list[int]:
    """After each forward, the version of every block's residual sum: 1 where it was added in place."""
    versions = []
    for block in model.blocks:
        block[0].register_forward_hook(lambda module, inputs, output: versions.append(output._version))
    return versions


@needs_kernels
@pytest.mark.slow
def test_the_residual_is_added_in_place_where_that_saves_a_mapping_bitwise_as_the_fresh_sum(monkeypatch):
    # 8 x 512 x 1024 float64 is 32 MiB: a fresh tensor that large is a mapping of its own under glibc.
    torch.manual_seed(8)
    model = ConvMixer(8, 1, 3, 1, num_classes=5).double().train()
    reference, small = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(1, 3, 512, 1024, dtype=torch.float64)
    in_place_versions, fresh_versions, small_versions = map(_residual_versions, (model, reference, small))
    in_place, _ = _training_step(model, x, True, monkeypatch)
    for block in reference.blocks:  # a hook on drop_path: fn's output is visible, so the sum is a fresh tensor
        block[0].drop_path.register_forward_hook(lambda module, inputs, output: None)
    fresh, calls = _training_step(reference, x, True, monkeypatch)
    assert in_place_versions == [1] and fresh_versions == [0] and calls["act_batch_norm_train"] == 3
    for got, want in zip(in_place, fresh, strict=True):
        assert torch.equal(got, want)
    _training_step(small, x[:, :, :32, :32], True, monkeypatch)
    assert small_versions == [0]  # from the heap: a fresh sum, whose hole the allocator reuses
