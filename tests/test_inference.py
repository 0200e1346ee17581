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
def test_every_path_matches_timm_builtin(k, act, patch, channels_last, pointwise, depthwise):
    ref, ours = _pair(k, act, patch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    paths = speed.AutotunedConvMixer(ours.to(memory_format=fmt)).paths()
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        expected = ref(x)
        for name in (f"{pointwise}+{depthwise}", "plain", "plain channels_last"):
            _assert_exact(expected, paths[name](x.contiguous(memory_format=fmt)))
            _assert_exact(expected[:1], paths[name](x[:1]))  # batch 1


@pytest.mark.parametrize(("k", "act", "patch"), CASES)
def test_the_default_matches_timm_builtin_on_every_shape_it_sees(k, act, patch):
    ref, ours = _pair(k, act, patch)
    fast = optimize_for_inference(ours)
    with torch.no_grad():
        for shape in [(2, 3, 24, 24), (1, 3, 24, 24), (2, 3, 16, 20), (2, 3, 24, 24)]:
            x = torch.randn(shape)
            _assert_exact(ref(x), fast(x))
    assert len(fast.choices) == 3


def test_accepts_timm_builtin_and_leaves_the_model_alone():
    ref, _ = _pair(7, "gelu", 2)
    ref.train()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    fast = optimize_for_inference(ref, input_size=(2, 3, 16, 16))
    assert set(fast.choices.values()) <= set(fast.paths()) | set(speed.RUNTIMES) | {"openvino latency",
                                                                                     "openvino throughput"}
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
    fast = optimize_for_inference(model, backend="torch")
    assert fast.fused is None and set(fast.paths()) == {"plain", "plain channels_last"}
    assert model.training and not fast.training
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model.eval()(x))


def test_rejects_wrong_input():
    _, ours = _pair(3, "relu", 1)
    with pytest.raises(ValueError, match="expects images"):
        optimize_for_inference(ours)(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="expected images"):
        FusedConvMixerInference(ours)(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="pointwise"):
        FusedConvMixerInference(ours, pointwise="fft")
    with pytest.raises(ValueError, match="depthwise"):
        FusedConvMixerInference(ours, depthwise="fft")


@pytest.mark.parametrize(("k", "act"), [(5, "gelu"), (8, "relu")])
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_optional_runtimes_match_timm_builtin(k, act, runtime):
    pytest.importorskip(runtime)
    ref, ours = _pair(k, act, 2)
    fast = optimize_for_inference(ours, (3, 3, 16, 16), backend=runtime)
    assert isinstance(fast, speed.OnnxRuntimeConvMixer if runtime == "onnxruntime" else speed.OpenVinoConvMixer)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        _assert_exact(ref(x), fast(x.contiguous(memory_format=torch.channels_last)))
    with pytest.raises(ValueError, match="input_size"):
        optimize_for_inference(ours, backend=runtime)


def test_auto_also_times_the_installed_runtimes_and_stays_exact():
    runtimes = speed.installed_runtimes()
    if not runtimes:
        pytest.skip("neither onnxruntime nor openvino is installed")
    ref, ours = _pair(5, "gelu", 2)
    clock_readings = []

    def clock() -> float:
        clock_readings.append(None)
        return 0.0  # every path ties: the incumbent (the plain model) is kept

    tuned = speed.AutotunedConvMixer(ours, clock=clock, rounds=1, runtimes=runtimes)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _assert_exact(ref(x), tuned(x))
    foreign = 2 * ("onnxruntime" in runtimes) + 4 * ("openvino" in runtimes)  # openvino: two hints
    torch_paths = len(tuned.paths())
    assert len(clock_readings) == 2 * 2 + 2 * (1 + torch_paths - 2) + foreign
    assert tuned.choices[((2, 3, 16, 16), torch.float32, "cpu")] in ("plain", "plain channels_last")
    with pytest.raises(ValueError, match="backend"):
        optimize_for_inference(ours, backend="tvm")
    with pytest.raises(ValueError, match="unknown runtimes"):
        speed.AutotunedConvMixer(ours, runtimes=("tvm",))


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
