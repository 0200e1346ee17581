"""The compiled CPU training kernels against PyTorch's autograd on the plain ops, and their fallbacks.

Tolerances: float64 gradcheck with PyTorch's defaults (finite differences against the analytic backward);
float32 weight gradients within 1e-5 of the largest reference magnitude (a sum of up to 10^4 products in a
different order).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from convmixer_timm import ConvMixer, kernels
from convmixer_timm.allocator import tune_cpu_allocator

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no C++ compiler: kernels fall back (tested below)")
ROOT = Path(__file__).resolve().parents[1]


def _plain_grads(x, weight, bias, grad_out):
    out = kernels.conv_same(x, weight, bias)
    return torch.autograd.grad(out, [t for t in (x, weight, bias) if t is not None], grad_out)


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
    assert torch.autograd.gradcheck(kernels.DepthwiseConvSame.apply, (x, weight, bias))
    assert torch.autograd.gradcheck(kernels.DepthwiseConvSame.apply, (x, weight, None))


@pytest.mark.parametrize(("channels", "k", "batch", "size"), [(37, 9, 3, 11), (20, 8, 2, 9), (64, 15, 1, 16),
                                                              (16, 17, 2, 5), (33, 7, 1, 1)])
def test_float32_gradients_match_autograd(channels, k, batch, size):
    torch.manual_seed(channels)
    x = torch.randn(batch, channels, size, size + 2).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(channels, 1, k, k, requires_grad=True)
    bias = torch.randn(channels, requires_grad=True)
    grad_out = torch.randn(batch, channels, size, size + 2)
    out = kernels.DepthwiseConvSame.apply(x, weight, bias)
    ours = torch.autograd.grad(out, (x, weight, bias), grad_out)
    for got, ref in zip(ours, _plain_grads(x, weight, bias, grad_out), strict=True):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(out, kernels.conv_same(x, weight, bias), rtol=0, atol=0)


def test_training_model_uses_the_kernel_and_eval_does_not():
    model = ConvMixer(16, 1, 5, 2, num_classes=3).train()
    x = torch.randn(2, 3, 8, 8)
    grad_fns = set()

    def record(module, inputs, output):
        grad_fns.add(type(output.grad_fn).__name__ if output.grad_fn is not None else None)

    model.blocks[0][0].fn[0].register_forward_hook(record)
    model(x).sum().backward()
    assert grad_fns == {"DepthwiseConvSameBackward"}
    grad_fns.clear()
    with torch.no_grad():
        model(x)
    model.eval()(x)
    assert "DepthwiseConvSameBackward" not in grad_fns


def test_rejects_bad_input_with_the_fix():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.depthwise_weight_grad(x.half(), x.half(), 3, 1)
    with pytest.raises(ValueError, match="equal 4-d CPU tensors"):
        kernels.depthwise_weight_grad(x, x[:, :, :4], 3, 1)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


TRAIN_ONE_STEP = """
import warnings, torch
from convmixer_timm import ConvMixer, kernels
model = ConvMixer(8, 1, 3, 2, num_classes=2).train()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
print("library", kernels.load() is not None)
print("warned", any("kernels unavailable" in str(w.message) for w in caught))
print("grad", bool(model.blocks[0][0].fn[0].weight.grad.abs().sum() > 0))
"""


def test_failed_build_warns_falls_back_and_leaves_no_partial_library(tmp_path):
    failing = tmp_path / "failing-cxx"
    failing.write_text("#!/bin/sh\necho 'simulated compiler failure' >&2\nexit 1\n")
    failing.chmod(0o755)
    cache = tmp_path / "cache"
    result = _run(TRAIN_ONE_STEP, CXX=str(failing), CONVMIXER_TIMM_CACHE=str(cache))
    assert result.returncode == 0, result.stderr
    assert "library False" in result.stdout and "warned True" in result.stdout and "grad True" in result.stdout
    assert list(cache.iterdir()) == []  # the temporary output was removed, nothing half-written is cached


def test_kernels_off_by_environment_train_silently():
    result = _run(TRAIN_ONE_STEP, CONVMIXER_TIMM_KERNELS="0")
    assert result.returncode == 0, result.stderr
    assert "library False" in result.stdout and "warned False" in result.stdout and "grad True" in result.stdout


def test_build_is_cached_per_source_and_cpu(tmp_path):
    result = _run(TRAIN_ONE_STEP, CONVMIXER_TIMM_CACHE=str(tmp_path))
    assert "library True" in result.stdout, result.stderr
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 1 and built[0].startswith("depthwise_weight_grad-") and built[0].endswith(".so")
    stamp = (tmp_path / built[0]).stat().st_mtime_ns
    assert "library True" in _run(TRAIN_ONE_STEP, CONVMIXER_TIMM_CACHE=str(tmp_path)).stdout
    assert (tmp_path / built[0]).stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_allocator_tuning_applies_once_and_can_be_turned_off():
    if sys.platform.startswith("linux"):
        assert tune_cpu_allocator() is True
    code = "from convmixer_timm.allocator import tune_cpu_allocator; print(tune_cpu_allocator())"
    assert _run(code, CONVMIXER_TIMM_TUNE_MALLOC="0").stdout.strip() == "False"


def test_plain_ops_where_the_kernel_does_not_apply():
    weight = torch.randn(4, 1, 3, 3, requires_grad=True)
    x = torch.randn(1, 4, 5, 5)
    assert kernels.use_fast_backward(x, weight)
    assert not kernels.use_fast_backward(x.half(), weight)
    with torch.no_grad():
        assert not kernels.use_fast_backward(x, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.use_fast_backward(x, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ConvMixer(4, 1, 3, 1, in_chans=4, num_classes=2).train()(x)
    assert out.dtype == torch.bfloat16 and F.relu(out).sum().requires_grad
