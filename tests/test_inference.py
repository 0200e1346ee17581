"""optimize_for_inference() is exact: same logits as timm's built-in eval model with the same weights.

Odd and even kernels, GELU and ReLU, NCHW and channels_last inputs and models, both pointwise implementations;
tolerance 1e-4 of the reference logits' largest magnitude (observed ~3e-7: only float32 rounding differs).
"""
from __future__ import annotations

import pytest
import timm
import torch
from reference import randomize_batchnorm
from timm.models.convmixer import ConvMixer as TimmConvMixer
from torch import nn

from convmixer_timm import VARIANTS, ConvMixer, speed
from convmixer_timm.speed import FusedConvMixerInference, optimize_for_inference

CASES = [(5, "gelu", 2), (8, "gelu", 2), (3, "relu", 1), (4, "relu", 3)]


def _pair(k: int, act: str, patch: int, dim: int = 16, depth: int = 2, num_classes: int = 10):
    torch.manual_seed(0)
    ref = TimmConvMixer(dim, depth, k, patch, num_classes=num_classes, act_layer=nn.GELU if act == "gelu" else nn.ReLU)
    ref = randomize_batchnorm(ref).eval()
    ours = ConvMixer(dim, depth, k, patch, num_classes=num_classes, act_layer=act)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _assert_exact(ref: torch.Tensor, out: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


DEPTHWISE = ["onednn", pytest.param("kernel", marks=pytest.mark.skipif(speed.load() is None, reason="no compiler"))]


@pytest.mark.parametrize("depthwise", DEPTHWISE)
@pytest.mark.parametrize("pointwise", ["conv", "mm"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(("k", "act", "patch"), CASES)
def test_matches_timm_builtin(k, act, patch, channels_last, pointwise, depthwise):
    ref, ours = _pair(k, act, patch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fast = optimize_for_inference(ours.to(memory_format=fmt))
    assert isinstance(fast, FusedConvMixerInference)
    fast.pointwise, fast.depthwise = pointwise, depthwise
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        expected = ref(x)
        _assert_exact(expected, fast(x.contiguous(memory_format=fmt)))
        _assert_exact(expected[:1], fast(x[:1]))  # batch 1


def test_accepts_timm_builtin_and_leaves_the_model_alone():
    ref, _ = _pair(7, "gelu", 2)
    ref.train()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    fast = optimize_for_inference(ref, input_size=(2, 3, 16, 16))
    assert getattr(fast, "pointwise", "plain") in ("conv", "mm", "plain")
    assert getattr(fast, "depthwise", "kernel") in ("kernel", "onednn")
    assert ref.training
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(value, state[key])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _assert_exact(ref.eval()(x), fast(x))


def test_odd_image_size_and_feature_extractor():
    ref, ours = _pair(5, "gelu", 3, num_classes=0)
    x = torch.randn(2, 3, 17, 20)  # not a multiple of the patch size: the stem ignores the remainder
    with torch.no_grad():
        _assert_exact(ref(x), optimize_for_inference(ours, (3, 17, 20))(x))


def test_unsupported_models_fall_back_to_an_eval_copy():
    model = ConvMixer(8, 2, 3, 2, num_classes=4, act_layer="silu").train()
    fast = optimize_for_inference(model)
    assert not isinstance(fast, FusedConvMixerInference)
    assert model.training and not fast.training
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model.eval()(x))


def test_rejects_wrong_input():
    _, ours = _pair(3, "relu", 1)
    with pytest.raises(ValueError, match="expected images"):
        optimize_for_inference(ours)(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="pointwise"):
        FusedConvMixerInference(ours, pointwise="fft")
    with pytest.raises(ValueError, match="depthwise"):
        FusedConvMixerInference(ours, depthwise="fft")


@pytest.mark.parametrize(("k", "act"), [(5, "gelu"), (8, "relu")])
def test_onnxruntime_backend_matches_timm_builtin(k, act):
    pytest.importorskip("onnxruntime")
    from convmixer_timm.speed import OnnxRuntimeConvMixer

    ref, ours = _pair(k, act, 2)
    fast = optimize_for_inference(ours, (3, 16, 16), backend="onnxruntime")
    assert isinstance(fast, OnnxRuntimeConvMixer)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        _assert_exact(ref(x), fast(x.contiguous(memory_format=torch.channels_last)))
    auto = optimize_for_inference(ours, (2, 3, 16, 16), backend="auto")
    with torch.no_grad():
        _assert_exact(ref(x), auto(x))
    with pytest.raises(ValueError, match="input_size"):
        optimize_for_inference(ours, backend="onnxruntime")
    with pytest.raises(ValueError, match="backend"):
        optimize_for_inference(ours, backend="tvm")


@pytest.mark.skipif(speed.load() is None, reason="no compiler")
@pytest.mark.parametrize(("dim", "k", "size"), [(37, 9, 11), (48, 8, 19), (20, 11, 6), (16, 3, 1)])
def test_mixing_kernel_on_uneven_channels_widths_and_kernels(dim, k, size):
    # Channel tails (not a multiple of the vector width), row tails (not a multiple of 8 outputs), kernel sizes
    # without a compiled specialisation, a 1x1 grid.
    torch.manual_seed(dim)
    ref = randomize_batchnorm(TimmConvMixer(dim, 2, k, 1, num_classes=5)).eval()
    ours = ConvMixer(dim, 2, k, 1, num_classes=5)
    ours.load_state_dict(ref.state_dict())
    fast = FusedConvMixerInference(ours, depthwise="kernel")
    x = torch.randn(2, 3, size, size + 3)
    with torch.no_grad():
        _assert_exact(ref(x), fast(x))
        fast.depthwise = "onednn"  # packed weights are cached per shape and path, so switching is safe
        _assert_exact(ref(x), fast(x))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_every_registered_variant_optimizes_exactly(variant):
    torch.manual_seed(0)
    act = nn.GELU if variant.act == "gelu" else nn.ReLU
    ref = randomize_batchnorm(TimmConvMixer(16, 2, variant.k, variant.p, num_classes=10, act_layer=act)).eval()
    ours = timm.create_model(variant.name, dim=16, depth=2, num_classes=10)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, variant.img_size, variant.img_size)
    with torch.no_grad():
        for depthwise in ["onednn"] + (["kernel"] if speed.load() is not None else []):
            _assert_exact(ref(x), FusedConvMixerInference(ours, depthwise=depthwise)(x))
